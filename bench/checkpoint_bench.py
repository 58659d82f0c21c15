"""Checkpoint and restore speed against ``tar | zstd`` (and restic) on the same tree, same run.

    python bench/checkpoint_bench.py [--source DIR] [--repeat 3] [--s3]

The tree is a copy of real installed packages (by default this interpreter's
site-packages: tens of thousands of small and large files, like a session that
pip-installed a data-science stack).  Every command runs as its own process,
measured by wall time; each figure is the median of ``--repeat`` runs, with the
reference pipelines interleaved so that a noisy machine affects both sides.
Peak RSS of our checkpoint process is reported too.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

AGENT = [sys.executable, "-m", "agent"]


def sh(cmd: str | list[str], env: dict[str, str] | None = None) -> None:
    subprocess.run(
        cmd,
        shell=isinstance(cmd, str),
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def drop_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def tree_stats(path: Path) -> tuple[int, int]:
    files = size = 0
    for dirpath, _dirs, names in os.walk(path):
        for n in names:
            files += 1
            try:
                size += os.lstat(os.path.join(dirpath, n)).st_size
            except OSError:
                pass
    return files, size


class Agent:
    """The CLI on one root, workdir and state dir."""

    def __init__(self, root: Path, workdir: str, state: Path, env: dict[str, str]) -> None:
        self.args = [
            "--root",
            str(root),
            "--workdir",
            workdir,
            "--state-dir",
            str(state),
            "--studio",
            "bench",
        ]
        self.env = env

    def __call__(self, *cmd: str) -> None:
        sh([*AGENT, *self.args, *cmd], env=self.env)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--source", type=Path, default=Path(sysconfig.get_paths()["purelib"]))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: tmp)")
    ap.add_argument("--s3", action="store_true", help="also measure the S3 store (local moto)")
    args = ap.parse_args()

    scratch = Path(args.workdir or tempfile.mkdtemp(prefix="studio-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    root = scratch / "root"
    tree = root / "data"
    parked = scratch / "parked"
    drop_dir(root)
    drop_dir(parked)
    root.mkdir()
    print(f"copying {args.source} ...", file=sys.stderr)
    shutil.copytree(args.source, tree, symlinks=True)
    files, size = tree_stats(tree)
    print(f"tree: {files} files, {size / 1e6:.0f} MB", file=sys.stderr)

    results: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        results.setdefault(key, []).append(value)

    has_restic = shutil.which("restic") is not None
    renv = dict(env, RESTIC_PASSWORD="bench", RESTIC_CACHE_DIR=str(scratch / "restic-cache"))
    rss_kb = 0
    layer_size = tar_size = 0
    for i in range(args.repeat):
        print(f"round {i + 1}/{args.repeat}", file=sys.stderr)
        # -- checkpoint: the whole tree is the session's change --------------------------
        work = scratch / "work"
        state = scratch / "state"
        drop_dir(work)
        drop_dir(state)
        agent = Agent(root, str(work), state, env)
        os.rename(tree, parked)
        agent("baseline")
        os.rename(parked, tree)
        sh("sync")
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        add("checkpoint", timed(lambda a=agent: a("checkpoint", "--name", "full")))
        rss_kb = max(rss_kb, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, before)
        layer_size = sum(
            p.stat().st_size for p in (work / ".studios/checkpoints/blobs/sha256").iterdir()
        )
        add("checkpoint_unchanged", timed(lambda a=agent: a("checkpoint", "--name", "again")))
        out = scratch / "ref.tar.zst"
        sh("sync")
        add("tar_zstd", timed(lambda: sh(f"tar -C '{root}' -c data | zstd -3 -T0 -q -o '{out}' -f")))
        tar_size = out.stat().st_size

        # -- restore into an empty root ---------------------------------------------------
        target = scratch / "restored"
        drop_dir(target)
        target.mkdir()
        sh("sync")
        ragent = Agent(target, str(work), scratch / "state2", env)
        drop_dir(scratch / "state2")
        add("restore", timed(lambda a=ragent: a("restore", "--checkpoint", "full")))
        ref_target = scratch / "untarred"
        drop_dir(ref_target)
        ref_target.mkdir()
        sh("sync")
        add("untar", timed(lambda: sh(f"zstd -d -q -c '{out}' | tar -C '{ref_target}' -x")))
        if i == 0:
            sh(["diff", "-r", "--no-dereference", str(tree), str(target / "data")])
        drop_dir(ref_target)
        drop_dir(target)

        if has_restic:
            repo = scratch / "restic-repo"
            drop_dir(repo)
            sh(["restic", "init", "-q", "--repo", str(repo)], env=renv)
            sh("sync")
            backup = ["restic", "backup", "-q", "--repo", str(repo), str(tree)]
            add("restic_backup", timed(lambda b=backup: sh(b, env=renv)))
            add("restic_unchanged", timed(lambda b=backup: sh(b, env=renv)))
            rt = scratch / "restic-restored"
            drop_dir(rt)
            sh("sync")
            restore = ["restic", "restore", "-q", "latest", "--repo", str(repo), "--target", str(rt)]
            add("restic_restore", timed(lambda r=restore: sh(r, env=renv)))
            drop_dir(rt)

    s3: dict[str, float] = {}
    if args.s3:
        s3 = measure_s3(scratch, root, tree, parked, env, args.repeat)

    med = {k: statistics.median(v) for k, v in results.items()}
    print()
    print(f"Tree: {files} files, {size / 1e6:.0f} MB; {os.cpu_count()} CPUs; median of {args.repeat}.")
    print()
    print("| step | ours | reference | ratio (ours / reference) |")
    print("| --- | --- | --- | --- |")
    print(
        f"| checkpoint, whole tree new | {med['checkpoint']:.2f} s | "
        f"`tar -c \\| zstd -3 -T0` {med['tar_zstd']:.2f} s | {med['checkpoint'] / med['tar_zstd']:.2f} |"
    )
    print(
        f"| restore into an empty root | {med['restore']:.2f} s | "
        f"`zstd -d \\| tar -x` {med['untar']:.2f} s | {med['restore'] / med['untar']:.2f} |"
    )
    if has_restic:
        print(
            f"| checkpoint, whole tree new | {med['checkpoint']:.2f} s | `restic backup` "
            f"{med['restic_backup']:.2f} s | {med['checkpoint'] / med['restic_backup']:.2f} |"
        )
        print(
            f"| checkpoint, nothing changed | {med['checkpoint_unchanged']:.2f} s | `restic backup` "
            f"{med['restic_unchanged']:.2f} s | "
            f"{med['checkpoint_unchanged'] / med['restic_unchanged']:.2f} |"
        )
        print(
            f"| restore | {med['restore']:.2f} s | `restic restore` {med['restic_restore']:.2f} s | "
            f"{med['restore'] / med['restic_restore']:.2f} |"
        )
    else:
        print(f"| checkpoint, nothing changed | {med['checkpoint_unchanged']:.2f} s | | |")
    if s3:
        print(
            f"| checkpoint through S3 (local moto) | {s3['checkpoint']:.2f} s | local store "
            f"{med['checkpoint']:.2f} s | {s3['checkpoint'] / med['checkpoint']:.2f} |"
        )
        print(
            f"| restore through S3 (local moto) | {s3['restore']:.2f} s | local store "
            f"{med['restore']:.2f} s | {s3['restore'] / med['restore']:.2f} |"
        )
    print()
    print(
        f"Layer {layer_size / 1e6:.1f} MB vs tar.zst {tar_size / 1e6:.1f} MB; "
        f"peak RSS of the checkpoint process {rss_kb / 1024:.0f} MB."
    )
    if args.workdir is None:
        drop_dir(scratch)
    return 0


def measure_s3(
    scratch: Path, root: Path, tree: Path, parked: Path, env: dict[str, str], repeat: int
) -> dict[str, float]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from s3_store import start_local_s3  # type: ignore[import-not-found]

    endpoint, stop = start_local_s3()
    try:
        senv = dict(
            env,
            AWS_ENDPOINT_URL=endpoint,
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_DEFAULT_REGION="us-east-1",
        )
        import boto3

        boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
            region_name="us-east-1",
        ).create_bucket(Bucket="bench")
        cps, rss = [], []
        for i in range(repeat):
            workdir = f"s3://bench/run{i}"
            state = scratch / "s3state"
            drop_dir(state)
            agent = Agent(root, workdir, state, senv)
            os.rename(tree, parked)
            agent("baseline")
            os.rename(parked, tree)
            cps.append(timed(lambda a=agent: a("checkpoint", "--name", "full")))
            target = scratch / "s3restored"
            drop_dir(target)
            target.mkdir()
            drop_dir(scratch / "s3state2")
            ragent = Agent(target, workdir, scratch / "s3state2", senv)
            rss.append(timed(lambda a=ragent: a("restore", "--checkpoint", "full")))
            drop_dir(target)
        return {"checkpoint": statistics.median(cps), "restore": statistics.median(rss)}
    finally:
        stop()


if __name__ == "__main__":
    raise SystemExit(main())
