"""Exponential backoff, the one policy every retry loop of the agent uses.

Two kinds of caller share it: S3 requests, retried concurrently with full jitter
(``delay(attempt)`` is pure, so one policy serves many requests at once), and the
daemon's own loops (IDE restarts, control-plane reports), which keep a running
count with ``next()`` and start again from ``base`` with ``reset()`` once things
work again.
"""

from __future__ import annotations

import random


class Backoff:
    """``base * factor**(n-1)`` seconds after the n-th failure, never above ``cap``.

    With ``jitter`` the delay is drawn uniformly below that (full jitter, as
    botocore's standard mode): many clients throttled at once then do not come
    back in step and get throttled again.
    """

    def __init__(
        self,
        base: float = 1.0,
        cap: float = 60.0,
        *,
        factor: float = 2.0,
        jitter: bool = False,
        max_attempts: int = 0,
    ) -> None:
        self.base = base
        self.cap = cap
        self.factor = factor
        self.jitter = jitter
        self.max_attempts = max_attempts  # tries in all, for callers that stop; 0: no limit
        self._failures = 0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed try number ``attempt`` (1-based)."""
        ceiling = min(self.cap, self.base * self.factor ** (attempt - 1))
        return random.uniform(0.0, ceiling) if self.jitter else ceiling

    def next(self) -> float:
        """The delay after one more failure in a row."""
        self._failures += 1
        return self.delay(self._failures)

    def reset(self) -> None:
        """Success: the next failure waits ``base`` again."""
        self._failures = 0
