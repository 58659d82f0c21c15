"""The base image, built for real: its layout, its isolation, checkpoints across containers,
and the daemon as the container's entrypoint.

Containers run with buildah's chroot isolation on the host's network; the
entrypoint test runs the image's ENTRYPOINT in fresh PID and mount namespaces
so tini is PID 1 and receives SIGTERM the way a container runtime sends it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from image_helpers import (
    Buildah,
    free_port,
    http_status,
    json_lines,
    port_open,
    wait_for,
)

import agent

pytestmark = pytest.mark.slow

PREFIX = "/opt/studio-agent"


def test_labels_entrypoint_and_layout(buildah: Buildah, base_image: str, container: str) -> None:
    config = buildah.image_config(base_image)
    labels = config["Labels"]
    assert labels["studio.agent.version"] == agent.__version__
    assert labels["org.opencontainers.image.version"] == agent.__version__
    assert labels["org.opencontainers.image.base.name"].endswith("studio-test-debian:bookworm")
    assert config["Entrypoint"][:3] == [f"{PREFIX}/bin/tini", "--", f"{PREFIX}/bin/studio-agent"]

    out = buildah.run(
        container,
        f"""
        command -v studio-agent
        studio-agent --version
        {PREFIX}/bin/python3 -I -c \
            'import sys, os; print(sys.prefix); print(os.path.realpath(sys.executable))'
        # No build tools and no pip left in the final image.
        for tool in gcc cc make patchelf strip pip pip3 {PREFIX}/bin/pip; do
            if command -v "$tool" >/dev/null; then echo "found $tool"; fi
        done
        """,
    ).stdout.split()
    assert out[0] == "/usr/local/bin/studio-agent"
    assert out[1:3] == ["studio-agent", agent.__version__]
    # The agent's venv, and the interpreter behind it, both live in the prefix
    # the engine leaves out of checkpoints (it skips the agent's sys.prefix).
    assert out[3] == PREFIX
    assert out[4].startswith(f"{PREFIX}/python/")
    assert "found" not in out, out


def test_agent_survives_the_session_breaking_python(buildah: Buildah, container: str) -> None:
    """A session installs and then purges the distribution's Python, points the
    loader and Python at junk, and plants a failing usercustomize: the agent
    still runs, imports its native modules and checkpoints."""
    script = f"""
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q >/dev/null
        apt-get install -y -q --no-install-recommends python3 >/dev/null
        test -x /usr/bin/python3
        apt-get purge -y -q --auto-remove \
            python3 python3-minimal 'python3.11*' 'libpython3*' >/dev/null
        # (test !, not ! test: sh -e ignores a failing "! pipeline")
        test ! -e /usr/bin/python3.11
        test ! -e /usr/lib/python3.11
        # Junk that the loader and Python would pick up if they looked.
        mkdir -p /tmp/junk /root/.local/lib/python3.11/site-packages
        for lib in libssl.so.3 libcrypto.so.3 libffi.so.8 libz.so.1 libexpat.so.1 \
                   libsqlite3.so.0 liblzma.so.5 libbz2.so.1.0 libgcc_s.so.1 libstdc++.so.6; do
            echo junk > /tmp/junk/$lib
        done
        echo 'raise SystemExit("user site-packages were imported")' \
            > /root/.local/lib/python3.11/site-packages/usercustomize.py
        export LD_LIBRARY_PATH=/tmp/junk PYTHONHOME=/tmp/junk PYTHONPATH=/tmp/junk
        {PREFIX}/bin/python3 -I -c 'import ssl, ctypes, sqlite3, lzma, bz2, zlib, pyexpat
