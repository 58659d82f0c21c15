"""The million-file workloads W1 to W4 and the S3 comparison, as one table of targets.

    .venv/bin/python bench/workloads.py [--quick] [--rounds N] [--only W1,W2,W3,W4,S3]
                                        [--json FILE] [--scratch DIR]

- W1, a real install (a copy of this interpreter's site-packages): checkpoint
  and restore against ``tar | zstd`` and restic (``checkpoint_bench.py``); as
  root, every restore on a new filesystem of its own, a tmpfs (a fast disk) and
  a slow disk (``disks.py``), else in the scratch directory.
- W2, 1,000,000 files of 0 to 4 KiB in 10,000 directories: with the one-shot
  CLI the baseline, a checkpoint with nothing changed and one after the 1%
  change, each against ``restic backup`` (``many_files.py``), and a checkpoint
  of the whole tree restored into an empty root; under ``studio-agent run`` the
  periodic checkpoint after the 1% change, and one through the API with
  nothing changed.  Peak RSS of every agent process.
- W3, ``studio-agent run`` on 200,000 files, 100 MB edited across 1,000 of them,
  then SIGTERM: seconds from the signal to the exit, final checkpoint included.
- W4, ``studio-agent run`` on the W2 root for ten minutes with
  ``checkpoint_interval`` 60, a small change in a few of them: CPU of the
  agent's process tree, its peak RSS, and a checkpoint for every changed minute.
- S3, W1's checkpoint through the S3 store against ``tar | zstd | aws s3 cp``
  on the same local moto server (``bench.s3_pipeline``, "n/a" where absent).

``--quick`` (under two minutes on two cores) scales W2 and W4's root to 50,000
files, W3 to 20,000 files and 10 MB, W4 to one minute, W1 to a 60 MB part of
the tree; it runs one round, no warm-up, no whole-tree checkpoint of W2, and
works in tmpfs (``/dev/shm``) where it can.  Nothing is committed: the trees
are generated below ``--scratch`` (default: a temporary directory, deleted at
the end; a given one is kept, and its generated trees are used again).
The daemon's settings go through the
environment, so the change watch's (``change_watch``,
``checkpoint_min_interval``) apply where this checkout has them and are
ignored where it does not; a field the daemon does not report shows "n/a".
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for _p in (str(BENCH), str(REPO)):  # siblings by name; the agent and bench.* as packages
    if _p not in sys.path:
        sys.path.insert(0, _p)

import checkpoint_bench  # noqa: E402
import disks  # noqa: E402
import many_files  # noqa: E402
from daemon_run import DaemonRun  # noqa: E402
from ratio_table import Report, Row  # noqa: E402

WORKLOADS = ("W1", "W2", "W3", "W4", "S3")
MAX_SIZE = 4096  # W2's files: 0 to 4 KiB
OTHER_KINDS = frozenset({"manual", "final", "command"})  # the rest are the daemon's own


@dataclass(frozen=True)
class Sizes:
    w1_limit_mb: int | None  # None: the whole source
    w1_rounds: int | None  # None: --rounds
    w1_warmup: int
    w1_disks: tuple[str, ...]  # where W1's restores write, as root (see disks.py)
    w2_files: int
    w2_dirs: int
    w2_whole_tree: bool  # a checkpoint of the whole tree and its restore (for their memory)
    w2d_interval: float  # the daemon's checkpoint_interval while W2 measures it
    w3_files: int
    w3_dirs: int
    w3_edit_mb: int
    w3_edit_files: int
    w4_seconds: float
    w4_change_minutes: tuple[int, ...]  # counted in intervals, from 1
    w4_lead: float  # seconds into a minute its change is written
    w4_interval: float = 60.0  # checkpoint_interval: the "minute"


FULL = Sizes(
    w1_limit_mb=None, w1_rounds=None, w1_warmup=1, w1_disks=("tmpfs", "slow"),
    w2_files=1_000_000, w2_dirs=10_000, w2_whole_tree=True, w2d_interval=20.0,
    w3_files=200_000, w3_dirs=2_000, w3_edit_mb=100, w3_edit_files=1_000,
    w4_seconds=600.0, w4_change_minutes=(1, 2, 5, 8), w4_lead=20.0,
)  # fmt: skip
QUICK = Sizes(
    w1_limit_mb=60, w1_rounds=1, w1_warmup=0, w1_disks=("tmpfs",),
    w2_files=50_000, w2_dirs=500, w2_whole_tree=False, w2d_interval=3.0,
    w3_files=20_000, w3_dirs=200, w3_edit_mb=10, w3_edit_files=100,
    w4_seconds=60.0, w4_change_minutes=(1,), w4_lead=3.0,
)  # fmt: skip


_T0 = time.perf_counter()


def say(text: str) -> None:
    """Progress on stderr, stamped with the seconds since the start."""
    print(f"[{time.perf_counter() - _T0:6.1f} s] {text}", file=sys.stderr, flush=True)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# -- generated trees ----------------------------------------------------------------


def generated_root(where: Path, files: int, dirs: int) -> Path:
    """A root of ``files`` files of 0 to 4 KiB in ``dirs`` directories, made once."""
    return many_files.generated_root(where, files, dirs, MAX_SIZE)


# -- W1 ---------------------------------------------------------------------------------


DISK_LABELS = {
    "scratch": "",
    "tmpfs": ", on a new tmpfs (a fast disk)",
    "slow": ", on a new slow disk (sync-mounted, direct I/O)",
}


def w1_disks(sz: Sizes, scratch: Path) -> tuple[str, ...]:
    """Where W1's restores write: a new filesystem for each where this process may
    mount one (root, and allowed to); else the scratch directory, where a restore
    soon after mass deletion pays ext4's inode allocator (see disks.py)."""
    if os.geteuid() != 0 or not shutil.which("mkfs.ext4"):
        return ("scratch",)
    probe = disks.Disks("tmpfs", scratch)
    try:
        probe.new("probe")
    except (OSError, subprocess.CalledProcessError):
        say("W1: cannot mount a filesystem here; restores go to the scratch directory")
        return ("scratch",)
    finally:
        probe.release()
    return sz.w1_disks


