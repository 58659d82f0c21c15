"""The checkpoint engine: scan, diff, layer format and restore.

It works on local files and byte streams only; it knows nothing of stores,
HTTP or the daemon.  Data flows one way: scan -> diff -> layer (and, the other
way, layer -> restore).
"""
