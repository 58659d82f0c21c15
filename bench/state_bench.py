"""The parent state at scale: watched and full-walk checkpoints through the engine,
and the state read and written alone, in one process.

    python bench/state_bench.py [--files 1000000] [--dirs 10000] [--repeat 3]
                                [--scratch DIR] [--keep] [--profile STEP]

The tree is ``many_files.py``'s (generated once into ``--scratch``, reused when
there).  The parent state is written by a walk, as ``baseline`` writes it; then
each round times, against the previous round's state (the checkpoint's own next
state becomes the parent, as in a session):

    one-dir   a watched checkpoint after one small file edit (the idle workload)
    1%        a watched checkpoint after ``change_one_percent``
    full      a full-walk checkpoint with nothing changed
    read      the parent state read through alone (every block decoded)
    write     the blocks just read written to a new state alone

The watch is not run: the ``Dirty`` mapping is made from the files changed, as
the watch would report them.  ``--profile STEP`` runs that step once more under
cProfile and prints the top of it.  The figures are wall seconds; the peak RSS
is the process's own (the tree's generation holds no memory).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from many_files import _payload, _size, _write, change_one_percent, file_path, generated_root

from agent.checkpoint.pipeline import Pass, scan_and_write
from agent.checkpoint.scan import Excluder, Scan, walk
from agent.checkpoint.state import StateReader, StateWriter

Dirty = dict[str, set[str]]


def write_parent(root: Path, state: Path) -> None:
    """The parent state as ``baseline`` writes it: a walk, block by block."""
    with StateWriter(state) as w:
        for d, names, records, _ in walk(root, Excluder(root, [], []), Scan()):
            w.write((d, names, records))


def one_percent_dirty(root: Path, files: int, dirs: int, round_no: int) -> Dirty:
    """What the watch reports of ``change_one_percent``'s round ``round_no``."""
    dirty: Dirty = {}
    for k, index in enumerate(range(round_no % 100, files, 100)):
        path = file_path(root, index, files, dirs)
        names = dirty.setdefault(str(path.parent.relative_to(root)), set())
        names.add(path.name)
        if k % 10 == 0:
            names.add(f"n{round_no}-{path.name}")
    return dirty


def edit_one(root: Path, files: int, dirs: int, round_no: int) -> Dirty:
    """A small edit of one file (a different one each round)."""
    path = file_path(root, (round_no * 7919) % files, files, dirs)
    _write(path, _payload(64), _size(round_no + 3, 64))
    return {str(path.parent.relative_to(root)): {path.name}}


class Bench:
    def __init__(self, root: Path, work: Path) -> None:
        self.root = root
        self.work = work
        self.parent = work / "parent.state"
        self.excluder = Excluder(root, [], [])

    def checkpoint(self, dirty: Dirty | None) -> Pass:
        """One checkpoint against the parent state; its next state becomes the parent."""
        nxt = self.work / "next.state"
        with (
            StateReader(self.parent) as r,
            open(self.work / "layer.tar.zst", "wb") as out,
        ):
            done = scan_and_write(self.root, self.excluder, r.blocks(), out, state=nxt, dirty=dirty)
        os.replace(nxt, self.parent)
        return done

    def read(self) -> int:
        n = 0
        with StateReader(self.parent) as r:
            for (_, names, _), _ in r.blocks():
                n += len(names)
        return n

    def write(self) -> int:
        out = self.work / "copy.state"
        with StateReader(self.parent) as r, StateWriter(out) as w:
            for block, _ in r.blocks():
                w.write(block)
        out.unlink()
        return 0


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cpu_timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall and CPU seconds (all threads of the process) of one call."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--files", type=int, default=1_000_000)
    ap.add_argument("--dirs", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--scratch", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the generated tree")
    ap.add_argument("--profile", choices=["one-dir", "1%", "full", "read", "write"])
    args = ap.parse_args()

    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="studio-state-"))
    root = generated_root(scratch, args.files, args.dirs)
    work = scratch / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    bench = Bench(root, work)
    try:
        t = timed(lambda: write_parent(root, bench.parent))
        size = bench.parent.stat().st_size
        print(f"parent state: {size / 1e6:.1f} MB, written by a walk in {t:.2f} s", file=sys.stderr)
        bench.checkpoint(
            None
        )  # warm: the tree's inodes cached, the state as a checkpoint writes it
        times: dict[str, list[float]] = {}
        cpu: dict[str, list[float]] = {}
        # Each step: what to do untimed first (the change made), then the timed call.
        steps: dict[str, Callable[[int], Callable[[], object]]] = {
            "one-dir": lambda i: _then(bench.checkpoint, edit_one(root, args.files, args.dirs, i)),
            "1%": lambda i: _then(bench.checkpoint, _changed(root, args.files, args.dirs, i)),
            "full": lambda i: lambda: bench.checkpoint(None),
            "read": lambda i: bench.read,
            "write": lambda i: bench.write,
        }
        for i in range(args.repeat):
            for name, prepare in steps.items():
                wall, c = cpu_timed(prepare(1000 + i))
                times.setdefault(name, []).append(wall)
                cpu.setdefault(name, []).append(c)
                print(f"  round {i + 1} {name}: {wall:.3f} s (cpu {c:.3f} s)", file=sys.stderr)
        print(f"files {args.files} dirs {args.dirs} load {os.getloadavg()[0]:.2f}")
        print(f"{'':10} wall min / median   cpu median")
        for name, values in times.items():
            print(
                f"{name:10} {min(values):.3f} / {statistics.median(values):.3f}"
                f"   {statistics.median(cpu[name]):.3f}"
            )
        print(f"peak RSS {peak_mb():.0f} MB, state {bench.parent.stat().st_size / 1e6:.1f} MB")
        if args.profile:
            run = steps[args.profile](2000)
            prof = cProfile.Profile()
            prof.enable()
            run()
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


def _then(fn: Callable[[Dirty | None], Pass], dirty: Dirty) -> Callable[[], Pass]:
    return lambda: fn(dirty)


def _changed(root: Path, files: int, dirs: int, round_no: int) -> Dirty:
    """Make round ``round_no``'s 1% change; what the watch would report of it."""
    dirty = one_percent_dirty(root, files, dirs, round_no)
    change_one_percent(root, files, dirs, round_no, 64)
    return dirty


if __name__ == "__main__":
    raise SystemExit(main())
