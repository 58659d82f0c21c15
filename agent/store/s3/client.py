"""One bucket's S3 clients: how they are configured, opened, and how every
request through them runs and fails."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from agent.backoff import Backoff
from agent.errors import ConfigError
from agent.store.retry import RetriesExhausted, retrying
from agent.store.s3.errors import Missing, failure, location

if TYPE_CHECKING:
    import aioboto3
    from aiobotocore.config import AioConfig
    from types_aiobotocore_s3 import S3Client

T = TypeVar("T")


class Connection:
    """The clients of one bucket, opened on first use, and the bound on transfers.

    ``transfers`` is held by every request that moves a blob's bytes (a
    PutObject or part of a blob, a GetObject or range of one), so uploads and
    downloads together never run more than ``concurrency`` at a time.
    """

    def __init__(
        self,
        bucket: str,
        url: str,
        *,
        concurrency: int,
        max_attempts: int,
        connect_timeout: float,
        read_timeout: float,
        backoff_base: float,
    ) -> None:
        self.bucket = bucket
        self.concurrency = concurrency
        self.transfers = asyncio.Semaphore(concurrency)
        self._url = url
        self._backoff = Backoff(backoff_base, 20.0, jitter=True, max_attempts=max_attempts)
        self._timeouts = (connect_timeout, read_timeout)
        self._clients: tuple[S3Client, S3Client] | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._open_lock = asyncio.Lock()

    @property
    def is_open(self) -> bool:
        return self._clients is not None

    def where(self, key: str | None) -> str:
        return location(self.bucket, key)

    def _client_config(
        self,
        attempts: int,
        connect_timeout: float,
        read_timeout: float,
        *,
        transfers: bool = False,
    ) -> AioConfig:
        """Client settings; ``transfers`` for the client that moves blobs.

        Plain requests are retried by botocore (standard mode: exponential
        backoff with jitter on throttling, 5xx, resets and timeouts).  Transfers
        are retried whole by ``retrying`` (a body that breaks off is beyond
        botocore), on a client that tries once, so the bound stays max_attempts.
        Blob bodies are hashed once, by us: every upload names its SHA-256 in a
        signed checksum header, so botocore neither signs the payload (it would
        read and hash every part again, in the event loop: always over plain
        HTTP, and over HTTPS too once the checksum is not its own) nor adds a
        CRC32; and downloads are verified against the digest, so botocore
        neither asks for stored checksums nor checks them as well.
        """
        from aiobotocore.config import AioConfig

        return AioConfig(
            retries={"mode": "standard", "total_max_attempts": attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=2 * self.concurrency + 8,
            user_agent_extra="studio-agent",
            s3={"payload_signing_enabled": False} if transfers else None,
            request_checksum_calculation="when_required" if transfers else None,
            response_checksum_validation="when_required" if transfers else None,
        )

    async def open(self) -> tuple[S3Client, S3Client]:
        """The client that retries by itself, and the one for transfers, which does not."""
        if self._clients is None:
            async with self._open_lock:
                if self._clients is None:
                    # The SDK takes a quarter of a second to import: off the loop.
                    session = await asyncio.to_thread(_new_session)
                    config = self._client_config(self._backoff.max_attempts, *self._timeouts)
                    raw_config = self._client_config(1, *self._timeouts, transfers=True)
                    stack = contextlib.AsyncExitStack()
                    try:
                        client = await stack.enter_async_context(
                            session.client("s3", config=config)
                        )
                        raw = await stack.enter_async_context(
                            session.client("s3", config=raw_config)
                        )
                    except BaseException as e:
                        await stack.aclose()
                        if isinstance(e, ValueError):  # botocore's word for a bad endpoint URL
                            raise ConfigError(f"cannot set up S3 for {self._url}: {e}") from e
                        raise
                    self._stack, self._clients = stack, (client, raw)
        return self._clients

    async def call(
        self,
        op: str,
        key: str | None,
        fn: Callable[[S3Client], Awaitable[T]],
        *,
        transfer: bool = False,
        detail: str = "",
    ) -> T:
        """Run one S3 operation, turning every failure into an ``AgentError``.

        ``transfer`` operations run whole under ``retrying`` on the client that
        does not retry by itself, so a body that breaks off is fetched again.
        """
        try:
            client, raw = await self.open()
            if transfer:
                return await retrying(self._backoff, lambda: fn(raw))
            return await fn(client)
        except Exception as e:
            error = failure(e, op, self.bucket, key, detail, self._backoff.max_attempts)
            if error is None:
                raise
            raise error from (e.last if isinstance(e, RetriesExhausted) else e)

    async def size_of(self, key: str) -> int | None:
        """The object's size, or None when it does not exist."""
        try:
            head = await self.call(
                "HeadObject", key, lambda c: c.head_object(Bucket=self.bucket, Key=key)
            )
        except Missing:
            return None
        return head["ContentLength"]

    async def close(self) -> None:
        stack, self._stack, self._clients = self._stack, None, None
        if stack is not None:
            await stack.aclose()


def _new_session() -> aioboto3.Session:
    import aioboto3

    return aioboto3.Session()
