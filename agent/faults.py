"""A deterministic fault for tests of the write order: die at a named step.

``STUDIO_TEST_CRASH_AT=<step>`` makes the process SIGKILL itself right after
that step of writing a checkpoint is done (``layer``: the layer blob is in the
store; ``manifest``: the manifest blob too; ``ref``: the ref points at it;
``state``: the new parent state is written, ``session.json`` not yet switched).
Only the tests set it; unset, a step costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "STUDIO_TEST_CRASH_AT"
STEPS = ("layer", "manifest", "ref", "state")


def crash_point(step: str) -> None:
    """SIGKILL this process if the tests asked to die at ``step``."""
    if os.environ.get(ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)
