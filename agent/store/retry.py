"""Retries for the S3 requests botocore cannot retry by itself.

botocore retries a request until its response arrives; it cannot retry what
happens after that (a download whose body breaks off halfway) or redo work
that spans more than one request.  The store runs those with
``retrying``, classifying failures the way botocore's standard mode does so
that both kinds of retry agree on what is transient.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from botocore.exceptions import (
    ClientError,
    FlexibleChecksumError,
    HTTPClientError,
    IncompleteReadError,
    ResponseStreamingError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from agent.backoff import Backoff

T = TypeVar("T")

# The codes and statuses botocore's standard retry mode treats as transient.
THROTTLING_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
    }
)
TRANSIENT_CODES = frozenset(
    {"RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete", "InternalError"}
)
TRANSIENT_STATUSES = frozenset({500, 502, 503, 504})

# What a broken connection, a reset, a timeout or bytes damaged in transit look
# like once they reach us (and aiohttp's ClientError, see ``is_transient``).
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    BotoConnectionError,
    FlexibleChecksumError,
    HTTPClientError,
    IncompleteReadError,
    ResponseStreamingError,
    asyncio.TimeoutError,
    ConnectionError,
)


class TruncatedBody(Exception):
    """A response body ended before its announced length (the connection broke)."""


class RetriesExhausted(Exception):
    """Every try of an operation failed transiently; ``last`` is the final error."""

    def __init__(self, attempts: int, last: BaseException) -> None:
        super().__init__(f"{attempts} tries failed; last: {last}")
        self.attempts = attempts
        self.last = last


def error_code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def http_status(e: ClientError) -> int:
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def is_transient(e: BaseException) -> bool:
    """Whether trying again may succeed: throttling, 5xx, resets and timeouts."""
    if isinstance(e, ClientError):
        code = error_code(e)
        return (
            code in THROTTLING_CODES
            or code in TRANSIENT_CODES
            or http_status(e) in TRANSIENT_STATUSES
        )
    import aiohttp  # loaded with the client already; not worth loading before

    return isinstance(e, (*TRANSIENT_ERRORS, TruncatedBody, aiohttp.ClientError))


async def retrying(backoff: Backoff, attempt_fn: Callable[[], Awaitable[T]]) -> T:
    """Run ``attempt_fn`` until it succeeds, fails for good, or tries run out.

    A non-transient error is raised as it is; running out of tries raises
    ``RetriesExhausted`` so the caller can name the operation in its message.
    """
    attempt = 1
    while True:
        try:
            return await attempt_fn()
        except Exception as e:
            if not is_transient(e):
                raise
            if 0 < backoff.max_attempts <= attempt:
                raise RetriesExhausted(attempt, e) from e
        await asyncio.sleep(backoff.delay(attempt))
        attempt += 1
