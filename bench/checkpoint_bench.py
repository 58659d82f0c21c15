"""Checkpoint and restore speed against ``tar | zstd`` and restic, same tree, same run.

    python bench/checkpoint_bench.py [--source DIR] [--repeat 3] [--warmup 1] [--s3] [--scratch DIR]
                                     [--restore-disk scratch|tmpfs|slow[,...]]

The tree is a copy of real installed packages (by default this interpreter's
site-packages: tens of thousands of small and large files, like a session that
pip-installed a data-science stack).  Every step runs as its own process, as a
user runs it (``studio-agent checkpoint``, ``studio-agent restore``, interpreter
start-up included), measured by wall time.  The references run interleaved with
ours in every round, who goes first alternating; what a step reads is read once
beforehand and the disk is synced before each step.  ``--warmup`` untimed rounds
come first, so that no side pays alone for what a first round meets (memory the
host has not handed over yet, a cold disk).  Each figure is the best of
``--repeat`` rounds, so a busy machine or disk penalises both sides alike; the
ratio of each round and their median are shown too, as a pair measured minutes
apart can meet a different disk.  The peak RSS of our processes is reported too.
``--restore-disk`` puts every restore (ours, ``tar -x``, restic's) on a new
filesystem of its own: a tmpfs, or a slow disk (see ``disks.py``); several
kinds, comma-separated, restore each side once on each (the steps of a kind
other than ``scratch`` are named ``restore@<kind>``, ``untar@<kind>``...).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from disks import KINDS, Disks
from peak_rss import peak_kb

REPO = Path(__file__).resolve().parent.parent

# The CLI, reporting its own peak RSS (see peak_rss.py).
AGENT = [sys.executable, str(REPO / "bench" / "peak_rss.py")]


def sh(cmd: str | list[str], env: dict[str, str] | None = None) -> None:
    subprocess.run(
        cmd, shell=isinstance(cmd, str), check=True, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip


def read_through(path: Path) -> None:
    """Read every file below ``path`` (or ``path`` itself) to the end."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        if f.is_symlink():
            continue
        with open(f, "rb") as fh:
            while fh.read(1 << 20):
                pass


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def on(key: str, kind: str) -> str:
    """The name of step ``key`` with its restore on a disk of ``kind``."""
    return key if kind == "scratch" else f"{key}@{kind}"


class Bench:
    def __init__(self, scratch: Path, env: dict[str, str], disks: dict[str, Disks]) -> None:
        self.scratch = scratch
        self.env = env
        self.disks = disks
        self.times: dict[str, list[float]] = {}
        self.peak_rss_mb = 0.0
        self.recording = True  # off in warm-up rounds

    def timed(
        self,
        key: str,
        cmd: str | list[str],
        env: dict[str, str] | None = None,
        reads: tuple[Path, ...] = (),
    ) -> None:
        """Run ``cmd`` once and record its wall time (and peak RSS).

        What it ``reads`` is read once beforehand, so every step starts from a
        warm page cache rather than whatever memory pressure left of it."""
        for path in reads:
            read_through(path)
        sh("sync")  # what earlier steps left in the page cache goes to disk first
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd, shell=isinstance(cmd, str), env=env or self.env,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        _, err = proc.communicate()
        elapsed = time.perf_counter() - t0
        print(f"  {key} {elapsed:.2f} s", file=sys.stderr)  # what made a round's ratio
        if self.recording:
            self.times.setdefault(key, []).append(elapsed)
        if proc.returncode != 0:
            raise SystemExit(f"{key} failed: {err.decode()}")
        kb = peak_kb(err.decode())
        if kb is not None:
            self.peak_rss_mb = max(self.peak_rss_mb, kb / 1024)

    def best(self, key: str) -> float:
        return min(self.times[key])

    def agent(self, root: Path, workdir: str, state: Path, *args: str) -> list[str]:
        return [
            *AGENT, "--root", str(root), "--workdir", workdir,
            "--state-dir", str(state), "--studio", "bench", *args,
        ]  # fmt: skip

    def checkpoint_whole_tree(
        self, key: str, root: Path, workdir: str, env: dict[str, str]
    ) -> None:
        """Baseline without the tree, put it back, checkpoint it: all of it is new."""
        state = fresh(self.scratch / f"state-{key}")
        parked = self.scratch / "parked"
        os.rename(root / "data", parked)
        sh(self.agent(root, workdir, state, "baseline"), env=env)
        os.rename(parked, root / "data")
        checkpoint = self.agent(root, workdir, state, "checkpoint", "--name", "full")
        self.timed(key, checkpoint, env, reads=(root / "data",))
        again = self.agent(root, workdir, state, "checkpoint", "--name", "again")
        self.timed(f"{key}_unchanged", again, env)

    def target(self, key: str, kind: str = "scratch") -> Path:
        """An empty directory for a restore: in the scratch dir, or on a new disk."""
        if kind == "scratch":
            return fresh(self.scratch / f"restored-{key}")
        return self.disks[kind].new(key)

    def release(self) -> None:
        for disks in self.disks.values():
            disks.release()

    def restore(self, key: str, workdir: str, env: dict[str, str], kind: str = "scratch") -> Path:
        target = self.target(on(key, kind), kind)
        state = fresh(self.scratch / f"state2-{on(key, kind)}")
        restore = self.agent(target, workdir, state, "restore", "--checkpoint", "full")
        local = () if "://" in workdir else (Path(workdir),)
        self.timed(on(key, kind), restore, env, reads=local)
        return target


