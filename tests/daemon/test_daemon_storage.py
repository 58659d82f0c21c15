"""The daemon's part in bounded storage: DELETE on the local API, sizes in the
listing, and the session lease renewed while it runs and dropped at a clean stop."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from daemon_helpers import Harness, fake_ide

from agent.daemon.clock import ManualClock
from agent.session.lease import SESSION_RENEW, SESSIONS, SessionLeaseDoc
from agent.settings import Settings
from agent.store.local import LocalStore

HarnessFactory = Callable[..., Awaitable[Harness]]


async def _leases(store: LocalStore) -> list[SessionLeaseDoc]:
    docs = []
    for name in await store.list_leases(SESSIONS):
        lease = await store.get_lease(name)
        if lease is not None:
            docs.append(SessionLeaseDoc.decode(lease.body))
    return docs


async def test_delete_through_the_api_and_sizes_in_the_listing(
    make_settings: Callable[..., Settings], harness: HarnessFactory, root: Path
) -> None:
    h = await harness(make_settings(), fake_ide())
    await h.wait_status("running")
    (root / "home" / "user" / "big.bin").write_bytes(b"x" * 100_000)
    code, res = await h.request("POST", "/v1/checkpoints", json={"name": "keep"})
    assert code == 201, res
    (root / "home" / "user" / "other.bin").write_bytes(b"y" * 50_000)
    code, res = await h.request("POST", "/v1/checkpoints", json={"name": "drop"})
    assert code == 201, res

    code, listing = await h.get("/v1/checkpoints")
    assert code == 200
    by_name = {c["name"]: c for c in listing["checkpoints"]}
    assert by_name["drop"]["frees"] > 0  # its own manifest and newest layer
    assert all(isinstance(c["frees"], int) for c in by_name.values())

    code, body = await h.request("DELETE", "/v1/checkpoints/drop")
    assert code == 204, body
    code, listing = await h.get("/v1/checkpoints")
    assert "drop" not in {c["name"] for c in listing["checkpoints"]}
    code, err = await h.request("DELETE", "/v1/checkpoints/drop")
    assert code == 404 and "no checkpoint 'drop'" in err["error"], err


async def test_the_lease_is_renewed_while_running_and_released_at_a_clean_stop(
    make_settings: Callable[..., Settings], harness: HarnessFactory, workdir: Path
) -> None:
    store = LocalStore(workdir)
    h = await harness(make_settings(), fake_ide(), clock=ManualClock())
    await h.wait_running()
    first = await _leases(store)
    assert len(first) == 1, first
    written: Any = first[0].written

    def renewed() -> bool:
        docs = [d for d in _read_leases(workdir) if d.holder == first[0].holder]
        return bool(docs) and docs[0].written > written

    await h.step_until(renewed, within=SESSION_RENEW, what="the lease renewed")

    h.daemon.request_stop("test")
    assert h.task is not None
    # within a few seconds: the final checkpoint's budget is never jumped over
    await h.step_until(h.task.done, within=5.0, what="the daemon stopped")
    assert h.daemon.lifecycle.status.value == "stopped"
    assert await _leases(store) == []  # only refs keep the session's blobs now


def _read_leases(workdir: Path) -> list[SessionLeaseDoc]:
    top = (
        workdir / ".studios" / "checkpoints" / "leases" / SESSIONS
    )  # as the local store keeps them
    return [
        SessionLeaseDoc.decode(p.read_bytes())
        for p in top.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    ]