def w1(sz: Sizes, rounds: int, scratch: Path, source: Path) -> tuple[list[Row], Path]:
    say("W1: a real install against tar | zstd and restic")
    limit = sz.w1_limit_mb * 1_000_000 if sz.w1_limit_mb else None
    kinds = w1_disks(sz, scratch / "w1")
    r = checkpoint_bench.measure(
        source, scratch / "w1", sz.w1_rounds or rounds, sz.w1_warmup, limit_bytes=limit,
        restore_disks=kinds,
    )  # fmt: skip
    t = r.times
    tree = f"{r.files} files, {r.size / 1e6:.0f} MB"
    on = checkpoint_bench.on

    def ref(key: str) -> list[float]:
        return t.get(key, [])

    rows = [
        Row("W1", f"checkpoint, whole tree new ({tree})", "s", t["checkpoint"], 1.0,
            reference=t["tar_zstd"], ref_label="`tar -c | zstd -3 -T0`"),
    ]  # fmt: skip
    for kind in kinds:
        what = f"restore into an empty root{DISK_LABELS[kind]}"
        rows += [
            Row("W1", what, "s", t[on("restore", kind)], 1.0,
                reference=t[on("untar", kind)], ref_label="`zstd -d | tar -x`"),
            Row("W1", what, "s", t[on("restore", kind)], 0.8,
                reference=ref(on("restic_restore", kind)), ref_label="`restic restore`"),
        ]  # fmt: skip
    rows += [
        Row("W1", "layer size", "MB", [r.layer_bytes / 1e6], 1.02,
            reference=[r.tar_zst_bytes / 1e6], ref_label="the tar.zst"),
        Row("W1", "checkpoint, nothing changed", "s", t["checkpoint_unchanged"], 0.2,
            reference=ref("restic_backup_unchanged"), ref_label="`restic backup`"),
    ]  # fmt: skip
    return rows, r.tree


