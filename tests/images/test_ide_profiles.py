"""Each template's launch command, run by the agent with the real tool where it installs here.

The command, default port and readiness path come from the ENV lines of the
template's Dockerfile, and the launch script is the one the image copies, so
the images and these tests cannot drift.  The agent's daemon runs on the host
with a scratch root and work directory, launches the script on a free
127.0.0.1 port (STUDIO_TOOL_HOST narrows the templates' 0.0.0.0), waits for it
to answer on the readiness path, and stops it with SIGTERM.

The tool versions here are what installs on this machine (JupyterLab 4.2.5
from PyPI, Debian's Xpra and R, code-server 4.93.1 from npm), not always the
images' (Xpra 6.2.0 and R 4.4.1 come from their vendors' repositories).
RStudio Server cannot be installed here at all: see test_rstudio_launch_flags.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from image_helpers import (
    REPO,
    Contract,
    contract,
    free_port,
    http_status,
    json_lines,
    need,
    port_open,
    wait_for,
    which,
)

pytestmark = pytest.mark.slow

# Where each profile's tool is found, besides PATH.
_VENV_BIN = Path(sys.executable).parent
_TOOLS = {
    "jupyterlab": ("jupyter", [_VENV_BIN], "JupyterLab 4.2.5 from the test extras"),
    "vscode": ("code-server", [], "code-server 4.93.1 from npm (.ci/install-image-tools)"),
    "xpra": ("xpra", [], "Debian's xpra (.ci/install-image-tools)"),
}
# Tools that serve under the platform's path prefix; the others need a proxy
# that strips it (docs/custom-environments.md).
_PREFIX_CAPABLE = {"jupyterlab", "rstudio"}


class AgentRun:
    """The agent's daemon on the host, running one template's launch command."""

    def __init__(self, c: Contract, tool_dirs: list[Path], tmp: Path) -> None:
        self.contract = c
        self.port = free_port()
        self.prefix = "/studio/s-test/" if c.name in _PREFIX_CAPABLE else "/"
        home = tmp / "home"
        home.mkdir()
        root = tmp / "root"
        (root / "etc").mkdir(parents=True)
        (root / "etc" / "hostname").write_text("studio\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("STUDIO_", "CONNECT_"))}
        env.update(
            HOME=str(home),
            XDG_RUNTIME_DIR=str(tmp / "runtime"),
            XAUTHORITY=str(home / ".Xauthority"),
            PATH=os.pathsep.join([str(c.directory), *map(str, tool_dirs), env.get("PATH", "")]),
            STUDIO_ROOT=str(root),
            STUDIO_WORKDIR=str(tmp / "work"),
            STUDIO_STUDIO=f"profile-{c.name}",
            STUDIO_API_PORT=str(free_port()),
            STUDIO_IDE_COMMAND=" ".join(c.command),
            STUDIO_READY_PATH=c.ready_path,
            STUDIO_READY_TIMEOUT="240",
            STUDIO_WORKSPACE=str(tmp / "workspace"),
            STUDIO_TOOL_HOST="127.0.0.1",
            CONNECT_TOOL_PORT=str(self.port),
            CONNECT_TOOL_PATH_PREFIX=self.prefix,
        )
        self.log_path = tmp / "agent.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run"],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def url(self) -> str:
        path = self.contract.ready_path.lstrip("/")
        return f"http://127.0.0.1:{self.port}{self.prefix}{path}"

    def died(self) -> str | None:
        if self.proc.poll() is None:
            return None
        return f"agent exited {self.proc.returncode}:\n{self.logs()[-4000:]}"

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self) -> list[str]:
        return [str(e.get("event")) for e in json_lines(self.logs())]

    def ide_pids(self) -> list[int]:
        return [int(e["pid"]) for e in json_lines(self.logs()) if e.get("event") == "ide.started"]

    def stop(self) -> int:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                return self.proc.wait(timeout=45)
            return self.proc.returncode
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self._log.close()
            # Whatever the IDE started outlives neither the test nor, in a
            # container, the container; end it here by process id.
            for pid in session_members(self.ide_pids()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def session_members(sessions: list[int]) -> list[int]:
    """Live processes in any of the given sessions (the agent starts the IDE as a
    session leader, so the IDE's session holds everything it started)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        state, session = fields[0], int(fields[3])
        if session in sessions and state != "Z":
            found.append(int(entry.name))
    return found


@pytest.fixture
def agent_run(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AgentRun]:
    name: str = request.param
    exe, extra, what = _TOOLS[name]
    found = which(exe, extra)
    need(what, found is not None, f"{exe} not found")
    assert found is not None
    run = AgentRun(contract(name), [Path(found).parent], tmp_path)
    try:
        yield run
    finally:
        run.stop()


@pytest.mark.parametrize("agent_run", sorted(_TOOLS), indirect=True)
def test_profile_becomes_ready_and_stops_on_sigterm(agent_run: AgentRun) -> None:
    run = agent_run
    wait_for(
        f"{run.contract.name} to answer 200 on {run.url}",
        lambda: http_status(run.url) == 200,
        240,
        interval=0.5,
        alive=run.died,
    )
    wait_for("the agent's ide.ready", lambda: "ide.ready" in run.events(), 30, alive=run.died)
    assert run.stop() == 0, run.logs()[-4000:]
    # SIGTERM to the IDE's process group stopped the tool: its port is free.
    assert not port_open(run.port), f"{run.contract.name} still listening after the stop"
    assert "daemon.exit" in run.events()
    # Nothing the tool started is left, even outside its process group.
    left = session_members(run.ide_pids())
    assert not left, [Path(f"/proc/{p}/cmdline").read_bytes()[:80] for p in left]


# -- RStudio Server ------------------------------------------------------------------------

# rserver's options as RStudio Server documents them (its rserver.conf option
# reference, generated from server-options.json).  RStudio Server is only
# distributed by Posit's download site, which this machine cannot reach, so the
# launch command is checked against these names instead of run.
RSERVER_OPTIONS = {
    "server-working-dir",
    "server-user",
    "server-daemonize",
    "server-pid-file",
    "server-set-umask",
    "server-data-dir",
    "server-add-header",
    "secure-cookie-key-file",
    "www-address",
    "www-port",
    "www-root-path",
    "www-thread-pool-size",
    "www-proxy-localhost",
    "www-verify-user-agent",
    "www-same-site",
    "www-frame-origin",
    "www-enable-origin-check",
    "www-allow-origin",
    "rsession-which-r",
    "rsession-path",
    "rsession-ld-library-path",
    "rsession-config-file",
    "database-config-file",
    "auth-none",
    "auth-validate-users",
    "auth-stay-signed-in-days",
    "auth-timeout-minutes",
    "auth-encrypt-password",
    "auth-login-page-html",
    "auth-required-user-group",
    "auth-minimum-user-id",
    "auth-sign-in-throttle-seconds",
    "auth-cookies-force-secure",
}


def test_rstudio_launch_flags(tmp_path: Path) -> None:
    """The R-IDE launch script, run with a stand-in for rserver that prints its
    arguments (the only stand-in in these tests: RStudio Server cannot be
    installed here), and with Debian's real R for --rsession-which-r."""
    c = contract("rstudio")
    r = which("R")
    need("R", r is not None, "Debian's r-base-core (.ci/install-image-tools)")
    stand_in = tmp_path / "rserver"
    stand_in.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    stand_in.chmod(0o755)
    port = free_port()
    proc = subprocess.run(
        c.command,
        env={
            "PATH": os.pathsep.join([str(c.directory), os.environ.get("PATH", "")]),
            "RSERVER": str(stand_in),
            "RSTUDIO_DATA_DIR": str(tmp_path / "run"),
            "CONNECT_TOOL_PORT": str(port),
            "CONNECT_TOOL_PATH_PREFIX": "/studio/s-r/",
        },
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    flags = dict(arg[2:].split("=", 1) for arg in proc.stdout.split())
    unknown = set(flags) - RSERVER_OPTIONS
    assert not unknown, f"not rserver options: {sorted(unknown)}"
    assert flags["www-port"] == str(port)
    assert flags["www-root-path"] == "/studio/s-r/"
    assert flags["www-address"] == "0.0.0.0"
    assert flags["server-daemonize"] == "0"  # stays the agent's child
    assert flags["server-user"] == "root"
    assert flags["auth-none"] == "1"  # the platform's proxy authenticates
    assert flags["server-data-dir"] == str(tmp_path / "run")
    # --rsession-which-r names an R that runs.
    version = subprocess.run(
        [flags["rsession-which-r"], "--version"], capture_output=True, text=True, timeout=60
    )
    assert version.returncode == 0 and version.stdout.startswith("R version"), version.stdout


def test_profiles_cover_every_template() -> None:
    templates = {p.parent.name for p in (REPO / "images").glob("*/Dockerfile")}
    assert templates == {*_TOOLS, "rstudio"}
