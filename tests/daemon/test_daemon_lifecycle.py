"""The daemon with a stand-in IDE: real processes, real signals, the real Session and store.

Every daemon here runs on a ManualClock: probes, backoffs, kills, intervals and
budgets fire only when a test moves the clock, and what is asserted about time
is asserted in the daemon's time, so a slow machine cannot fail a test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import pytest
from daemon_helpers import (
    FakeControlPlane,
    Harness,
    eventually,
    fake_ide,
    layer_names,
    make_tree,
    read_manifest,
)

from agent.checkpoint.manifest import CheckpointState
from agent.daemon.clock import ManualClock
from agent.errors import StoreUnavailable
from agent.session import Session
from agent.settings import Settings
from agent.store.local import LocalStore

HarnessFactory = Callable[..., Awaitable[Harness]]


def _gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def _history(h: Harness) -> list[str]:
    return [t.status.value for t in h.daemon.lifecycle.history]


@pytest.fixture
def start(harness: HarnessFactory) -> HarnessFactory:
    """A daemon on a manual clock of its own."""

    async def make(settings: Settings, argv: list[str], **kw: Any) -> Harness:
        return await harness(settings, argv, clock=ManualClock(), **kw)

    return make


def _status_is(h: Harness, *wanted: str) -> Callable[[], bool]:
    return lambda: h.daemon.lifecycle.status.value in wanted


async def test_lifecycle_with_a_well_behaved_ide(
    make_settings: Callable[..., Settings],
    start: HarnessFactory,
    tmp_path: Path,
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STUDIO_CONTROL_PLANE_TOKEN", "do-not-leak")
    env_file = tmp_path / "ide.env"
    settings = make_settings(tool_path_prefix="/studio/abc/")
    h = await start(settings, fake_ide("--env-file", str(env_file)))
    await h.wait_running()

    st = await h.status()
    assert st["status"] == "running"
    assert st["ide"]["state"] == "ready" and st["ide"]["pid"] > 0
    assert st["ide"]["probe_url"] == f"http://127.0.0.1:{settings.tool_port}/studio/abc/"
    ckpt = st["session"]["checkpoint"]
    assert ckpt["name"].startswith("s1_") and ckpt["state"] == "empty"
    assert st["session"]["id"]
    assert st["restore"] is None
    assert st["resources"]["memory_used"] > 0 and st["resources"]["ide_rss"] > 0

    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    assert env["CONNECT_TOOL_PORT"] == env["STUDIO_TOOL_PORT"] == str(settings.tool_port)
    assert env["CONNECT_TOOL_PATH_PREFIX"] == env["STUDIO_TOOL_PATH_PREFIX"] == "/studio/abc/"
    assert "STUDIO_CONTROL_PLANE_TOKEN" not in env  # the agent's secrets stay with the agent

    ide_pid = st["ide"]["pid"]
    code, body = await h.request("POST", "/v1/stop")
    assert (code, body["status"]) == (202, "stopping")
    assert await h.wait_exit() == 0
    assert _history(h) == ["starting", "running", "stopping", "stopped"]
    assert _gone(ide_pid)

    refs = await LocalStore(workdir).list_refs("s1")
    assert list(refs) == [ckpt["name"]]
    manifest = await read_manifest(workdir, "s1", ckpt["name"])
    assert manifest is not None and manifest.state is CheckpointState.FINALIZED


async def test_a_502_before_readiness_keeps_the_session_starting(
    make_settings: Callable[..., Settings], start: HarnessFactory, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    gate.touch()
    h = await start(make_settings(), fake_ide("--bad-gateway-file", str(gate)))
    await eventually(lambda: h.said("listening on"), what="the IDE listening")
    # the IDE answers, but with 502: several probes must pass without the status moving
    await h.step_until(
        lambda: sum(" 502 " in ln.text for ln in h.daemon.output.tail(100)) >= 3,
        within=0.5,
        what="three 502 answers",
    )
    st = await h.status()
    assert st["status"] == "starting" and st["ide"]["state"] == "starting"
    gate.unlink()
    await h.wait_running()


async def test_a_crash_looping_ide_errors_the_session_with_its_last_output(
    make_settings: Callable[..., Settings],
    control_plane: FakeControlPlane,
    start: HarnessFactory,
) -> None:
    settings = make_settings(ide_max_restarts=3, control_plane_url=control_plane.url)
    h = await start(settings, fake_ide("--mode", "crash"))
    t0 = h.clock.monotonic()
    # restarts after 0.5 s and 1 s of backoff, then the third failure ends it
    await h.step_until(_status_is(h, "stopping", "errored"), within=1.0, what="given up")
    assert h.clock.monotonic() - t0 >= 1.5  # probes of the starting IDE may take time too
    assert await h.wait_exit() == 1
    d = h.daemon
    assert _history(h) == ["starting", "stopping", "errored"]
    assert "failed 3 times" in d.lifecycle.reason
    assert "fatal: cannot open workspace database" in d.lifecycle.reason
    assert d.supervisor is not None and d.supervisor.restarts == 2
    ide = d._ide_doc()
    assert ide.state == "failed"
    assert any("cannot open workspace database" in line for line in ide.last_output)
    await eventually(lambda: "errored" in control_plane.statuses())
    errored = [e for e in control_plane.events() if e.get("status") == "errored"][-1]
    assert "cannot open workspace database" in errored["reason"]
    assert any("workspace database" in ln for ln in errored["ide"]["last_output"])


async def test_an_ide_that_never_answers_errors_the_session(
    make_settings: Callable[..., Settings], start: HarnessFactory
) -> None:
    h = await start(make_settings(ready_timeout=1.5), fake_ide("--mode", "never-ready"))
    await eventually(lambda: h.daemon.supervisor and h.daemon.supervisor.pid, what="IDE pid")
    assert h.daemon.supervisor is not None
    pid = h.daemon.supervisor.pid
    assert pid is not None
    t0 = h.clock.monotonic()
    await h.step_until(_status_is(h, "stopping", "errored"), within=0.5, what="given up")
    assert h.clock.monotonic() - t0 == pytest.approx(1.5)  # the ready timeout, not a probe sooner
    assert await h.wait_exit() == 1
    assert _history(h) == ["starting", "stopping", "errored"]
    assert "did not answer" in h.daemon.lifecycle.reason
    assert _gone(pid)


async def test_an_ide_ignoring_sigterm_is_killed_and_the_stop_stays_in_grace(
    make_settings: Callable[..., Settings], start: HarnessFactory, workdir: Path
) -> None:
    settings = make_settings(ide_stop_timeout=1.0, stop_grace=8.0)
    h = await start(settings, fake_ide("--ignore-sigterm"))
    await h.wait_running()
    assert h.said("ignoring SIGTERM")
    st = await h.status()
    pid = st["ide"]["pid"]
    t0 = h.clock.monotonic()
    h.daemon.request_stop("test")
    sup = h.daemon.supervisor
    assert sup is not None
    await h.step_until(lambda: sup.pid is None, within=1.0, what="the IDE killed")
    assert h.clock.monotonic() - t0 == pytest.approx(1.0)  # SIGKILL after the stop timeout
    assert _gone(pid)
    assert await h.wait_exit() == 0
    assert h.clock.monotonic() - t0 < settings.stop_grace
    name = st["session"]["checkpoint"]["name"]
    manifest = await read_manifest(workdir, "s1", name)
    assert manifest is not None and manifest.state is CheckpointState.FINALIZED


async def test_an_ide_that_exits_is_restarted(
    make_settings: Callable[..., Settings], start: HarnessFactory
) -> None:
    h = await start(make_settings(), fake_ide())
    await h.wait_running()
    first = (await h.status())["ide"]["pid"]
    os.kill(first, signal.SIGKILL)
    sup = h.daemon.supervisor
    assert sup is not None
    await h.step_until(lambda: sup.restarts == 1, within=0.5, what="IDE restarted")

    async def ready() -> bool:
        ide = (await h.status())["ide"]
        return bool(ide["state"] == "ready" and ide["pid"] != first)

    await h.step_until(ready, within=0.5, what="the new IDE ready")
    st = await h.status()
    assert st["status"] == "running"
    assert st["ide"]["last_exit"] == "killed by SIGKILL"
    _, metrics = await h.get("/metrics")
    assert "studio_ide_restarts_total 1.0" in metrics


async def test_an_ide_that_stops_answering_after_restarts_errors_a_running_session(
    make_settings: Callable[..., Settings], start: HarnessFactory, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    settings = make_settings(ready_timeout=1.0, ide_max_restarts=2)
    h = await start(settings, fake_ide("--never-ready-file", str(broken)))
    await h.wait_running()
    broken.touch()  # from now on the IDE starts but never listens
    os.kill((await h.status())["ide"]["pid"], signal.SIGKILL)
    await h.step_until(_status_is(h, "stopping", "errored"), within=0.5, what="given up")
    assert await h.wait_exit() == 1
    assert _history(h) == ["starting", "running", "stopping", "errored"]
    reason = h.daemon.lifecycle.reason
    assert "failed 2 times" in reason and "did not answer within 1s" in reason


async def test_orphans_left_by_the_ide_are_adopted_and_reaped(
    make_settings: Callable[..., Settings], start: HarnessFactory, tmp_path: Path
) -> None:
    pid_file, release = tmp_path / "orphan.pid", tmp_path / "release"
    h = await start(
        make_settings(),
        fake_ide("--orphan-file", str(pid_file), "--release-file", str(release)),
    )
    await h.wait_running()
    orphan = int(await eventually(lambda: pid_file.exists() and pid_file.read_text()))
    # adopted: without the subreaper it would go to init, never to us
    await eventually(
        lambda: psutil.Process(orphan).ppid() == os.getpid(), timeout=10, what="orphan adopted"
    )
    release.touch()  # now it exits; unreaped it would stay a zombie of ours

    def reaped() -> bool:
        try:
            psutil.Process(orphan)  # a zombie is still a process
        except psutil.NoSuchProcess:
            return True
        return False

    await h.step_until(reaped, within=5.0, what="orphan reaped")  # on SIGCHLD, or the sweep
    assert h.daemon._reaper is not None and h.daemon._reaper.reaped >= 1


async def test_a_server_the_ide_daemonized_with_setsid_is_ended_at_stop(
    make_settings: Callable[..., Settings], start: HarnessFactory, tmp_path: Path
) -> None:
    pid_file = tmp_path / "server.pid"
    h = await start(make_settings(), fake_ide("--daemon-file", str(pid_file)))
    await h.wait_running()
    server = int(await eventually(lambda: pid_file.exists() and pid_file.read_text()))
    try:
        await eventually(
            lambda: psutil.Process(server).ppid() == os.getpid(), timeout=10, what="adopted"
        )
        assert os.getsid(server) != os.getsid((await h.status())["ide"]["pid"])
        h.daemon.request_stop("test")
        await h.step_until(h.task.done, within=5.0, what="stopped")  # type: ignore[union-attr]
        assert await h.wait_exit() == 0
        with pytest.raises(psutil.NoSuchProcess):  # ended, and reaped
            psutil.Process(server)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server, signal.SIGKILL)


class FlakyStore(LocalStore):
    """A local store that can be switched to fail like an unreachable S3 bucket.

    Not a real outage: run as root, the tests cannot make a directory
    unwritable, and removing the work directory only makes the store recreate
    it.  The S3 store raises exactly this error once its retries are spent.
    """

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.failing = False
        self.slow: asyncio.Event | None = None  # when set, blob transfers wait for it
        self.free_gets = 0  # blob reads allowed through before ``slow`` applies
        self.waiting = False  # a transfer is held by ``slow``

    def _check(self) -> None:
        if self.failing:
            raise StoreUnavailable("s3 bucket unreachable (simulated)")

    async def put_blob(self, src: Path, digest: str, size: int) -> None:
        self._check()
        if self.slow is not None:
            self.waiting = True
            await self.slow.wait()
        await super().put_blob(src, digest, size)

    async def set_ref(self, studio: str, name: str, digest: str, expect: str | None) -> None:
        self._check()
        await super().set_ref(studio, name, digest, expect)

    async def get_blob(
        self,
        digest: str,
        size: int | None,
        dest_dir: Path,
        *,
        verify: bool = True,
        on_data: Callable[[Path, int], None] | None = None,
    ) -> Path:
        if self.free_gets > 0:
            self.free_gets -= 1
        elif self.slow is not None:
            self.waiting = True
            await self.slow.wait()
        return await super().get_blob(digest, size, dest_dir, verify=verify, on_data=on_data)


async def test_a_failed_periodic_checkpoint_is_reported_and_retried_without_touching_the_ide(
    make_settings: Callable[..., Settings],
    control_plane: FakeControlPlane,
    start: HarnessFactory,
    root: Path,
    workdir: Path,
) -> None:
    store = FlakyStore(workdir)
    # Only the interval's checkpoints: the retry policy under test is the ticker's
    # (settled checkpoints after a failure wait for the next change, and the
    # minimum interval, instead).
    settings = make_settings(
        checkpoint_interval=300.0,
        checkpoint_min_interval=0,
        control_plane_url=control_plane.url,
    )
    # no orphan sweeps: the ticker is the only timer within the steps
    h = await start(settings, fake_ide(), store=store, reap_orphans=False)
    await h.wait_running()
    pid = (await h.status())["ide"]["pid"]

    store.failing = True
    (root / "home" / "user" / "work.txt").write_text("unsaved work\n")
    own = h.daemon.own_checkpoint
    await h.step_until(
        lambda: own.last_error and "unreachable" in own.last_error,
        within=300.0,
        what="a failed periodic checkpoint",
    )
    failed_at = h.clock.monotonic()
    st = await h.status()
    assert st["status"] == "running" and st["ide"]["pid"] == pid and st["ide"]["state"] == "ready"
    assert "unreachable" in st["session"]["checkpoint"]["last_error"]
    await eventually(
        lambda: any(e["type"] == "checkpoint_failed" for e in control_plane.events()),
        what="the control plane told",
    )
    _, metrics = await h.get("/metrics")
    assert 'studio_checkpoint_failures_total{kind="periodic"}' in metrics

    store.failing = False  # the store is back: the next tick writes the change

    async def written() -> bool:
        c = (await h.status())["session"]["checkpoint"]
        return bool(c["state"] == "interim" and c["last_error"] is None and c["changed"])

    await h.step_until(written, within=300.0, what="the retried checkpoint")
    assert h.clock.monotonic() - failed_at == pytest.approx(300.0)  # the next tick, not sooner
    st = await h.status()
    assert st["ide"]["pid"] == pid
    manifest = await read_manifest(workdir, "s1", st["session"]["checkpoint"]["name"])
    assert manifest is not None
    assert "home/user/work.txt" in await layer_names(workdir, manifest.layers[-1].digest)


async def test_nothing_is_written_when_nothing_changed(
    make_settings: Callable[..., Settings], start: HarnessFactory, workdir: Path
) -> None:
    h = await start(make_settings(checkpoint_interval=300.0), fake_ide(), reap_orphans=False)
    await h.wait_running()
    blobs = workdir / ".studios" / "checkpoints" / "blobs" / "sha256"
    before = sorted(os.listdir(blobs))
    t0 = h.clock.monotonic()
    await h.step_until(
        lambda: h.daemon.metrics.checkpoint_unchanged._value.get() >= 3,
        within=300.0,
        what="three unchanged ticks",
    )
    assert h.clock.monotonic() - t0 == pytest.approx(900.0)
    assert sorted(os.listdir(blobs)) == before
    assert (await h.status())["session"]["checkpoint"]["state"] == "empty"


async def test_a_final_checkpoint_that_cannot_finish_leaves_the_interim_one_valid(
    make_settings: Callable[..., Settings],
    control_plane: FakeControlPlane,
    start: HarnessFactory,
    root: Path,
    workdir: Path,
) -> None:
    store = FlakyStore(workdir)
    settings = make_settings(
        stop_grace=4.0, ide_stop_timeout=1.0, control_plane_url=control_plane.url
    )
    h = await start(settings, fake_ide(), store=store)
    await h.wait_running()
    (root / "home" / "user" / "a.txt").write_text("first\n")
    code, body = await h.request("POST", "/v1/checkpoints")
    assert code == 201, body
    name = body["checkpoint"]["name"]
    assert body["checkpoint"]["state"] == "interim"
    interim = await read_manifest(workdir, "s1", name)

    (root / "home" / "user" / "b.txt").write_text("second\n")
    store.slow = asyncio.Event()  # the layer upload never completes
    t0 = h.clock.monotonic()
    h.daemon.request_stop("test")
    await eventually(lambda: store.waiting, what="the final checkpoint's upload under way")
    ckpt = h.daemon.checkpointer
    assert ckpt is not None
    await h.step_until(lambda: ckpt.abandoned, within=settings.stop_grace, what="abandoned")
    assert h.clock.monotonic() - t0 == pytest.approx(
        3.6
    )  # the grace, less a margin for the last reports
    assert await h.wait_exit() == 0
    assert h.clock.monotonic() - t0 < settings.stop_grace
    assert "did not finish" in h.daemon.lifecycle.reason
    assert await read_manifest(workdir, "s1", name) == interim  # untouched, still interim
    await eventually(
        lambda: any(e["type"] == "final_checkpoint_incomplete" for e in control_plane.events())
    )
    notice = next(e for e in control_plane.events() if e["type"] == "final_checkpoint_incomplete")
    assert notice["checkpoint"]["name"] == name and notice["checkpoint"]["state"] == "interim"
    assert control_plane.statuses()[-1] == "stopped"


async def test_a_final_checkpoint_that_fails_errors_the_session(
    make_settings: Callable[..., Settings],
    control_plane: FakeControlPlane,
    start: HarnessFactory,
    root: Path,
    workdir: Path,
) -> None:
    # the work since the last checkpoint is in none: that is no clean stop
    store = FlakyStore(workdir)
    h = await start(make_settings(control_plane_url=control_plane.url), fake_ide(), store=store)
    await h.wait_running()
    (root / "home" / "user" / "a.txt").write_text("unsaved\n")
    store.failing = True
    h.daemon.request_stop("test")
    await h.step_until(h.task.done, within=5.0, what="stopped")  # type: ignore[union-attr]
    assert await h.wait_exit() == 1
    assert h.daemon.lifecycle.status.value == "errored"
    assert "the final checkpoint failed" in h.daemon.lifecycle.reason
    await eventually(lambda: control_plane.statuses()[-1:] == ["errored"], what="told")
    assert any(e["type"] == "final_checkpoint_incomplete" for e in control_plane.events())


async def test_the_next_session_restores_the_last_checkpoint(
    make_settings: Callable[..., Settings],
    control_plane: FakeControlPlane,
    start: HarnessFactory,
    root: Path,
    tmp_path: Path,
) -> None:
    h1 = await start(make_settings(), fake_ide())
    await h1.wait_running()
    (root / "home" / "user" / "notes.txt").write_text("keep me\n")
    (root / "etc" / "hostname").unlink()
    h1.daemon.request_stop("test")
    assert await h1.wait_exit() == 0
    first = h1.daemon.own_checkpoint.info
    assert first is not None and first.state is CheckpointState.FINALIZED

    fresh = tmp_path / "root2"
    make_tree(fresh)
    h2 = await start(make_settings(root=fresh, control_plane_url=control_plane.url), fake_ide())
    await h2.wait_running()
    assert (fresh / "home" / "user" / "notes.txt").read_text() == "keep me\n"
    assert not (fresh / "etc" / "hostname").exists()
    st = await h2.status()
    assert st["session"]["restored"]["name"] == first.name
    assert st["session"]["checkpoint"]["name"] != first.name
    running = next(e for e in control_plane.events() if e.get("status") == "running")
    assert running["session"]["restored"]["name"] == first.name


async def test_a_failed_restore_errors_the_session(
    make_settings: Callable[..., Settings],
    control_plane: FakeControlPlane,
    start: HarnessFactory,
) -> None:
    settings = make_settings(restore_from="no-such-checkpoint", control_plane_url=control_plane.url)
    h = await start(settings, fake_ide())
    assert await h.wait_exit() == 1
    assert _history(h) == ["starting", "errored"]
    assert "restore failed" in h.daemon.lifecycle.reason
    assert h.daemon.supervisor is None  # the IDE never started on a half-restored root
    await eventually(lambda: control_plane.statuses() == ["starting", "errored"])


async def test_restore_progress_is_shown_and_a_stop_during_restore_ends_in_grace(
    make_settings: Callable[..., Settings],
    start: HarnessFactory,
    root: Path,
    workdir: Path,
    tmp_path: Path,
) -> None:
    # a checkpoint with content to restore
    big = root / "home" / "user" / "big.bin"
    big.write_bytes(os.urandom(1 << 20))
    settings = make_settings()
    session = Session(settings, LocalStore(workdir))
    await session.start()
    for _ in range(2):  # two layers
        big.write_bytes(os.urandom(1 << 20))
        await session.checkpoint(state=CheckpointState.FINALIZED)

    fresh = tmp_path / "root2"
    make_tree(fresh)
    store = FlakyStore(workdir)
    store.free_gets = 2  # the manifest and the newest layer; then downloads hang
    store.slow = asyncio.Event()
    h = await start(make_settings(root=fresh, stop_grace=5.0), fake_ide(), store=store)

    async def progress() -> dict[str, Any] | None:
        st = await h.status()
        return st["restore"] if st["status"] == "starting" and st["restore"] else None

    shown = await eventually(progress, what="restore progress in the status")
    assert shown["phase"] == "download"
    assert 0 < shown["bytes_done"] < shown["bytes_total"]
    t0 = h.clock.monotonic()
    h.daemon.request_stop("test")
    assert await h.wait_exit() == 0
    assert h.clock.monotonic() == t0  # the hung download was not waited for, not even a timer
    assert _history(h) == ["starting", "stopping", "stopped"]
    assert "during restore" in h.daemon.lifecycle.reason


async def test_unsound_interim_checkpoints_are_reported_as_invalidated(
    make_settings: Callable[..., Settings],
    control_plane: FakeControlPlane,
    start: HarnessFactory,
    root: Path,
    workdir: Path,
    tmp_path: Path,
) -> None:
    # a session that wrote an interim checkpoint and died; then its layer went missing
    settings = make_settings()
    session = Session(settings, LocalStore(workdir))
    await session.start()
    (root / "home" / "user" / "x.txt").write_text("x\n")
    result = await session.checkpoint(state=CheckpointState.INTERIM)
    assert result is not None
    blob = workdir / ".studios" / "checkpoints" / "blobs" / "sha256"
    manifest = await read_manifest(workdir, "s1", result.info.name)
    assert manifest is not None
    (blob / manifest.layers[-1].digest.split(":")[1]).unlink()

    fresh = tmp_path / "root2"
    make_tree(fresh)
    h = await start(make_settings(root=fresh, control_plane_url=control_plane.url), fake_ide())
    await h.wait_running()
    st = await h.status()
    assert [i["name"] for i in st["session"]["invalidated"]] == [result.info.name]
    assert st["session"]["invalidated"][0]["state"] == "invalid"
    notice = await eventually(
        lambda: next(
            (e for e in control_plane.events() if e["type"] == "checkpoints_invalidated"), None
        )
    )
    assert notice["invalidated"][0]["name"] == result.info.name