# -- W2 ---------------------------------------------------------------------------------


def w2_cli(
    sz: Sizes, rounds: int, root: Path, scratch: Path, restic: bool
) -> tuple[list[Row], dict[str, float]]:
    """The one-shot CLI rows, and the peak RSS (MB) of each kind of process."""
    say(f"W2: {sz.w2_files} files, one-shot CLI" + (" against restic" if restic else ""))
    t = many_files.measure(
        root, scratch, {"ours": REPO}, rounds, restic,
        change=(sz.w2_files, sz.w2_dirs, MAX_SIZE), restore=sz.w2_whole_tree,
    )  # fmt: skip
    steps = [("baseline", "baseline"), ("nothing changed", "unchanged"), ("1%", "changed")]
    if sz.w2_whole_tree:
        steps += [("whole tree", "whole"), ("restore", "restore")]
    rss = {step: max(t[f"ours {key} MB"]) for step, key in steps}
    ref = "`restic backup`"
    rows = [
        Row("W2", "baseline, one-shot CLI", "s", t["ours baseline s"], 10.0, op="<"),
        Row("W2", "checkpoint, nothing changed, one-shot CLI", "s", t["ours unchanged s"], 0.1,
            reference=t.get("restic unchanged s", []), ref_label=ref),
        Row("W2", "checkpoint after the 1% change, one-shot CLI", "s", t["ours changed s"], 0.1,
            reference=t.get("restic changed s", []), ref_label=ref),
    ]  # fmt: skip
    if sz.w2_whole_tree:
        whole, restore = t["ours whole s"][0], t["ours restore s"][0]
        rows[0].note = f"whole tree: checkpoint {whole:.1f} s, restore {restore:.1f} s"
    return rows, rss


def _scan_of(d: DaemonRun, *docs: dict[str, Any]) -> str:
    """Whether a checkpoint walked the root ("full") or the watch's paths ("watch")."""
    for doc in docs:
        for where in (doc, doc.get("checkpoint") or {}):
            if isinstance(where, dict) and where.get("scan"):
                return str(where["scan"])
    try:
        own = d.request("GET", "/v1/status", timeout=30)["session"]["checkpoint"]
        return str(own.get("scan") or "n/a")
    except (OSError, RuntimeError, KeyError):
        return "n/a"