import zstandard, pydantic_core, aiohttp, psutil
from agent.checkpoint import layer_writer, scan
assert scan._list_dir is not None, "the compiled lister is missing"
assert layer_writer._frame_files is not None, "the compiled framer is missing"
print(ssl.OPENSSL_VERSION)'
        studio-agent --version
        studio-agent baseline --workdir /tmp/w --studio iso
        echo changed > /root/after-purge.txt
        studio-agent checkpoint --workdir /tmp/w --studio iso --name after-purge
        studio-agent checkpoints --workdir /tmp/w --studio iso --json
    """
    out = buildah.run(container, script).stdout
    assert "OpenSSL" in out
    listed = json.loads(out[out.index("[") :])
    assert [c["name"] for c in listed] == ["after-purge"]


def test_checkpoint_in_one_container_restores_in_another(
    buildah: Buildah, base_image: str, container: str, tmp_path: Path
) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    mounts = {workdir: "/work"}
    flags = "--workdir /work --studio s1"
    buildah.run(
        container,
        f"""
        studio-agent baseline {flags}
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q >/dev/null
        apt-get install -y -q --no-install-recommends hello >/dev/null
        hello
        printf 'kept across containers\\n' > /root/notes.txt
        studio-agent checkpoint {flags} --name installed-hello
        """,
        volumes=mounts,
    )
    assert list((workdir / ".studios" / "checkpoints").iterdir())

    fresh = buildah.new_container(base_image)
    try:
        out = buildah.run(
            fresh,
            f"""
            if command -v hello >/dev/null; then echo "hello before restore"; exit 1; fi
            studio-agent restore {flags}
            hello
            cat /root/notes.txt
            studio-agent checkpoints {flags} --json
            """,
            volumes=mounts,
        ).stdout
    finally:
        buildah("rm", fresh, check=False)
    assert "Hello, world!" in out
    assert "kept across containers" in out
    listed = json.loads(out[out.index("[") :])
    assert listed[0]["name"] == "installed-hello"
    assert listed[0]["state"] == "finalized"


# -- the daemon as the entrypoint -------------------------------------------------------

# Runs the rest of its arguments chrooted into $1 as PID 1 of new PID and mount
# namespaces, with /proc, /dev and the work directory ($2) mounted, as a
# container runtime would.
_CONTAINER_INIT = r"""
set -e
root=$1 work=$2
shift 2
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
mkdir -p "$root/work"
mount --bind "$work" "$root/work"
exec chroot "$root" "$@"
"""
_UNSHARE = ["unshare", "--pid", "--fork", "--mount", "--propagation", "private"]


@pytest.fixture
def mounted(buildah: Buildah, container: str) -> Iterator[Path]:
    path = Path(buildah("mount", container).stdout.strip())
    yield path
    buildah("umount", container, check=False)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def test_daemon_as_entrypoint_finalizes_on_sigterm(
    buildah: Buildah, base_image: str, container: str, mounted: Path, tmp_path: Path
) -> None:
    config = buildah.image_config(base_image)
    argv = list(config["Entrypoint"]) + list(config.get("Cmd") or [])
    workdir = tmp_path / "work"
    workdir.mkdir()
    tool_port, api_port = free_port(), free_port()
    # A small IDE the image has: the agent's own interpreter serving HTTP.
    ide = [f"{PREFIX}/bin/python3", "-I", "-m", "http.server", "--bind", "127.0.0.1"]
    env = dict(e.split("=", 1) for e in config.get("Env") or [])
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env.update(
        HOME="/root",
        STUDIO_WORKDIR="/work",
        STUDIO_STUDIO="entry",
        STUDIO_API_PORT=str(api_port),
        STUDIO_IDE_COMMAND=json.dumps([*ide, str(tool_port)]),
        CONNECT_TOOL_PORT=str(tool_port),
        STUDIO_READY_PATH="/",
        STUDIO_READY_TIMEOUT="60",
    )
    log_path = tmp_path / "container.log"
    init = [*_UNSHARE, "/bin/sh", "-c", _CONTAINER_INIT, "init", str(mounted), str(workdir)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*init, *argv],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def died() -> str | None:
        if proc.poll() is None:
            return None
        return f"container exited {proc.returncode}:\n{log_path.read_text()[-3000:]}"

    try:
        # PID 1 of the container: unshare's only child, tini after its execs.
        pid1 = wait_for("the container's PID 1", lambda: _children(proc.pid)[:1], 30, alive=died)[0]
        wait_for(
            "the IDE to answer",
            lambda: http_status(f"http://127.0.0.1:{tool_port}/") == 200,
            90,
            alive=died,
        )
        wait_for(
            "the agent to report the IDE ready",
            lambda: any(e.get("event") == "ide.ready" for e in json_lines(log_path.read_text())),
            30,
            alive=died,
        )
        (mounted / "root" / "made-in-session.txt").write_text("written while running\n")
        os.kill(pid1, signal.SIGTERM)
        # The platform's SIGKILL follows 30 s after SIGTERM: everything fits in it.
        returncode = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    logs = log_path.read_text()
    assert returncode == 0, logs[-3000:]
    assert not port_open(tool_port), "the IDE outlived the container"
    events = [e.get("event") for e in json_lines(logs)]
    assert "daemon.exit" in events, logs[-3000:]

    where = ["--workdir", str(workdir), "--studio", "entry"]
    listed = subprocess.run(
        [sys.executable, "-m", "agent", "checkpoints", "--json", *where],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    checkpoints = json.loads(listed.stdout)
    assert checkpoints, "no checkpoint written"
    assert checkpoints[0]["state"] == "finalized", checkpoints[0]

    # The final checkpoint holds what the session wrote; restore it into another container.
    fresh = buildah.new_container(base_image)
    try:
        out = buildah.run(
            fresh,
            "studio-agent restore --workdir /work --studio entry\ncat /root/made-in-session.txt",
            volumes={workdir: "/work"},
        ).stdout
    finally:
        buildah("rm", fresh, check=False)
    assert "written while running" in out
