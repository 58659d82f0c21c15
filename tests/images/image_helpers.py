"""Helpers for the image tests: Dockerfile contracts, buildah, free ports, bounded waits."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

REPO = Path(__file__).resolve().parents[2]
BASE_DOCKERFILE = REPO / "Dockerfile.base"
TEMPLATES = ("jupyterlab", "rstudio", "vscode", "xpra")
# The platform's default tool port for each template.
PLATFORM_PORTS = {"jupyterlab": 8080, "rstudio": 8787, "vscode": 3000, "xpra": 14500}

T = TypeVar("T")


# -- Dockerfiles -------------------------------------------------------------------------


def logical_lines(dockerfile: Path) -> list[str]:
    """Instructions with continuation lines joined and comments dropped."""
    out: list[str] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    if pending:
        out.append(pending)
    return out


def instructions(dockerfile: Path, keyword: str) -> list[str]:
    """The arguments of every ``keyword`` instruction, in order."""
    key = keyword.upper()
    found = []
    for line in logical_lines(dockerfile):
        word, _, rest = line.partition(" ")
        if word.upper() == key:
            found.append(rest.strip())
    return found


def env_of(dockerfile: Path) -> dict[str, str]:
    """The ENV variables a Dockerfile sets (``KEY=VALUE`` form), later lines winning."""
    env: dict[str, str] = {}
    for rest in instructions(dockerfile, "ENV"):
        for token in shlex.split(rest):
            key, sep, value = token.partition("=")
            if not sep:
                raise AssertionError(f"{dockerfile}: use ENV KEY=VALUE, not {rest!r}")
            env[key] = value
    return env


@dataclass(frozen=True)
class Contract:
    """What a template tells the agent: the IDE command, its port, its readiness path."""

    name: str
    dockerfile: Path
    command: list[str]
    port: int
    ready_path: str

    @property
    def directory(self) -> Path:
        return self.dockerfile.parent


def contract(name: str) -> Contract:
    dockerfile = REPO / "images" / name / "Dockerfile"
    env = env_of(dockerfile)
    raw = env["STUDIO_IDE_COMMAND"]
    command = json.loads(raw) if raw.startswith("[") else shlex.split(raw)
    return Contract(
        name=name,
        dockerfile=dockerfile,
        command=command,
        port=int(env["CONNECT_TOOL_PORT"]),
        ready_path=env.get("STUDIO_READY_PATH", "/"),
    )


# -- tools ---------------------------------------------------------------------------------


def need(what: str, ok: bool, why: str) -> None:
    """Skip when a tool is missing, except in CI, where .ci/install-image-tools installs it."""
    if ok:
        return
    message = f"{what} not available: {why}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI runs .ci/install-image-tools first)")
    pytest.skip(message)


def which(name: str, extra_dirs: Sequence[Path] = ()) -> str | None:
    path = os.pathsep.join([*map(str, extra_dirs), os.environ.get("PATH", "")])
    return shutil.which(name, path=path)


# -- buildah -------------------------------------------------------------------------------


class Buildah:
    """buildah with its own storage, so tests never touch the machine's images."""

    def __init__(self, root: Path, driver: str) -> None:
        self.root = root
        self.driver = driver
        self.exe = shutil.which("buildah") or "buildah"

    def argv(self, *args: str) -> list[str]:
        return [
            self.exe,
            "--root",
            str(self.root / "storage"),
            "--runroot",
            str(self.root / "run"),
            "--storage-driver",
            self.driver,
            *args,
        ]

    def __call__(
        self, *args: str, timeout: float = 600, check: bool = True, input: bytes | None = None
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            self.argv(*args),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=None if input is None else input.decode(),
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"buildah {' '.join(args[:3])} failed ({proc.returncode}):\n"
                f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
            )
        return proc

    def new_container(self, image: str) -> str:
        return self("from", "--quiet", "--pull=never", image).stdout.strip()

    def run(
        self,
        container: str,
        script: str,
        *,
        volumes: Mapping[Path, str] = {},
        env: Mapping[str, str] = {},
        timeout: float = 600,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run a shell script in the container (chroot isolation, the host's network)."""
        args = ["run", "--isolation", "chroot"]
        for host, inside in volumes.items():
            args += ["--volume", f"{host}:{inside}"]
        for key, value in env.items():
            args += ["--env", f"{key}={value}"]
        return self(*args, container, "--", "/bin/sh", "-ec", script, timeout=timeout, check=check)

    def image_config(self, image: str) -> dict[str, Any]:
        out = self("inspect", "--type", "image", image).stdout
        config: dict[str, Any] = json.loads(out)["OCIv1"]["config"]
        return config

    def cleanup(self) -> None:
        self("rm", "--all", check=False)
        self("rmi", "--all", "--force", check=False)


# -- processes and ports -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def http_status(url: str, timeout: float = 5) -> int | None:
    """The status of a GET without following redirects; None when nothing answers."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except (urllib.error.URLError, OSError):
        return None


def wait_for(
    what: str,
    probe: Callable[[], T | None],
    timeout: float,
    interval: float = 0.25,
    alive: Callable[[], str | None] | None = None,
) -> T:
    """Poll ``probe`` until it returns something truthy; fail after ``timeout`` seconds.

    ``alive`` returns a reason to give up early (the process under test died).
    """
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        if alive is not None and (reason := alive()):
            raise AssertionError(f"gave up waiting for {what}: {reason}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON objects among a log's lines (the agent logs JSON lines)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out
