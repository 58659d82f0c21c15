"""The daemon's background squash of the session's own checkpoint.

After a periodic checkpoint, when the policy (``session.squash.plan``) says the
chain has grown too long or too much of it is superseded, one squash runs in the
background, on a thread of its own at nice 19 and in the idle I/O class.  It
never delays a checkpoint: the squash holds the session's lock only for its
last step (manifest and ref), and a checkpoint written meanwhile is kept (the
squash rebases onto it).  ``stop`` cancels a squash in progress, so the final
checkpoint has the machine to itself; the checkpoint the squash started from
stays valid whatever moment it stops at.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import TYPE_CHECKING

from agent.checkpoint.layer_writer import Cancelled
from agent.errors import AgentError
from agent.log import get_logger
from agent.session.squash import plan

if TYPE_CHECKING:
    from agent.session import CheckpointResult, Session
    from agent.session.squash import SquashOutcome

log = get_logger("daemon")

# How long a stop waits for a cancelled squash to let go (it checks for the
# cancel between entries; its thread is a daemon thread, never waited for).
STOP_WAIT = 2.0


class Compactor:
    def __init__(self, session: Session, max_layers: int) -> None:
        self._session = session
        self._max_layers = max_layers
        self._cancel = threading.Event()
        self._task: asyncio.Task[SquashOutcome | None] | None = None
        self.last: SquashOutcome | None = None
        self.last_error: str | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def after_checkpoint(self, result: CheckpointResult | None) -> None:
        """Start a squash if the policy asks for one and none is running."""
        if self._max_layers <= 0 or self.running or self._cancel.is_set():
            return
        if getattr(self._session, "squash", None) is None:  # a session that cannot
            return
        if result is not None and result.info.name != self._session.auto_name:
            return
        start = plan(self._session.chain, self._max_layers)
        if start is None:
            return
        log.info("squash.start", layers=len(self._session.chain), start=start)
        self._task = asyncio.create_task(self._squash(start), name="background squash")

    async def _squash(self, start: int) -> SquashOutcome | None:
        try:
            out = await self._session.squash(start=start, cancel=self._cancel, low_priority=True)
        except Cancelled:
            log.info("squash.cancelled")
            return None
        except AgentError as e:  # the checkpoint stays as it was; the next tick may retry
            log.warning("squash.failed", error=str(e))
            self.last_error = str(e)
            return None
        self.last, self.last_error = out, None
        return out

    def cancel(self) -> None:
        """Ask a squash in progress to stop (and no other to start)."""
        self._cancel.set()

    async def stop(self) -> None:
        """Cancel a squash in progress; back within ``STOP_WAIT`` seconds at most."""
        self._cancel.set()
        task = self._task
        if task is None or task.done():
            return
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(task), STOP_WAIT)
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
