"""Running the parts of one blob's transfer a bounded number at a time."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable

Job = Callable[[], Awaitable[None]]


async def run_bounded(jobs: AsyncGenerator[Job, None], limit: int) -> None:
    """Run jobs at most ``limit`` at a time; the first failure cancels the rest.

    Jobs are taken from the generator only as room frees up, so work it does
    to make each one (hashing the next part) keeps pace with the transfers.
    """
    pending: set[asyncio.Task[None]] = set()

    async def settle(when: str) -> None:
        nonlocal pending
        done, pending = await asyncio.wait(pending, return_when=when)
        for task in done:
            task.result()

    try:
        async with contextlib.aclosing(jobs):
            async for job in jobs:
                while len(pending) >= limit:
                    await settle(asyncio.FIRST_COMPLETED)
                pending.add(asyncio.ensure_future(job()))
        while pending:
            await settle(asyncio.FIRST_EXCEPTION)
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
