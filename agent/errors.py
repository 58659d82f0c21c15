"""Errors the agent expects and reports in one line, without a traceback.

Everything a user, an operator or the control plane can cause (bad input, a
corrupt or hostile layer, a missing blob, a store that is down) is an
``AgentError``; anything else is a bug and keeps its traceback.
"""


class AgentError(Exception):
    """An expected failure with a message fit for a one-line report."""


class ConfigError(AgentError):
    """A setting or argument is invalid."""


class InvalidName(AgentError):
    """A checkpoint name is refused."""


class NotFound(AgentError):
    """A checkpoint, ref or blob does not exist."""


class BlobMissing(NotFound):
    """A blob a manifest refers to is not in the store."""


class DigestMismatch(AgentError):
    """A blob's bytes do not hash to its name, or its size is wrong."""


class CorruptLayer(AgentError):
    """A layer is not a well-formed zstd-compressed tar."""


class UnsafeLayer(CorruptLayer):
    """A layer entry would write outside the root or create something refused."""


class RefConflict(AgentError):
    """Another writer updated a ref since we read it (compare-and-swap lost)."""


class StoreError(AgentError):
    """The store failed in a way retries did not fix (or must not retry)."""


class InvalidRef(StoreError):
    """An object where a ref should be that is not a ref document: what it protects is unknown."""


class StoreUnavailable(StoreError):
    """The store could not be reached, or kept failing transiently."""


class PermissionDenied(StoreError):
    """The store refused an action for lack of permission."""


class NoParentState(AgentError):
    """A checkpoint or diff was asked for before a baseline or restore."""


class NoSpace(AgentError):
    """The root's filesystem has too little free space for what a layer holds."""
