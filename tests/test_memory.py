"""No file's content and no whole layer is held in memory: the peak RSS of a
checkpoint of a 1 GB change set stays under 150 MB."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

LIMIT_MB = 150


def _agent(root: Path, tmp: Path, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "agent", "--root", str(root), "--workdir", str(tmp / "work"),
        "--studio", "mem", "--state-dir", str(tmp / "state"), *args,
    ]  # fmt: skip


def _peak_rss_mb(cmd: list[str]) -> float:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    return usage.ru_maxrss / 1024


def test_checkpoint_of_one_gigabyte_stays_under_150_mb(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(_agent(root, tmp_path, "baseline"), check=True, capture_output=True)
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

    peak = _peak_rss_mb(_agent(root, tmp_path, "checkpoint"))
    print(f"peak RSS {peak:.0f} MB")
    assert peak < LIMIT_MB, f"checkpoint of {total / 1e9:.2f} GB peaked at {peak:.0f} MB RSS"