@dataclass
class Result:
    """What one run measured: every step's seconds per round, and the sizes."""

    times: dict[str, list[float]]
    files: int
    size: int  # bytes of the tree's files
    layer_bytes: int
    tar_zst_bytes: int
    peak_rss_mb: float
    restic: bool
    s3: bool
    tree: Path  # the copy the rounds ran on (kept, below scratch)


def copy_tree(source: Path, dest: Path, limit_bytes: int | None = None) -> None:
    """``source`` copied to ``dest``; with ``limit_bytes``, only its first
    top-level entries (by name) until that much is copied: a smaller real tree."""
    if limit_bytes is None:
        shutil.copytree(source, dest, symlinks=True)
        return
    dest.mkdir(parents=True)
    copied = 0
    for entry in sorted(source.iterdir()):
        if copied >= limit_bytes:
            break
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, dest / entry.name, symlinks=True)
            copied += sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())
        else:
            shutil.copy2(entry, dest / entry.name, follow_symlinks=False)
            copied += entry.lstat().st_size


def measure(
    source: Path,
    scratch: Path,
    repeat: int,
    warmup: int,
    s3: bool = False,
    limit_bytes: int | None = None,
    restore_disks: tuple[str, ...] = ("scratch",),
) -> Result:
    """The rounds of the benchmark on a copy of ``source`` below ``scratch``
    (the restores once on each of ``restore_disks``: see ``disks.py`` and ``on``)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # Byte-compiled, as the images install it (images/base/build-agent-env): without
    # this, where PYTHONDONTWRITEBYTECODE is set, every run would compile the agent's
    # sources again, about 50 ms no installed agent pays.
    sh([sys.executable, "-m", "compileall", "-q", str(REPO / "agent")])
    b = Bench(scratch, env, {kind: Disks(kind, scratch) for kind in restore_disks})
    root = fresh(scratch / "root")
    copy_tree(source, root / "data", limit_bytes)
    files = sum(len(f) for _, _, f in os.walk(root / "data"))
    size = sum(
        p.stat().st_size for p in (root / "data").rglob("*") if p.is_file() and not p.is_symlink()
    )
    print(f"tree: {files} files, {size / 1e6:.0f} MB from {source}", file=sys.stderr)

    restic = shutil.which("restic")
    renv = dict(env, RESTIC_PASSWORD="bench", RESTIC_CACHE_DIR=str(scratch / "restic-cache"))
    s3env: dict[str, str] | None = None
    stop_s3: Callable[[], None] | None = None
    if s3:
        sys.path.insert(0, str(REPO / "bench"))
        from s3_store import start_local_s3  # type: ignore[import-not-found]

        endpoint, stop_s3 = start_local_s3()
        s3env = dict(
            env, AWS_ENDPOINT_URL_S3=endpoint, AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
        )  # fmt: skip
        import boto3  # type: ignore[import-untyped]

        boto3.client(
            "s3", endpoint_url=endpoint, aws_access_key_id="bench",
            aws_secret_access_key="bench", region_name="us-east-1",
        ).create_bucket(Bucket="bench")  # fmt: skip

    out = scratch / "ref.tar.zst"
    work = ""
    try:
        for i in range(-warmup, repeat):
            b.recording = i >= 0
            print(f"round {i + 1}/{repeat}" if i >= 0 else "warm-up", file=sys.stderr)
            # Delete the last round's trees first and let the disk settle, so that
            # no step pays for another's deletions.
            b.release()
            for old in scratch.iterdir():
                if old.name not in ("root", "restic-cache") and old.is_dir():
                    shutil.rmtree(old)
            sh("sync")
            work = str(fresh(scratch / "work"))
            # Who goes first alternates between rounds: neither side always meets
            # the disk just after the other's writes.
            ours_first = i % 2 == 0

            def tar_zstd() -> None:
                tar = f"tar -C '{root}' -c data | zstd -3 -T0 -q -f -o '{out}'"
                b.timed("tar_zstd", tar, reads=(root / "data",))

            def untar(kind: str) -> None:
                untarred = b.target(on("untarred", kind), kind)
                cmd = f"zstd -d -q -c '{out}' | tar -C '{untarred}' -x"
                b.timed(on("untar", kind), cmd, reads=(out,))

            if not ours_first:
                tar_zstd()
            b.checkpoint_whole_tree("checkpoint", root, work, env)
            if ours_first:
                tar_zstd()
            for kind in restore_disks:
                if not ours_first:
                    untar(kind)
                target = b.restore("restore", work, env, kind)
                if ours_first:
                    untar(kind)
                if i == -warmup:
                    sh(["diff", "-r", "--no-dereference", str(root / "data"), str(target / "data")])
            if restic:
                repo = fresh(scratch / "restic-repo")
                sh([restic, "init", "-q", "--repo", str(repo)], env=renv)
                backup = [restic, "backup", "-q", "--repo", str(repo), str(root / "data")]
                b.timed("restic_backup", backup, renv, reads=(root / "data",))
                b.timed("restic_backup_unchanged", backup, renv)
                for kind in restore_disks:
                    rt = b.target(on("restic-restored", kind), kind)
                    restore = [
                        restic, "restore", "-q", "latest", "--repo", str(repo), "--target", str(rt),
                    ]  # fmt: skip
                    b.timed(on("restic_restore", kind), restore, renv, reads=(repo,))
            if s3env is not None:
                s3work = f"s3://bench/round{i}"
                b.checkpoint_whole_tree("s3_checkpoint", root, s3work, s3env)
                b.restore("s3_restore", s3work, s3env, restore_disks[0])
    finally:
        b.release()
        if stop_s3 is not None:
            stop_s3()

    layer = max(
        p.stat().st_size for p in (Path(work) / ".studios/checkpoints/blobs/sha256").iterdir()
    )
    return Result(
        times=b.times, files=files, size=size, layer_bytes=layer,
        tar_zst_bytes=out.stat().st_size, peak_rss_mb=b.peak_rss_mb,
        restic=restic is not None, s3=s3env is not None, tree=root / "data",
    )  # fmt: skip


def _disk_kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in kinds if k not in KINDS]
    if not kinds or bad:
        raise argparse.ArgumentTypeError(f"not one of {', '.join(KINDS)}: {text!r}")
    return kinds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--source", type=Path, default=Path(sysconfig.get_paths()["purelib"]))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    ap.add_argument(
        "--scratch", type=Path, default=None, help="work directory (default: a temp dir)"
    )
    ap.add_argument("--s3", action="store_true", help="also run through the S3 store (local moto)")
    ap.add_argument(
        "--restore-disk",
        type=_disk_kinds,
        default=("scratch",),
        help="where the restores write: the scratch dir (default), or a new tmpfs or "
        "slow disk for each (root only; see bench/disks.py); several, comma-separated",
    )
    args = ap.parse_args()

    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="studio-bench-"))
    r = measure(
        args.source, scratch, args.repeat, args.warmup, s3=args.s3, restore_disks=args.restore_disk
    )
    rows = [("checkpoint, whole tree new", "checkpoint", "`tar -c | zstd -3 -T0`", "tar_zstd")]
    for kind in args.restore_disk:
        where = f"restore into an empty root ({kind})"
        rows.append((where, on("restore", kind), "`zstd -d | tar -x`", on("untar", kind)))
    if r.restic:
        rows += [
            ("checkpoint, whole tree new", "checkpoint", "`restic backup`", "restic_backup"),
            (
                "checkpoint, nothing changed",
                "checkpoint_unchanged",
                "`restic backup`, nothing changed",
                "restic_backup_unchanged",
            ),
        ]
        for kind in args.restore_disk:
            where = f"restore into an empty root ({kind})"
            restic_restore = on("restic_restore", kind)
            rows.append((where, on("restore", kind), "`restic restore`", restic_restore))
    if r.s3:
        rows += [
            ("checkpoint through S3 (local moto)", "s3_checkpoint", "local store", "checkpoint"),
            (
                "restore through S3 (local moto)",
                on("s3_restore", args.restore_disk[0]),
                "local store",
                on("restore", args.restore_disk[0]),
            ),
        ]
    cpus = os.cpu_count()
    print(
        f"\nTree: {r.files} files, {r.size / 1e6:.0f} MB; {cpus} CPUs; best of {args.repeat} "
        f"after {args.warmup} warm-up round(s); restores on: {', '.join(args.restore_disk)}.\n"
    )
    print("| step | ours | reference | ratio of the best times | ratio in each round | median |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, ours, ref_label, ref in rows:
        o, t = min(r.times[ours]), min(r.times[ref])
        shown = ref_label.replace("|", "\\|")
        ratios = [x / y for x, y in zip(r.times[ours], r.times[ref], strict=True)]
        rounds = ", ".join(f"{x:.2f}" for x in ratios)
        median = statistics.median(ratios)
        print(
            f"| {label} | {o:.2f} s | {shown} {t:.2f} s | {o / t:.2f} | {rounds} | {median:.2f} |"
        )
    print(
        f"\nLayer {r.layer_bytes / 1e6:.1f} MB, tar.zst {r.tar_zst_bytes / 1e6:.1f} MB; "
        f"peak RSS of our checkpoint and restore processes {r.peak_rss_mb:.0f} MB."
    )
    if args.scratch is None:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
