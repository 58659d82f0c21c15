"""Refs are hostile input: whatever an object under refs/ holds, reading it is a
one-line error, a listing skips it with a warning naming it, and one bad ref
never stops the default restore from taking the latest good checkpoint."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from fsutil import settings_for
from s3_server import S3Endpoint

from agent.session import Session
from agent.store.base import Store
from agent.store.local import LocalStore
from agent.store.refs import InvalidRef
from agent.store.s3 import S3Store

GOOD_DIGEST = "sha256:" + "ab" * 32
BAD = {
    "empty-object": b"{}",
    "array": b"[]",
    "not-json": b"not json at all",
    "bad-time": b'{"digest": "%s", "updated": "yesterday"}' % GOOD_DIGEST.encode(),
    "naive-time": b'{"digest": "%s", "updated": "2024-01-01T00:00:00"}' % GOOD_DIGEST.encode(),
    "path-digest": b'{"digest": "sha256:../../x", "updated": "2024-01-01T00:00:00Z"}',
    "deep": b"[" * 3000 + b"]" * 3000,
    "number-digest": b'{"digest": 7, "updated": "2024-01-01T00:00:00Z"}',
}


def plant_ref(store: Store, s3: S3Endpoint | None, studio: str, name: str, data: bytes) -> None:
    """Write an object under refs/ behind the store's back, as anyone with the
    work directory's credentials could."""
    if isinstance(store, LocalStore):
        d = store.root / "refs" / studio
        d.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)
    else:
        assert isinstance(store, S3Store) and s3 is not None
        key = store.url.removeprefix(f"s3://{store.bucket}/") + f"/refs/{studio}/{name}"
        s3.admin.put_object(Bucket=store.bucket, Key=key, Body=data)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def warnings() -> Iterator[list[logging.LogRecord]]:
    logger = logging.getLogger("studio_agent")
    handler, level = Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def test_bad_refs_are_one_line_errors_and_skipped_when_listed(
    any_store: Store, s3: S3Endpoint | None, warnings: list[logging.LogRecord]
) -> None:
    await any_store.set_ref("s1", "good", GOOD_DIGEST, None)
    for name, data in BAD.items():
        plant_ref(any_store, s3, "s1", name, data)
    plant_ref(any_store, s3, "s1", "huge", b"{" + b" " * 100_000 + b"}")

    assert set(await any_store.list_refs("s1")) == {"good"}
    skipped = {r.fields["ref"] for r in warnings if r.getMessage() == "ref.skipped"}  # type: ignore[attr-defined]
    assert skipped == {f"s1/{n}" for n in [*BAD, "huge"]}

    for name in [*BAD, "huge"]:
        with pytest.raises(InvalidRef) as e:
            await any_store.get_ref("s1", name)
        message = str(e.value)
        assert "\n" not in message and f"s1/{name}" in message and "not a valid ref" in message


async def test_a_bad_ref_does_not_stop_the_default_restore(tmp_path: Path) -> None:
    live, work = tmp_path / "live", tmp_path / "work"
    (live / "etc").mkdir(parents=True)
    writer = Session(settings_for(live, work, tmp_path / "st"), LocalStore(work))
    await writer.baseline()
    (live / "etc/config").write_text("restored")
    await writer.checkpoint("good")
    store = LocalStore(work)
    for name, data in BAD.items():
        plant_ref(store, None, "s", name, data)

    target = tmp_path / "target"
    target.mkdir()
    restorer = Session(settings_for(target, work, tmp_path / "st2"), store)
    outcome = await restorer.start()
    assert outcome.restored is not None and outcome.restored.name == "good"
    assert (target / "etc/config").read_text() == "restored"
    assert [c.name for c in await restorer.list_checkpoints()] == ["good"]
