"""A checkpoint through S3 against ``tar -c | zstd -3 -T0 | aws s3 cp - s3://...``.

    python bench/s3_pipeline.py [--source DIR] [--rounds 3] [--warmup 1] [--scratch DIR]

Both sides put the same tree (by default a copy of this interpreter's
site-packages) into one local moto server (server mode, 127.0.0.1, started
here in a process of its own, as ``bench/s3_store.py`` does), round by round,
who goes first alternating.  Ours is ``studio-agent checkpoint`` of the tree
after a baseline of the root without it, so all of it is new; the reference
streams the tar.zst into the store while it compresses.  Every step is its own
process, start-up included, timed by wall clock; before each, the tree is read
once (untimed) and the disk synced.  ``main`` prints each round's ratio and
their minimum, median and maximum.

moto keeps every object over 5 MiB in a temporary file; the server started here
keeps them in /dev/shm when the machine has it, so the disk (whose writeback
other work on the machine keeps busy) does not time the server's copies and
concatenations; both sides are served alike.

The AWS CLI (v1, from PyPI) pins an exact botocore that the agent's aiobotocore
would not accept, so it lives in a virtualenv of its own, made on first use in
``$STUDIO_BENCH_CACHE/awscli-<version>`` (default: ``awscli-<version>`` beside
the scratch directory) and reused after.  It is pointed at moto with
``--endpoint-url`` and dummy credentials; no AWS configuration of this machine
is read.

``measure`` is what other harnesses import; keep its signature.
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
import uuid
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from s3_store import start_local_s3  # noqa: E402

AWSCLI_VERSION = os.environ.get("STUDIO_BENCH_AWSCLI_VERSION", "1.46.2")
BUCKET = "bench"
_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}


def awscli(scratch: Path) -> Path:
    """The ``aws`` executable of the benchmark's own virtualenv, made if missing."""
    cache = Path(os.environ.get("STUDIO_BENCH_CACHE") or scratch.resolve().parent)
    venv = cache / f"awscli-{AWSCLI_VERSION}"
    aws = venv / "bin" / "aws"
    if not aws.exists():
        print(f"installing awscli {AWSCLI_VERSION} into {venv}", file=sys.stderr)
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, f"awscli=={AWSCLI_VERSION}"], check=True)
    return aws


def _aws_env(scratch: Path) -> dict[str, str]:
    """An environment that reaches moto with dummy credentials and nothing else:
    no profile, config or credentials file of this machine, no instance metadata."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= _CREDENTIALS
    env |= {
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(scratch / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(scratch / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    return env


def _read_through(path: Path) -> None:
    """Read every file below ``path`` once, so each step meets a warm page cache."""
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            with open(p, "rb") as f:
                while f.read(1 << 20):
                    pass


def _run(cmd: list[str], env: dict[str, str]) -> float:
    """Run ``cmd`` once after a sync; its wall time in seconds."""
    subprocess.run(["sync"], check=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {proc.stderr.decode(errors='replace')[-2000:]}")
    return seconds


class _Round:
    """One side each, against the server at ``endpoint``."""

    def __init__(self, root: Path, scratch: Path, endpoint: str, aws: Path) -> None:
        self.root = root
        self.scratch = scratch
        self.endpoint = endpoint
        self.aws = aws
        self.env = _aws_env(scratch)
        self.agent_env = self.env | {"AWS_ENDPOINT_URL_S3": endpoint, "PYTHONPATH": str(REPO)}

    def _agent(self, state: Path, workdir: str, *args: str) -> list[str]:
        return [
            sys.executable, "-m", "agent", "--root", str(self.root), "--workdir", workdir,
            "--state-dir", str(state), "--studio", BUCKET, *args,
        ]  # fmt: skip

    def ours(self, tag: str) -> float:
        """``studio-agent checkpoint`` of the tree, all of it new."""
        state = self.scratch / f"state-{tag}"
        shutil.rmtree(state, ignore_errors=True)
        workdir = f"s3://{BUCKET}/ours-{tag}"
        parked = self.scratch / "parked"
        os.rename(self.root / "data", parked)
        try:
            subprocess.run(
                self._agent(state, workdir, "baseline"),
                env=self.agent_env, check=True, stdout=subprocess.DEVNULL,
            )  # fmt: skip
        finally:
            os.rename(parked, self.root / "data")
        _read_through(self.root / "data")
        seconds = _run(self._agent(state, workdir, "checkpoint", "--name", "full"), self.agent_env)
        shutil.rmtree(state, ignore_errors=True)
        return seconds

    def pipeline(self, tag: str) -> float:
        """``tar -c | zstd -3 -T0 | aws s3 cp -`` of the same tree into the same server."""
        _read_through(self.root / "data")
        target = f"s3://{BUCKET}/pipeline-{tag}.tar.zst"
        script = (
            f"set -o pipefail; tar -C '{self.root}' -c data | zstd -3 -T0 -q "
            f"| '{self.aws}' s3 cp - {target} --endpoint-url {self.endpoint} --only-show-errors"
        )
        return _run(["bash", "-c", script], self.env)


def _empty_bucket(endpoint: str) -> None:
    """Delete what the last round stored, so the server's memory and disk stay flat."""
    import boto3  # type: ignore[import-untyped]

    s3 = boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id="bench", aws_secret_access_key="bench",
    )  # fmt: skip
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=BUCKET, Delete={"Objects": keys, "Quiet": True})


