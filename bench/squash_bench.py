"""Restore time and storage of a studio after many periodic checkpoints, before and after squash.

    python bench/squash_bench.py [--checkpoints 100] [--files 5] [--packages a,b,c] [--scratch DIR]

The root holds a copy of a few real installed packages (this interpreter's
site-packages); the first checkpoint writes them, then each of ``--checkpoints``
periodic checkpoints changes ``--files`` of their files (edits, plus one file
added and one deleted), as a session editing a project does.  Measured, each
as its own process as a user runs it: ``studio-agent restore`` of the studio
into a fresh root before the squash, ``studio-agent squash``, the restore again;
and the bytes of the store's blobs before and after the squash, and after
``studio-agent gc --grace 0s`` when this build has it (the squash only adds a
blob; what it makes unreachable is gc's to take).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.session import Session  # noqa: E402
from agent.settings import Settings  # noqa: E402
from agent.store.local import LocalStore  # noqa: E402

STUDIO = "bench"


def agent(root: Path, work: Path, state: Path, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "agent", "--root", str(root), "--workdir", str(work),
        "--studio", STUDIO, "--state-dir", str(state), *args,
    ]  # fmt: skip


def run(cmd: list[str]) -> tuple[float, str]:
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr}")
    return time.monotonic() - t0, proc.stdout


def blob_bytes(work: Path) -> tuple[int, int]:
    blobs = work / ".studios/checkpoints/blobs/sha256"
    files = [p for p in blobs.iterdir() if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def has_gc() -> bool:
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "--help"], capture_output=True, text=True, cwd=REPO
    )
    return " gc " in proc.stdout or "\n    gc" in proc.stdout or "{gc" in proc.stdout


def restore_times(
    base: Path, work: Path, scratch: Path, names: list[str], repeat: int
) -> list[float]:
    """The best of ``repeat`` restores of each of ``names`` into a fresh copy of the
    base, interleaved, so a busy machine or disk penalises each alike."""
    best = [float("inf")] * len(names)
    for i in range(repeat):
        for k, name in enumerate(names if i % 2 == 0 else names[::-1]):
            j = names.index(name)
            target, state = scratch / f"restore-{i}-{k}", scratch / f"state-{i}-{k}"
            shutil.copytree(base, target, symlinks=True)
            subprocess.run(["sync"], check=True)
            seconds, _ = run(agent(target, work, state, "restore", "--checkpoint", name))
            best[j] = min(best[j], seconds)
            shutil.rmtree(target)
            shutil.rmtree(state)
    return best


async def make_history(root: Path, work: Path, state: Path, n: int, per: int, seed: int) -> str:
    session = Session(
        Settings(root=root, workdir=str(work), studio=STUDIO, state_dir=state), LocalStore(work)
    )
    await session.baseline()
    rnd = random.Random(seed)
    tree = root / "opt/pkgs"
    shutil.copytree(PKGS_SRC, tree, dirs_exist_ok=True)  # the first checkpoint writes it
    await session.checkpoint()
    files = sorted(p for p in tree.rglob("*.py") if p.is_file())
    for i in range(n):
        for f in rnd.sample(files, min(per, len(files))):
            with open(f, "a") as out:
                out.write(f"\n# edited at checkpoint {i}\n")
        new = tree / f"notes/n{i}.py"
        new.parent.mkdir(exist_ok=True)
        new.write_text(f"x = {i}\n" * 200)
        if i:
            (tree / f"notes/n{i - 1}.py").unlink()
        await session.checkpoint()
    await session.release_lease()  # the session ends, as at a clean stop
    return session.auto_name


PKGS_SRC = Path()


def keep_unsquashed(work: Path, name: str) -> None:
    """A second ref at the chain as it is, to restore it beside the squashed one."""

    async def go() -> None:
        store = LocalStore(work)
        ref = await store.get_ref(STUDIO, name)
        assert ref is not None
        await store.set_ref(STUDIO, "unsquashed", ref.digest, None)

    asyncio.run(go())


def main() -> None:
    global PKGS_SRC
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoints", type=int, default=100)
    p.add_argument("--files", type=int, default=5)
    p.add_argument("--packages", default="pydantic,aiohttp,hypothesis,botocore")
    p.add_argument("--repeat", type=int, default=5, help="restores timed; the best counts")
    p.add_argument("--scratch", type=Path, default=None)
    args = p.parse_args()
    site = Path(sysconfig.get_paths()["purelib"])
    scratch = Path(tempfile.mkdtemp(prefix="squash-bench-", dir=args.scratch))
    try:
        PKGS_SRC = scratch / "pkgs"
        for name in args.packages.split(","):
            shutil.copytree(site / name, PKGS_SRC / name, symlinks=True)
        base = scratch / "base"
        (base / "usr").mkdir(parents=True)
        (base / "usr/os-release").write_text("ID=bench\n")
        root = scratch / "root"
        shutil.copytree(base, root, symlinks=True)
        work, state = scratch / "work", scratch / "state"
        t0 = time.monotonic()
        name = asyncio.run(make_history(root, work, state, args.checkpoints, args.files, 1))
        history = time.monotonic() - t0
        listed = json.loads(run(agent(root, work, state, "checkpoints", "--json"))[1])
        own = next(c for c in listed if c["name"] == name)
        tree_files = sum(1 for _ in (root / "opt/pkgs").rglob("*"))
        bytes_before, blobs_before = blob_bytes(work)
        keep_unsquashed(work, name)
        squash_s, out = run(agent(root, work, state, "squash", "--checkpoint", name, "--json"))
        squashed = json.loads(out)
        bytes_after, blobs_after = blob_bytes(work)
        restore_before, restore_after = restore_times(
            base, work, scratch, ["unsquashed", name], args.repeat
        )
        gc_line = "gc: `studio-agent gc` not in this build; storage after gc not measured"
        if has_gc():
            # The unsquashed chain is kept only to time its restore: deleted
            # first, as a user deletes what is superseded, it is gc's to take.
            run(agent(root, work, state, "delete", "unsquashed"))
            run(agent(root, work, state, "gc", "--grace", "0s"))
            bytes_gc, blobs_gc = blob_bytes(work)
            gc_line = f"after gc --grace 0s: {bytes_gc / 1e6:.1f} MB in {blobs_gc} blobs"
        print(f"tree: {tree_files} entries of {args.packages}; {history:.1f} s to write history")
        print(
            f"checkpoint {name}: {own['layers']} layers, {own['size'] / 1e6:.1f} MB -> "
            f"{squashed['after']['layers']} layer, {squashed['after']['size'] / 1e6:.1f} MB "
            f"(squash {squash_s:.1f} s, {squashed['superseded'] / 1e6:.1f} MB superseded)"
        )
        print(
            f"restore (best of {args.repeat}): {restore_before:.2f} s before squash, "
            f"{restore_after:.2f} s after"
        )
        print(
            f"store: {bytes_before / 1e6:.1f} MB in {blobs_before} blobs before squash, "
            f"{bytes_after / 1e6:.1f} MB in {blobs_after} blobs after"
        )
        print(gc_line)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        os.sync()


if __name__ == "__main__":
    main()