def w2_daemon(sz: Sizes, rounds: int, root: Path, scratch: Path) -> tuple[list[Row], float]:
    """The daemon's periodic checkpoint after the 1% change, and an API one with
    nothing changed, ``rounds`` times in one session; and the daemon's peak RSS."""
    say(f"W2: {sz.w2_files} files under studio-agent run")
    p = sz.w2d_interval
    settings = {
        "checkpoint_interval": f"{p:g}", "checkpoint_min_interval": f"{p:g}",
        "log_level": "debug",  # the ticks with nothing to do show as checkpoint.unchanged
    }  # fmt: skip
    shutil.rmtree(scratch / "w2d-work", ignore_errors=True)
    shutil.rmtree(scratch / "w2d-state", ignore_errors=True)
    periodic: list[float] = []
    unchanged: list[float] = []
    trips: list[float] = []
    scans_p: list[str] = []
    scans_u: list[str] = []
    changed: list[int] = []
    ticks = ("checkpoint.done", "checkpoint.unchanged")
    with DaemonRun(root, scratch, "w2d", settings) as d:
        up = d.wait_running()
        say(f"  daemon running after {up:.1f} s")
        for i in range(rounds):
            # Just after a tick (the first comes an interval after the start), so
            # that the change is whole before the next one; a daemon that logs no
            # tick with nothing to do is not waited for long.
            if i > 0:
                d.wait_events(ticks, len(_own(d, *ticks)), p * 2 + 30, keep=_is_own)
            before = len(_own(d, "checkpoint.done"))
            many_files.change_one_percent(root, sz.w2_files, sz.w2_dirs, 50 + i, MAX_SIZE)
            done = d.wait_events(("checkpoint.done",), before, p * 3 + 600, keep=_is_own)
            if done is None:
                raise RuntimeError("W2: no periodic checkpoint after the 1% change")
            periodic.append(float(done["seconds"]))
            changed.append(int(done.get("changed", 0)))
            scans_p.append(_scan_of(d, done))
            result, trip = d.checkpoint()
            unchanged.append(float(result["duration"]))
            trips.append(trip)
            scans_u.append(_scan_of(d, result))
            say(
                f"  round {i + 1}: periodic after 1% {periodic[-1]:.2f} s ({changed[-1]} changed,"
                f" scan {scans_p[-1]}); API, nothing changed {unchanged[-1]:.3f} s"
                f" (round trip {trip:.3f} s, scan {scans_u[-1]})"
            )
        d.stop()
        rss = d.peak_rss_mb
    no_walk = None if "n/a" in scans_u else all(s == "watch" for s in scans_u)
    rows = [
        Row("W2", "daemon: periodic checkpoint after the 1% change", "s", periodic, 2.0, op="<",
            note=f"{_median([float(c) for c in changed]) or 0:.0f} changed; scan: "
            + ", ".join(scans_p)),
        Row("W2", "daemon: API checkpoint, nothing changed, no walk", "s", unchanged, 0.2,
            op="<", require=no_walk,
            note=f"round trip {_median(trips) or 0:.3f} s; scan: " + ", ".join(scans_u)),
    ]  # fmt: skip
    return rows, rss


def _is_own(event: dict[str, Any]) -> bool:
    """A checkpoint the daemon wrote of its own accord (periodic, or a kind the watch adds)."""
    return event.get("kind") not in OTHER_KINDS


def _own(d: DaemonRun, *names: str) -> list[dict[str, Any]]:
    return [e for e in d.events(*names) if _is_own(e)]


# -- W3 ---------------------------------------------------------------------------------


