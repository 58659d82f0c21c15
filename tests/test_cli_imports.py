"""What a one-shot command with the local store loads: none of S3, HTTP or the daemon.

Every import is start-up time a user waits for on each command (aiohttp and the
AWS SDK alone take longer than a small checkpoint); these load where they are
used, and this keeps them there.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

# Run the CLI in a process of its own, then report what it had imported.
_RUN = """
import json, sys
from agent.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""

# Never needed with the local store.
NEVER = (
    "aiohttp",
    "aioboto3",
    "aiobotocore",
    "botocore",
    "boto3",
    "psutil",
    "prometheus_client",
    "watchfiles",
    "agent.store.s3",
    "agent.daemon.main",
    "agent.daemon.api",
    "agent.daemon.client",
    "agent.daemon.models",
    "agent.session.gc",
    "agent.session.export",
    "agent.session.squash",
)
# What restoring may need, and a checkpoint or a baseline does not.
RESTORE_ONLY = ("agent.checkpoint.restore", "agent.session.verify", "agent.store.fetch")


def _run(tmp: Path, *args: str) -> set[str]:
    cmd = [
        sys.executable, "-c", _RUN, "--root", str(tmp / "root"), "--workdir", str(tmp / "work"),
        "--state-dir", str(tmp / "state"), "--studio", "st", *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout.splitlines()[-1])
    assert doc["code"] == 0, proc.stderr
    return set(doc["modules"])


def _loaded(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in names))


def test_local_one_shot_commands_load_no_s3_http_or_daemon(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.txt").write_text("before")
    baseline = _run(tmp_path, "baseline")
    (root / "a.txt").write_text("after")
    (root / "b.bin").write_bytes(bytes(range(256)) * 4096)
    checkpoint = _run(tmp_path, "checkpoint", "--name", "one")
    (root / "a.txt").write_text("lost")
    restore = _run(tmp_path, "restore", "--checkpoint", "one", "--force")
    assert (root / "a.txt").read_text() == "after"  # the commands did their work

    assert _loaded(baseline, NEVER + RESTORE_ONLY) == []
    assert _loaded(checkpoint, NEVER + RESTORE_ONLY) == []
    assert _loaded(restore, NEVER) == []
    assert "agent.checkpoint.restore" in restore  # what is imported late is seen too
