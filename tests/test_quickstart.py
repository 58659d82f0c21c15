"""The README's quickstart, extracted and run as written (in a scratch directory, on
free ports, with this tree's agent): a new user's first minutes must just work."""

from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def quickstart_script() -> str:
    text = README.read_text()
    section = text.split("## Quickstart", 1)[1]
    m = re.search(r"```sh\n(.*?)```", section, re.S)
    assert m, "the README lost its quickstart block"
    return m.group(1)


def test_the_readme_quickstart_runs_as_written(tmp_path: Path) -> None:
    script = quickstart_script()
    api, tool = _free_port(), _free_port()
    agent = f"{shlex.quote(sys.executable)} -m agent"
    script = (
        script.replace("/tmp/demo", str(tmp_path / "demo"))
        .replace("7070", str(api))
        .replace("8080", str(tool))
        .replace(".venv/bin/studio-agent", agent)
    )
    env_setup = f"set -e\nexport STUDIO_API_PORT={api}\n"
    proc = subprocess.run(
        ["bash", "-c", env_setup + script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    # the status, then the checkpoint asked for as soon as the session runs
    docs = [d for d in _json_docs(out) if "event" not in d]  # not the daemon's log lines
    statuses = [d for d in docs if "status" in d and "ide" in d]
    assert statuses and statuses[0]["status"] == "running", out
    written = [d for d in docs if "checkpoint" in d and "changed" in d]
    assert written and written[0]["checkpoint"]["state"] == "interim", out
    # and after the stop, the session's checkpoint is finalized
    listing = out.strip().splitlines()[-2:]
    assert listing[0].split()[:2] == ["NAME", "STATE"], out
    assert listing[1].split()[1] == "finalized", out


def _json_docs(text: str) -> list[dict[str, object]]:
    """Every JSON object in ``text`` (curl prints no newline after its answer)."""
    decoder, docs, i = json.JSONDecoder(), [], 0
    while (i := text.find("{", i)) >= 0:
        try:
            doc, end = decoder.raw_decode(text, i)
        except ValueError:
            i += 1
            continue
        if isinstance(doc, dict):
            docs.append(doc)
        i = end
    return docs