def w3(sz: Sizes, rounds: int, scratch: Path) -> list[Row]:
    say(f"W3: {sz.w3_files} files, {sz.w3_edit_mb} MB edited in {sz.w3_edit_files}, SIGTERM")
    where = scratch / "w3"
    where.mkdir(parents=True, exist_ok=True)
    root = generated_root(where, sz.w3_files, sz.w3_dirs)
    settings = {"checkpoint_interval": "3600", "checkpoint_min_interval": "3600"}
    stops: list[float] = []
    finals: list[float] = []
    sound = True
    size = sz.w3_edit_mb * 1_000_000 // sz.w3_edit_files
    step = max(1, sz.w3_files // sz.w3_edit_files)
    for i in range(rounds):
        for old in (f"w3-{i}-work", f"w3-{i}-state"):
            shutil.rmtree(where / old, ignore_errors=True)
        with DaemonRun(root, where, f"w3-{i}", settings) as d:
            d.wait_running()
            for k in range(sz.w3_edit_files):
                index = (k * step + i) % sz.w3_files
                path = many_files.file_path(root, index, sz.w3_files, sz.w3_dirs)
                path.write_bytes(os.urandom(size))
            stops.append(d.stop())
            final = [e for e in d.events("checkpoint.done") if e.get("kind") == "final"]
            sound = sound and d.exit_code == 0 and bool(final)
            if final:
                finals.append(float(final[-1]["seconds"]))
            say(
                f"  round {i + 1}: SIGTERM to exit {stops[-1]:.2f} s, exit {d.exit_code}, "
                f"final checkpoint {finals[-1] if final else 'missing'}"
            )
    note = f"final checkpoint {_median(finals) or 0:.2f} s"
    if not sound:
        note += "; a final checkpoint is missing or the exit code was not 0"
    return [
        Row("W3", f"SIGTERM to exit, {sz.w3_edit_mb} MB edited on {sz.w3_files} files", "s",
            stops, 10.0, op="<", note=note, require=sound or None),
    ]  # fmt: skip


# -- W4 ---------------------------------------------------------------------------------


def _chain(workdir: Path, studio: str, name: str) -> list[str]:
    """The layer digests of a checkpoint in a local store, oldest first."""
    from agent.checkpoint.manifest import Manifest
    from agent.store.local import LocalStore

    async def read() -> list[str]:
        store = LocalStore(workdir)
        try:
            ref = await store.get_ref(studio, name)
            if ref is None:
                return []
            raw = await store.get_bytes(ref.digest, workdir / "bench-spool")
            return [layer.digest for layer in Manifest.decode(raw).layers]
        finally:
            await store.close()

    return asyncio.run(read())


def _layer_names(workdir: Path, digest: str) -> set[str]:
    import zstandard

    blob = workdir / ".studios" / "checkpoints" / "blobs" / "sha256" / digest.split(":")[1]
    with (
        open(blob, "rb") as f,
        zstandard.ZstdDecompressor().stream_reader(f) as z,
        tarfile.open(fileobj=z, mode="r|") as tar,
    ):
        return {m.name.removeprefix("./").rstrip("/") for m in tar}


def w4(sz: Sizes, root: Path, scratch: Path, dirs: int) -> tuple[list[Row], float]:
    minute = sz.w4_interval
    say(f"W4: studio-agent run on the W2 root, {sz.w4_seconds:g} s, interval {minute:g} s")
    settings = {"checkpoint_interval": f"{minute:g}", "checkpoint_min_interval": f"{minute:g}"}
    shutil.rmtree(scratch / "w4-work", ignore_errors=True)
    shutil.rmtree(scratch / "w4-state", ignore_errors=True)
    where = many_files.dir_path(root, 0, dirs)
    with DaemonRun(root, scratch, "w4", settings) as d:
        d.wait_running()
        name = d.request("GET", "/v1/status")["session"]["checkpoint"]["name"]
        t0 = time.monotonic()
        cpu0 = d.cpu_seconds()
        waits = _changes_checkpointed(d, name, where, t0, sz)
        _sleep_until(t0 + sz.w4_seconds)
        cpu = d.cpu_seconds() - cpu0
        wall = time.monotonic() - t0
        assert d.proc is not None
        rss_now = psutil.Process(d.proc.pid).memory_info().rss / 2**20
        d.stop()
        peak = d.peak_rss_mb
    pct = cpu / wall * 100
    say(f"  CPU {cpu:.2f} s over {wall:.0f} s ({pct:.2f}% of a core), peak RSS {peak:.0f} MB")
    n = len(waits)
    hits = [k for k, w in waits.items() if w is not None]
    shown = ", ".join(
        f"{k}: {w:.0f} s" if w is not None else f"{k}: none" for k, w in waits.items()
    )
    rows = [
        Row("W4", f"CPU over {wall:.0f} s idle, agent's process tree", "%", [pct], 1.0, op="<",
            note=f"{cpu:.2f} s of CPU; % of one core"),
        Row("W4", "peak RSS of the daemon", "MB", [peak], 100.0, op="<", judge="max",
            note=f"{rss_now:.0f} MB at the end"),
        Row("W4", "every minute with a change has its checkpoint", "", [len(hits) / n], 1.0,
            op=">=", judge="min", rounds_text=[f"{len(hits)} of {n}"],
            note=f"minute: seconds from the change to its checkpoint in the store: {shown}"),
    ]  # fmt: skip
    return rows, peak


def _changes_checkpointed(
    d: DaemonRun, name: str, where: Path, t0: float, sz: Sizes
) -> dict[int, float | None]:
    """Write a small change ``w4_lead`` seconds into each chosen minute and see
    it reach the store: seconds from the write until a layer of the session's
    checkpoint holds it, or None when that took over an interval and a slack
    for the checkpoint itself (a kill then would lose more than a minute)."""
    minute, slack = sz.w4_interval, 10.0
    todo = sorted(sz.w4_change_minutes)
    pending: dict[int, tuple[str, float, set[str]]] = {}  # minute: path, written, layers
    waits: dict[int, float | None] = {}
    while todo or pending:
        if todo and time.monotonic() >= t0 + minute * (todo[0] - 1) + sz.w4_lead:
            k = todo.pop(0)
            before = set(_chain(d.workdir, d.name, name))
            change = where / f"w4-change-{k}.txt"
            change.write_text(f"minute {k}\n")
            pending[k] = (str(change.relative_to(d.root)), time.monotonic(), before)
            continue
        if pending:
            layers = _chain(d.workdir, d.name, name)
            for k, (rel, written, before) in sorted(pending.items()):
                new = [g for g in layers if g not in before]
                if any(rel in _layer_names(d.workdir, g) for g in new):
                    waits[k] = time.monotonic() - written
                elif time.monotonic() - written > minute + slack:
                    waits[k] = None
                else:
                    continue
                del pending[k]
                w = waits[k]
                say(
                    f"  minute {k}: "
                    + (f"checkpointed after {w:.0f} s" if w is not None else "NOT in time")
                )
        time.sleep(min(1.0, minute / 4))
    return dict(sorted(waits.items()))


def _sleep_until(t: float) -> None:
    left = t - time.monotonic()
    if left > 0:
        time.sleep(left)


# -- S3 ---------------------------------------------------------------------------------


def s3(tree: Callable[[], Path], scratch: Path, rounds: int) -> Row:
    """W1's checkpoint through S3 against the pipeline; ``tree`` makes the tree."""
    label = "`tar -c | zstd -3 -T0 | aws s3 cp -`"
    what = "checkpoint of W1 through S3 (local moto)"
    try:
        from bench.s3_pipeline import measure  # type: ignore[import-not-found]
    except ModuleNotFoundError as e:
        if e.name not in ("bench", "bench.s3_pipeline"):
            raise
        return Row("S3", what, "s", [], 1.2, reference=[], ref_label=label,
                   note="bench.s3_pipeline is not in this checkout")  # fmt: skip
    say("S3: W1's checkpoint through S3 against tar | zstd | aws s3 cp")
    measure_fn: Callable[[Path, Path, int], list[tuple[float, float]]] = measure
    scratch.mkdir(parents=True, exist_ok=True)
    pairs = measure_fn(tree(), scratch, rounds)
    return Row("S3", what, "s", [a for a, _ in pairs], 1.2,
               reference=[b for _, b in pairs], ref_label=label)  # fmt: skip


# -- the machine ------------------------------------------------------------------------


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
    except OSError:
        return "absent"
    return out.splitlines()[0].strip() if out else "absent"


def machine(scratch: Path) -> str:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    fs = "?"
    best = ""
    with open("/proc/mounts") as f:
        for line in f:
            _, point, kind, *_ = line.split()
            if str(scratch).startswith(point) and len(point) > len(best):
                best, fs = point, kind
    mem = psutil.virtual_memory().total / 2**30
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    import zstandard

    tools = "; ".join(
        [
            _first_line(["tar", "--version"]),
            _first_line(["zstd", "--version"]).strip("* ").split(", by")[0],
            _first_line(["restic", "version"]) if shutil.which("restic") else "no restic",
        ]
    )
    return (
        f"{os.cpu_count()} CPUs ({model}), {mem:.0f} GiB RAM, scratch on {fs}, "
        f"Linux {platform.release()}, Python {platform.python_version()}, "
        f"zstandard {zstandard.__version__}; {tools}; load average {load} at the start"
    )


# -- the command ------------------------------------------------------------------------


def run(args: argparse.Namespace, scratch: Path) -> Report:
    sz = QUICK if args.quick else FULL
    only = set(args.only)
    restic = shutil.which("restic") is not None and not args.no_restic
    t0 = time.perf_counter()
    report = Report(machine(scratch), "quick" if args.quick else "full", args.rounds)
    rows: dict[str, list[Row]] = {k: [] for k in ("W2", "W2d", "W2rss", "W1", "W3", "W4", "S3")}
    rss: dict[str, float] = {}
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "agent")], check=True)
    w2_where = scratch / "w2"
    w2_where.mkdir(parents=True, exist_ok=True)
    root: Path | None = None
    if only & {"W2", "W4"}:
        root = generated_root(w2_where, sz.w2_files, sz.w2_dirs)
    if "W2" in only:
        assert root is not None
        rows["W2"], cli_rss = w2_cli(sz, args.rounds, root, w2_where, restic)
        rss |= cli_rss
        rows["W2d"], rss["daemon"] = w2_daemon(sz, args.rounds, root, w2_where)
    tree: Path | None = None
    if "W1" in only:
        rows["W1"], tree = w1(sz, args.rounds, scratch, args.source)
    if "W3" in only:
        rows["W3"] = w3(sz, args.rounds, scratch)
    if "W4" in only:
        assert root is not None
        rows["W4"], rss["W4 daemon"] = w4(sz, root, w2_where, sz.w2_dirs)
    if "S3" in only:

        def s3_tree() -> Path:
            if tree is not None:
                return tree
            made = scratch / "s3-tree" / "data"
            if not made.is_dir():
                limit = sz.w1_limit_mb * 1_000_000 if sz.w1_limit_mb else None
                checkpoint_bench.copy_tree(args.source, made, limit)
            return made

        rows["S3"] = [s3(s3_tree, scratch / "s3", sz.w1_rounds or args.rounds)]
    if "W2" in only:
        rows["W2rss"] = [
            Row("W2", "peak RSS, every agent process", "MB", list(rss.values()), 200.0,
                judge="max", rounds_text=[f"{k} {v:.0f}" for k, v in rss.items()]),
        ]  # fmt: skip
    order = ("W2rss", "W2", "W2d", "W1", "W3", "W4", "S3")
    report.rows = [row for key in order for row in rows[key]]
    report.seconds = time.perf_counter() - t0
    if only & {"W2", "W4"}:
        size = f"{sz.w2_files:,} files in {sz.w2_dirs:,} directories"
        report.notes.append(f"W2 and W4 ran on {size} (0 to 4 KiB each).")
    if not restic:
        report.notes.append("restic is not installed: its references show n/a.")
    return report


