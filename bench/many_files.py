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
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peak_rss import peak_kb

REPO = Path(__file__).resolve().parent.parent


def generate(root: Path, files: int, dirs: int) -> None:
    """``files`` tiny files spread evenly over ``dirs`` directories, two levels deep."""
    per_dir = max(1, files // dirs)
    fanout = max(1, int(dirs**0.5))
    payload = bytes(range(64))
    made = 0
    for d in range(dirs):
        path = root / "data" / f"g{d // fanout:04}" / f"d{d:05}"
        path.mkdir(parents=True, exist_ok=True)
        n = per_dir if d < dirs - 1 else files - made
        for i in range(n):
            fd = os.open(path / f"f{i:05}.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, payload[: (made + i) % 65])
            os.close(fd)
        made += n


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
    root = scratch / "root"
    if not (root / "data").is_dir():
        t0 = time.perf_counter()
        generate(root, args.files, args.dirs)
        print(f"generated {args.files} files in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    agents = args.agent or [REPO]
    for repo in agents:
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(repo / "agent")], check=True)
    renv = dict(os.environ, RESTIC_PASSWORD="bench")
    renv["RESTIC_REPOSITORY"] = str(scratch / "restic")
    renv["RESTIC_CACHE_DIR"] = str(scratch / "restic-cache")
    restic = shutil.which("restic") is not None and not args.no_restic
    times: dict[str, list[float]] = {}
    try:
        if restic and not (scratch / "restic").exists():
            subprocess.run(["restic", "init", "-q"], env=renv, check=True)
            subprocess.run(["restic", "backup", "-q", str(root / "data")], env=renv, check=True)
        # Rounds interleave the agents and restic, so a busy moment of the
        # machine is shared rather than met by one side alone.
        for i in range(args.repeat):
            for repo in agents:
                env = dict(os.environ, PYTHONPATH=str(repo))
                cli = [sys.executable, str(repo / "bench" / "peak_rss.py")]
                state, work = scratch / "state", scratch / "work"
                shutil.rmtree(state, ignore_errors=True)
                shutil.rmtree(work, ignore_errors=True)
                common = ["--root", str(root), "--workdir", str(work), "--state-dir", str(state)]
                common += ["--studio", "many"]
                for key, step in (("baseline", ["baseline"]), ("unchanged", ["checkpoint"])):
                    t, rss = run([*cli, *common, *step], env)
                    times.setdefault(f"{repo.name} {key} s", []).append(t)
                    times.setdefault(f"{repo.name} {key} MB", []).append(rss)
                    line = f"  round {i + 1} {repo.name} {key}: {t:.2f} s {rss:.0f} MB"
                    print(line, file=sys.stderr)
            if restic:
                subprocess.run(["sync"], check=True)
                t0 = time.perf_counter()
                subprocess.run(["restic", "backup", "-q", str(root / "data")], env=renv, check=True)
                times.setdefault("restic unchanged s", []).append(time.perf_counter() - t0)
                line = f"  round {i + 1} restic unchanged: {times['restic unchanged s'][-1]:.2f} s"
                print(line, file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"{'':32} min / median / max")
    for key, values in times.items():
        print(f"{key:32} {summary(values)}")
    if restic:
        for repo in agents:
            ratios = [
                a / b
                for a, b in zip(
                    times[f"{repo.name} unchanged s"], times["restic unchanged s"], strict=True
                )
            ]
            print(f"{repo.name + ' unchanged / restic':32} {summary(ratios)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
