"""No file's content and no whole layer is held in memory: the peak RSS of a
checkpoint of a 1 GB change set stays under 150 MB, with either store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.checkpoint.layer_writer import MAX_THREADS

LIMIT_MB = 150

# The CLI reporting its own peak RSS (VmHWM), as the benchmark measures it.
PEAK_RSS = Path(__file__).resolve().parent.parent / "bench" / "peak_rss.py"


def _args(root: Path, workdir: str, state: Path, *args: str) -> list[str]:
    return [
        "--root", str(root), "--workdir", workdir, "--studio", "mem",
        "--state-dir", str(state), *args,
    ]  # fmt: skip


def peak_rss_mb(args: list[str]) -> float:
    proc = subprocess.run(
        [sys.executable, str(PEAK_RSS), *args], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    kb = [int(ln.split()[1]) for ln in proc.stderr.splitlines() if ln.startswith("VmHWM ")]
    assert kb, proc.stderr
    return kb[-1] / 1024


@pytest.mark.parametrize("store", ["local", "s3"])
def test_checkpoint_of_one_gigabyte_stays_under_150_mb(
    tmp_path: Path, store: str, request: pytest.FixtureRequest
) -> None:
    # Through S3 the SDK and its clients (40 MB) are loaded besides the compressor.
    workdir = str(tmp_path / "work") if store == "local" else request.getfixturevalue("s3_workdir")
    root = tmp_path / "root"
    root.mkdir()
    assert peak_rss_mb(_args(root, workdir, tmp_path / "state", "baseline")) < LIMIT_MB
    chunk = os.urandom(1 << 20)
    text = b"sample,value,label\n" * 55_000
    for i in range(3):  # large incompressible files, read in chunks
        with open(root / f"model-{i}.bin", "wb") as f:
            for _ in range(256):
                f.write(chunk)
    with open(root / "table.csv", "wb") as f:  # a large compressible one
        for _ in range(200):
            f.write(text)
    pkgs = root / "site-packages"
    pkgs.mkdir()
    for i in range(30_000):  # many small files, as a pip install makes
        d = pkgs / f"pkg{i // 500}"
        if i % 500 == 0:
            d.mkdir()
        (d / f"mod{i}.py").write_bytes(text[: 200 + (i % 3000) * 7])
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert total > 1_000_000_000

    # As many zstd workers as a machine of many CPUs gets by default.
    threads = ["--compression-threads", str(MAX_THREADS)]
    peak = peak_rss_mb(_args(root, workdir, tmp_path / "state", *threads, "checkpoint"))
    assert peak < LIMIT_MB, f"checkpoint of {total / 1e9:.2f} GB peaked at {peak:.0f} MB RSS"
    # And the restore of it, into an empty root.
    target = tmp_path / "target"
    target.mkdir()
    peak = peak_rss_mb(_args(target, workdir, tmp_path / "state2", "restore"))
    assert peak < LIMIT_MB, f"restore of {total / 1e9:.2f} GB peaked at {peak:.0f} MB RSS"
    assert (target / "model-2.bin").stat().st_size == 256 << 20