def _tmp(args: argparse.Namespace) -> str | None:
    """Quick mode works in memory (tmpfs) where it can: the shared disk's stalls
    would take more than its two minutes; a full run works on the disk."""
    shm = Path("/dev/shm")
    usable = shm.is_dir() and os.access(shm, os.W_OK)
    if args.quick and usable and shutil.disk_usage(shm).free > 4 << 30:
        return str(shm)
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="scaled down, under two minutes")
    ap.add_argument(
        "--rounds", type=int, default=None, help="rounds per workload (default 3; quick: 1)"
    )
    ap.add_argument(
        "--only",
        type=lambda s: [w.strip().upper() for w in s.split(",") if w.strip()],
        default=list(WORKLOADS),
        help="comma-separated workloads of " + ",".join(WORKLOADS),
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the table here as JSON")
    ap.add_argument("--scratch", type=Path, default=None, help="work directory (kept if given)")
    ap.add_argument(
        "--source",
        type=Path,
        default=Path(sysconfig.get_paths()["purelib"]),
        help="the tree W1 copies (default: this interpreter's site-packages)",
    )
    ap.add_argument("--no-restic", action="store_true", help="leave restic out")
    args = ap.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    unknown = set(args.only) - set(WORKLOADS)
    if unknown:
        ap.error(f"unknown workload(s): {', '.join(sorted(unknown))}")
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="studio-workloads-", dir=_tmp(args)))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        report = run(args, scratch.resolve())
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    print(report.markdown())
    if args.json is not None:
        report.write_json(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
