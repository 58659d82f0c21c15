"""A session's checkpoint operations, composed from the engine and a store.

(Interface first; the implementation follows in the same module.)
"""