def _make_bucket(endpoint: str) -> None:
    import boto3

    boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id="bench", aws_secret_access_key="bench",
    ).create_bucket(Bucket=BUCKET)  # fmt: skip


def measure(
    tree: Path, scratch: Path, rounds: int, *, warmup: int = 1
) -> list[tuple[float, float]]:
    """Per round: our checkpoint's seconds through S3, and the pipeline's.

    ``tree`` is copied into ``scratch`` (a root holding it as ``data``); one
    moto server serves every round; ``warmup`` untimed rounds come first.
    """
    scratch.mkdir(parents=True, exist_ok=True)
    aws = awscli(scratch)
    # Byte-compiled, as the images install it: no run pays for compiling the agent.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "agent")], check=True)
    root = scratch / "root"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    shutil.copytree(tree, root / "data", symlinks=True)
    endpoint, stop = start_local_s3("/dev/shm" if os.path.isdir("/dev/shm") else None)
    results: list[tuple[float, float]] = []
    try:
        _make_bucket(endpoint)
        side = _Round(root, scratch, endpoint, aws)
        for i in range(-warmup, rounds):
            tag = f"{i + warmup}-{uuid.uuid4().hex[:6]}"
            if i % 2 == 0:
                ours, pipe = side.ours(tag), side.pipeline(tag)
            else:
                pipe, ours = side.pipeline(tag), side.ours(tag)
            _empty_bucket(endpoint)
            label = f"round {i + 1}/{rounds}" if i >= 0 else "warm-up"
            print(f"  {label}: ours {ours:.2f} s, pipeline {pipe:.2f} s", file=sys.stderr)
            if i >= 0:
                results.append((ours, pipe))
    finally:
        stop()
        shutil.rmtree(root, ignore_errors=True)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--source", type=Path, default=Path(sysconfig.get_paths()["purelib"]))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    ap.add_argument("--scratch", type=Path, default=None, help="work directory (default: temp)")
    args = ap.parse_args()
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="s3-pipeline-"))
    try:
        results = measure(args.source, scratch, args.rounds, warmup=args.warmup)
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    ratios = [ours / pipe for ours, pipe in results]
    print(f"{os.cpu_count()} CPUs; {len(results)} rounds after {args.warmup} warm-up round(s)")
    for n, ((ours, pipe), r) in enumerate(zip(results, ratios, strict=True), 1):
        print(f"round {n}: ours {ours:.2f} s, pipeline {pipe:.2f} s, ratio {r:.2f}")
    print(
        "ratio to `tar -c | zstd -3 -T0 | aws s3 cp -` (min / median / max): "
        f"{min(ratios):.2f} / {statistics.median(ratios):.2f} / {max(ratios):.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
