"""A full-walk checkpoint at many files: baseline and nothing-changed checkpoint
times and peak RSS, against ``restic backup`` with nothing changed.

    python bench/many_files.py [--files 1000000] [--dirs 10000] [--repeat 3]
                               [--scratch DIR] [--agent REPO] [--keep]

The tree is generated (tiny files, 0 to 64 bytes, a few of them larger), never
committed.  ``--agent`` runs another checkout of the agent (its bench/peak_rss.py)
on the same tree, to compare a change against what it replaces.  Every step runs
as its own process, as a user runs it, measured by wall time; the peak RSS is
the process's own VmHWM.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peak_rss import peak_kb

REPO = Path(__file__).resolve().parent.parent
_MARKER = "tree.json"  # beside a generated root: the size it was made at


def generated_root(where: Path, files: int, dirs: int, max_size: int = 64) -> Path:
    """``where``/root as ``generate`` makes it, made only when the tree there is not
    already of this size (``where``/tree.json says what it holds)."""
    root = where / "root"
    marker = where / _MARKER
    spec = {"files": files, "dirs": dirs, "max_size": max_size}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return root
    marker.unlink(missing_ok=True)
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    generate(root, files, dirs, max_size)
    marker.write_text(json.dumps(spec))
    print(
        f"generated {files} files in {dirs} directories in {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )
    return root


def generate(root: Path, files: int, dirs: int, max_size: int = 64) -> None:
    """``files`` files of 0 to ``max_size`` bytes spread evenly over ``dirs``
    directories, two levels deep (``file_path`` names them)."""
    per_dir = max(1, files // dirs)
    payload = _payload(max_size)
    made = 0
    for d in range(dirs):
        path = dir_path(root, d, dirs)
        path.mkdir(parents=True, exist_ok=True)
        n = per_dir if d < dirs - 1 else files - made
        for i in range(n):
            _write(path / f"f{i:05}.txt", payload, _size(made + i, max_size))
        made += n


def dir_path(root: Path, d: int, dirs: int) -> Path:
    fanout = max(1, int(dirs**0.5))
    return root / "data" / f"g{d // fanout:04}" / f"d{d:05}"


def file_path(root: Path, index: int, files: int, dirs: int) -> Path:
    """Where ``generate`` put its file number ``index``."""
    per_dir = max(1, files // dirs)
    d = min(index // per_dir, dirs - 1)
    return dir_path(root, d, dirs) / f"f{index - d * per_dir:05}.txt"


def change_one_percent(root: Path, files: int, dirs: int, round_no: int, max_size: int) -> int:
    """Rewrite 1% of the files, delete a tenth of those and add as many: the
    issue's 1% change.  Each round takes other files; returns the paths touched.

    The tree is no longer the one ``generated_root`` made: run on it again, a
    round would find its deletions done and its additions there (rewrites
    only), so its marker goes and the next run makes the tree anew."""
    (root.parent / _MARKER).unlink(missing_ok=True)
    payload = _payload(max_size)
    touched = 0
    for k, index in enumerate(range(round_no % 100, files, 100)):
        path = file_path(root, index, files, dirs)
        if k % 10 == 0:
            path.unlink(missing_ok=True)
            _write(path.with_name(f"n{round_no}-{path.name}"), payload, _size(index, max_size))
            touched += 2
        else:
            _write(path, payload, _size(index + round_no + 1, max_size))
            touched += 1
    return touched


def _payload(max_size: int) -> bytes:
    """Content to cut files from: incompressible, from a fixed seed."""
    return random.Random(0).randbytes(max(64, max_size) * 2)


def _size(n: int, max_size: int) -> int:
    return (n * 2654435761) % (max_size + 1) if max_size > 64 else n % (max_size + 1)


def _write(path: Path, payload: bytes, size: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, payload[size % 64 : size % 64 + size])
    finally:
        os.close(fd)


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one run."""
    subprocess.run(["sync"], check=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed: {proc.stderr.decode()[-2000:]}")
    kb = peak_kb(proc.stderr.decode())
    return elapsed, (kb or 0) / 1024


def summary(values: list[float]) -> str:
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"


def measure(
    root: Path,
    scratch: Path,
    agents: dict[str, Path],
    repeat: int,
    restic: bool,
    change: tuple[int, int, int] | None = None,
    restore: bool = False,
    restore_dir: Path | None = None,
) -> dict[str, list[float]]:
    """Round by round, each agent's baseline and nothing-changed checkpoint, then
    restic's; with ``change`` (files, dirs, max_size of ``root``'s tree) the 1%
    change and each side's checkpoint of it; with ``restore``, once at the end,
    each agent's checkpoint of the whole tree and its restore into an empty root
    (made below ``restore_dir``, ``scratch`` by default).

    ``agents`` maps a label to a checkout.  Returns seconds and peak RSS (MB)
    per round under keys ``"<label> <step> s"`` and ``"<label> <step> MB"``
    (steps: baseline, unchanged, changed, whole, restore) and ``"restic <step> s"``.
    """
    for repo in agents.values():
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(repo / "agent")], check=True)
    renv = dict(os.environ, RESTIC_PASSWORD="bench")
    renv["RESTIC_REPOSITORY"] = str(scratch / "restic")
    renv["RESTIC_CACHE_DIR"] = str(scratch / "restic-cache")
    times: dict[str, list[float]] = {}
    if restic:
        if not (scratch / "restic").exists():
            init = ["restic", "init", "-q"]
            subprocess.run(init, env=renv, check=True, stdout=subprocess.DEVNULL)
        # untimed: restic's parent snapshot is the tree as it is now
        backup = ["restic", "backup", "-q", str(root / "data")]
        subprocess.run(backup, env=renv, check=True, stdout=subprocess.DEVNULL)

    def common(label: str) -> list[str]:
        return [
            "--root", str(root), "--workdir", str(scratch / f"work-{label}"),
            "--state-dir", str(scratch / f"state-{label}"), "--studio", "many",
        ]  # fmt: skip

    def ours(i: int, label: str, key: str, args: list[str]) -> None:
        repo = agents[label]
        env = dict(os.environ, PYTHONPATH=str(repo))
        t, rss = run([sys.executable, str(repo / "bench" / "peak_rss.py"), *args], env)
        times.setdefault(f"{label} {key} s", []).append(t)
        times.setdefault(f"{label} {key} MB", []).append(rss)
        print(f"  round {i + 1} {label} {key}: {t:.2f} s {rss:.0f} MB", file=sys.stderr)

    def theirs(i: int, key: str) -> None:
        subprocess.run(["sync"], check=True)
        t0 = time.perf_counter()
        backup = ["restic", "backup", "-q", str(root / "data")]
        subprocess.run(backup, env=renv, check=True, stdout=subprocess.DEVNULL)
        elapsed = time.perf_counter() - t0
        times.setdefault(f"restic {key} s", []).append(elapsed)
        print(f"  round {i + 1} restic {key}: {elapsed:.2f} s", file=sys.stderr)

    # Rounds interleave the agents and restic, who goes first alternating, so a
    # busy moment of the machine is shared rather than met by one side alone.
    for i in range(repeat):
        restic_first = restic and i % 2 == 1
        for label in agents:
            shutil.rmtree(scratch / f"state-{label}", ignore_errors=True)
            shutil.rmtree(scratch / f"work-{label}", ignore_errors=True)
            ours(i, label, "baseline", [*common(label), "baseline"])
        if restic_first:
            theirs(i, "unchanged")
        for label in agents:
            ours(i, label, "unchanged", [*common(label), "checkpoint"])
        if restic and not restic_first:
            theirs(i, "unchanged")
        if change is None:
            continue
        files, dirs, max_size = change
        change_one_percent(root, files, dirs, i, max_size)
        if restic_first:
            theirs(i, "changed")
        for label in agents:
            ours(i, label, "changed", [*common(label), "checkpoint"])
        if restic and not restic_first:
            theirs(i, "changed")
    if restore:
        # A checkpoint that holds the whole tree (baselined without it, then put
        # back), restored into an empty root: the largest restore the tree makes.
        parked = scratch / "parked"
        for label in agents:
            target = (restore_dir or scratch) / f"restored-{label}"
            for old in (scratch / f"state-whole-{label}", scratch / f"work-whole-{label}", target):
                shutil.rmtree(old, ignore_errors=True)
            whole = ["--root", str(root), "--workdir", str(scratch / f"work-whole-{label}")]
            whole += ["--state-dir", str(scratch / f"state-whole-{label}"), "--studio", "many"]
            os.rename(root / "data", parked)
            try:
                repo = agents[label]
                env = dict(os.environ, PYTHONPATH=str(repo))
                run([sys.executable, str(repo / "bench" / "peak_rss.py"), *whole, "baseline"], env)
            finally:
                os.rename(parked, root / "data")
            ours(repeat - 1, label, "whole", [*whole, "checkpoint"])
            target.mkdir()
            into = ["--root", str(target), "--workdir", str(scratch / f"work-whole-{label}")]
            into += ["--state-dir", str(scratch / f"state-restore-{label}"), "--studio", "many"]
            shutil.rmtree(scratch / f"state-restore-{label}", ignore_errors=True)
            ours(repeat - 1, label, "restore", [*into, "restore"])
            shutil.rmtree(target, ignore_errors=True)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--files", type=int, default=1_000_000)
    ap.add_argument("--dirs", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--scratch", type=Path, default=None)
    ap.add_argument("--agent", type=Path, action="append", default=None, help="checkout(s) to run")
    ap.add_argument("--keep", action="store_true", help="keep the generated tree")
    ap.add_argument("--no-restic", action="store_true")
    args = ap.parse_args()

    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="studio-many-"))
    root = generated_root(scratch, args.files, args.dirs)
    agents = {repo.name: repo for repo in args.agent or [REPO]}
    restic = shutil.which("restic") is not None and not args.no_restic
    try:
        times = measure(root, scratch, agents, args.repeat, restic)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"{'':32} min / median / max")
    for key, values in times.items():
        print(f"{key:32} {summary(values)}")
    if restic:
        for label in agents:
            ratios = [
                a / b
                for a, b in zip(
                    times[f"{label} unchanged s"], times["restic unchanged s"], strict=True
                )
            ]
            print(f"{label + ' unchanged / restic':32} {summary(ratios)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
