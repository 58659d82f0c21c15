"""The daemon's pieces alone: clock, lifecycle, ring buffer, resources, ticker, restart backoff."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from daemon_helpers import eventually, fake_ide

from agent.backoff import Backoff
from agent.checkpoint.manifest import CheckpointState
from agent.daemon.checkpointer import Checkpointer, Kind, StopBudget, state_for
from agent.daemon.clock import ManualClock, with_timeout
from agent.daemon.lifecycle import Lifecycle, Status, Transition
from agent.daemon.main import ide_environment, probe_url
from agent.daemon.metrics import Metrics
from agent.daemon.resources import cgroup_cpu_limit, cgroup_memory, tree_rss
from agent.daemon.supervisor import IdeFailed, IdeState, RingBuffer, Supervisor
from agent.session import CheckpointInfo, Session
from agent.settings import Settings
from agent.store.local import LocalStore


async def test_the_manual_clock_wakes_sleepers_in_order_only_when_advanced() -> None:
    clock = ManualClock()
    woke: list[str] = []

    async def sleeper(name: str, s: float) -> None:
        await clock.sleep(s)
        woke.append(name)

    tasks = [asyncio.create_task(sleeper(n, s)) for n, s in (("b", 20), ("a", 10))]
    await clock.wait_for_sleepers(2)
    await clock.advance(9.9)
    assert woke == []
    await clock.advance(10.1)
    assert woke == ["a", "b"]
    await asyncio.gather(*tasks)

    with pytest.raises(TimeoutError):
        waiter = asyncio.create_task(with_timeout(clock, 5, asyncio.Event().wait()))
        await clock.wait_for_sleepers(1)
        await clock.advance(5)
        await waiter


def test_backoff_doubles_to_a_cap_and_resets() -> None:
    b = Backoff(0.5, 4.0)
    assert [b.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    b.reset()
    assert b.next() == 0.5


def test_statuses_only_move_forward() -> None:
    lc = Lifecycle(ManualClock())
    seen: list[Transition] = []
    lc.subscribe(seen.append)
    assert lc.move(Status.RUNNING, "ready")
    assert not lc.move(Status.STARTING, "late report")  # backwards: refused
    assert not lc.move(Status.RUNNING, "again")  # sideways: refused
    assert lc.move(Status.STOPPING, "sigterm")
    assert lc.move(Status.ERRORED, "final checkpoint failed")
    assert not lc.move(Status.STOPPED, "too late")  # terminal
    assert [t.status for t in seen] == [Status.RUNNING, Status.STOPPING, Status.ERRORED]
    assert seen[1].previous is Status.RUNNING
    assert lc.history[0].status is Status.STARTING


async def test_the_ring_buffer_is_bounded_and_wakes_followers() -> None:
    ring = RingBuffer(ManualClock(), max_lines=3, max_line=10)
    for i in range(5):
        ring.append("stdout", f"line {i}")
    assert [ln.text for ln in ring.tail(10)] == ["line 2", "line 3", "line 4"]
    ring.append("stderr", "x" * 50)
    assert ring.tail(1)[0].text == "x" * 10 + "...[truncated]"
    seq = ring.last_seq
    waiter = asyncio.create_task(ring.wait_after(seq))
    await asyncio.sleep(0)
    assert not waiter.done()
    ring.append("stdout", "new")
    assert await waiter is True
    assert [ln.text for ln in ring.after(seq)] == ["new"]
    ring.close()
    assert await ring.wait_after(ring.last_seq) is False


def test_cgroup_v2_and_v1_limits(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("8589934592\n")
    (v2 / "memory.current").write_text("1048576\n")
    (v2 / "cpu.max").write_text("200000 100000\n")
    assert cgroup_memory(v2) == (1048576, 8 << 30)
    assert cgroup_cpu_limit(v2) == 2.0
    (v2 / "memory.max").write_text("max\n")
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cgroup_memory(v2) == (1048576, None)
    assert cgroup_cpu_limit(v2) is None

    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "cpu").mkdir()
    (v1 / "memory" / "memory.limit_in_bytes").write_text(str(4 << 30))
    (v1 / "memory" / "memory.usage_in_bytes").write_text("4096")
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("150000")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert cgroup_memory(v1) == (4096, 4 << 30)
    assert cgroup_cpu_limit(v1) == 1.5
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712")
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1")
    assert cgroup_memory(v1) == (4096, None)
    assert cgroup_cpu_limit(v1) is None
    assert cgroup_memory(tmp_path / "none") == (None, None)


def test_tree_rss_of_a_gone_process_is_zero() -> None:
    assert tree_rss(None) == 0
    assert tree_rss(2**22 + 12345) == 0


@pytest.mark.parametrize(
    ("prefix", "ready", "url"),
    [
        ("/", "/", "http://127.0.0.1:8080/"),
        ("/", "/api", "http://127.0.0.1:8080/api"),
        ("/s/abc/", "/", "http://127.0.0.1:8080/s/abc/"),
        ("/s/abc", "/api/status", "http://127.0.0.1:8080/s/abc/api/status"),
        ("s/abc/", "lab", "http://127.0.0.1:8080/s/abc/lab"),
    ],
)
def test_probe_url(
    make_settings: Callable[..., Settings], prefix: str, ready: str, url: str
) -> None:
    s = make_settings(tool_port=8080, tool_path_prefix=prefix, ready_path=ready)
    assert probe_url(s) == url


def test_the_ide_gets_tool_variables_and_not_the_agents_secrets(
    make_settings: Callable[..., Settings],
) -> None:
    s = make_settings(tool_port=3000, tool_path_prefix="/p/")
    env = ide_environment(
        s, {"PATH": "/bin", "STUDIO_API_TOKEN": "a", "STUDIO_CONTROL_PLANE_TOKEN": "b"}
    )
    assert env == {
        "PATH": "/bin",
        "STUDIO_TOOL_PORT": "3000",
        "CONNECT_TOOL_PORT": "3000",
        "STUDIO_TOOL_PATH_PREFIX": "/p/",
        "CONNECT_TOOL_PATH_PREFIX": "/p/",
    }


class _Reports:
    def __init__(self) -> None:
        self.said: list[str] = []

    def checkpoint_failed(self, reason: str) -> None:
        self.said.append(reason)

    def final_checkpoint_failed(self, reason: str) -> None:
        self.said.append(reason)

    def final_checkpoint_abandoned(self, reason: str, kept: CheckpointInfo | None) -> None:
        self.said.append(reason)


def test_the_state_a_checkpoint_gets() -> None:
    interim, final = CheckpointState.INTERIM, CheckpointState.FINALIZED
    assert state_for(Kind.PERIODIC) is interim
    assert state_for(Kind.MANUAL, own=True) is interim  # the final checkpoint follows
    assert state_for(Kind.MANUAL, own=False) is final  # nothing will finalize another name
    assert state_for(Kind.FINAL) is final
    assert state_for(Kind.COMMAND) is final


async def test_the_stop_budget_shares_the_grace_out() -> None:
    clock = ManualClock()
    budget = StopBudget(clock, 30.0, clock.monotonic())
    assert budget.left() == 28.0  # a margin for the last event and the exit
    assert budget.ide_stop(10.0) == 10.0 and budget.ide_stop(20.0) == 14.0
    await clock.advance(10.0)
    assert budget.left() == 18.0 and budget.ide_wait() == 4.5
    # the last events get a small share, not what is left of the grace
    assert budget.report() == StopBudget.REPORT_SHARE == 1.5
    await clock.advance(18.5)
    assert budget.report() == 1.0  # 0.5 s before the SIGKILL at most
    await clock.advance(11.5)
    assert budget.left() == 0.0 and budget.ide_wait() == 1.0 and budget.report() == 0.2


async def test_periodic_checkpoints_follow_the_interval_and_skip_when_unchanged(
    make_settings: Callable[..., Settings], root: Path, workdir: Path
) -> None:
    clock = ManualClock()
    settings = make_settings()
    session = Session(settings, LocalStore(workdir))
    await session.start()
    metrics = Metrics()
    reports = _Reports()
    ckpt = Checkpointer(session, clock=clock, metrics=metrics, interval=300.0, reports=reports)
    await ckpt.start()
    assert ckpt.own.info is not None and ckpt.own.info.state is CheckpointState.EMPTY
    registry = metrics.registry

    def unchanged() -> float:
        return registry.get_sample_value("studio_checkpoint_unchanged_total") or 0.0

    def written() -> float:
        v = registry.get_sample_value(
            "studio_checkpoint_duration_seconds_count", {"kind": "periodic"}
        )
        return v or 0.0

    ticker = asyncio.create_task(ckpt.run_periodic())
    try:
        await clock.wait_for_sleepers()
        await clock.advance(299.0)
        assert (unchanged(), written()) == (0, 0)  # not yet
        await clock.advance(1.0)
        await eventually(lambda: unchanged() == 1, what="an unchanged tick")
        assert written() == 0  # nothing changed: nothing written

        (root / "home" / "user" / "new.txt").write_text("new\n")
        await clock.wait_for_sleepers()
        await clock.advance(300.0)
        await eventually(lambda: written() == 1, what="a checkpoint written")
        info = ckpt.own.info
        assert info is not None and info.state is CheckpointState.INTERIM
        assert ckpt.own.changed and ckpt.own.changed >= 1
        assert reports.said == []
    finally:
        ticker.cancel()
        await asyncio.gather(ticker, return_exceptions=True)


async def test_restarts_wait_out_an_exponential_backoff_then_give_up(tmp_path: Path) -> None:
    clock = ManualClock()
    restarted: list[int] = []
    sup = Supervisor(
        fake_ide("--mode", "crash"),
        {"PATH": "/usr/bin:/bin", "CONNECT_TOOL_PORT": "1"},
        "http://127.0.0.1:1/",
        clock=clock,
        output=RingBuffer(clock),
        ready_timeout=60.0,
        stop_timeout=1.0,
        max_failures=3,
        failure_window=3600.0,
        backoff=Backoff(5.0, 60.0),
        on_restart=lambda: restarted.append(1),
    )
    task = asyncio.create_task(sup.run())
    for delay in (5.0, 10.0):
        await eventually(lambda: sup.state is IdeState.BACKOFF, what="crashed, backing off")
        await clock.wait_for_sleepers()
        n = len(restarted)
        await clock.advance(delay - 0.1)
        assert sup.state is IdeState.BACKOFF and len(restarted) == n
        await clock.advance(0.1)
        want = n + 1
        await eventually(lambda: len(restarted) == want, what="restarted")  # noqa: B023
    with pytest.raises(IdeFailed) as failed:
        await asyncio.wait_for(task, 30)
    assert sup.state is IdeState.FAILED and sup.restarts == 2
    assert "failed 3 times" in str(failed.value)
    assert any("workspace database" in line for line in failed.value.last_output)


async def test_an_ide_that_cannot_be_spawned_counts_as_a_failed_start() -> None:
    clock = ManualClock()
    sup = Supervisor(
        [sys.executable + "-does-not-exist"],
        {},
        "http://127.0.0.1:1/",
        clock=clock,
        output=RingBuffer(clock),
        ready_timeout=60.0,
        stop_timeout=1.0,
        max_failures=1,
        failure_window=60.0,
    )
    with pytest.raises(IdeFailed) as failed:
        await asyncio.wait_for(sup.run(), 30)
    assert "cannot start the IDE" in failed.value.last_output[-1]
