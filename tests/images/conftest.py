"""Session fixtures for the image tests: one Debian root, one base-image build.

The root is made with debootstrap (Debian bookworm, minbase) and imported into
a buildah storage of the test session's own; Dockerfile.base is then built on
it once, with this repository as the build context, and shared by every test.

Environment:
  STUDIO_TEST_DEBIAN_MIRROR    the Debian mirror (default: deb.debian.org)
  STUDIO_TEST_STORAGE_DRIVER   buildah's storage driver (default: overlay, with
                               vfs where the kernel cannot mount overlay)
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from image_helpers import BASE_DOCKERFILE, REPO, Buildah, need

import agent

DEBIAN_SUITE = "bookworm"
DEBIAN_IMAGE = "localhost/studio-test-debian:bookworm"
BASE_IMAGE = "localhost/studio-test-base:latest"

# Seconds per step, printed after the run so CI logs show where the time goes.
TIMINGS: dict[str, float] = {}


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TIMINGS:
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in TIMINGS.items())
        terminalreporter.write_line(f"image test timings: {parts}")


def _host_ca_bundle() -> Path | None:
    """The CA bundle this machine trusts, if it has one in a file."""
    candidates = [
        os.environ.get("SSL_CERT_FILE", ""),
        ssl.get_default_verify_paths().cafile or "",
        "/etc/ssl/certs/ca-certificates.crt",
    ]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    return None


@pytest.fixture(scope="session")
def image_tools() -> None:
    need("root", os.geteuid() == 0, "buildah's chroot isolation and debootstrap need root")
    for tool in ("buildah", "debootstrap", "unshare", "chroot"):
        need(tool, shutil.which(tool) is not None, "not on PATH")


@pytest.fixture(scope="session")
def image_workspace(image_tools: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("images")


@pytest.fixture(scope="session")
def debian_tarball(image_workspace: Path) -> Path:
    """A minimal Debian root as a tar file, made once per test session."""
    rootfs = image_workspace / "debian-rootfs"
    mirror = os.environ.get("STUDIO_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
    started = time.monotonic()
    proc = subprocess.run(
        ["debootstrap", "--variant=minbase", DEBIAN_SUITE, str(rootfs), mirror],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        raise AssertionError(f"debootstrap failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    TIMINGS["debootstrap"] = time.monotonic() - started
    # A build host behind a TLS-inspecting proxy trusts that proxy's CA; so must
    # the image's build, as an in-house base image would (pip uses the image's
    # CA store).  Elsewhere this only repeats the public CAs.
    ca = _host_ca_bundle()
    if ca is not None:
        local_cas = rootfs / "usr/local/share/ca-certificates"
        local_cas.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ca, local_cas / "build-host.crt")
    tarball = image_workspace / "debian-rootfs.tar"
    subprocess.run(
        ["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(tarball), "."], check=True
    )
    shutil.rmtree(rootfs)
    return tarball


def _import(buildah: Buildah, tarball: Path) -> None:
    ctr = buildah("from", "scratch").stdout.strip()
    buildah("add", ctr, str(tarball), "/")
    buildah("config", "--cmd", "/bin/bash", ctr)
    buildah("commit", "--quiet", "--rm", ctr, DEBIAN_IMAGE)


@pytest.fixture(scope="session")
def buildah(image_workspace: Path, debian_tarball: Path) -> Iterator[Buildah]:
    """buildah with session-private storage holding the imported Debian image."""
    wanted = os.environ.get("STUDIO_TEST_STORAGE_DRIVER")
    drivers = [wanted] if wanted else ["overlay", "vfs"]
    b: Buildah | None = None
    errors = []
    started = time.monotonic()
    for driver in drivers:
        b = Buildah(image_workspace / f"buildah-{driver}", driver)
        try:
            _import(b, debian_tarball)
            break
        except AssertionError as e:  # overlay cannot mount here: try the next driver
            errors.append(f"{driver}: {e}")
            b.cleanup()
            b = None
    if b is None:
        raise AssertionError("could not import the Debian root:\n" + "\n".join(errors))
    TIMINGS[f"import ({b.driver})"] = time.monotonic() - started
    yield b
    b.cleanup()
    # Storage left mounted by a crashed run would make the directory undeletable.
    subprocess.run(["umount", "-R", str(b.root / "storage" / b.driver)], capture_output=True)
    shutil.rmtree(b.root, ignore_errors=True)


@pytest.fixture(scope="session")
def base_image(buildah: Buildah) -> str:
    """Dockerfile.base built on the Debian root, with this repository as the context."""
    started = time.monotonic()
    buildah(
        "build",
        "--isolation",
        "chroot",
        "--layers=false",
        "--pull=never",
        "-f",
        str(BASE_DOCKERFILE),
        "--build-arg",
        f"BASE_IMAGE={DEBIAN_IMAGE}",
        "--build-arg",
        f"AGENT_VERSION={agent.__version__}",
        "-t",
        BASE_IMAGE,
        str(REPO),
        timeout=1200,
    )
    TIMINGS["base build"] = time.monotonic() - started
    return BASE_IMAGE


@pytest.fixture
def container(buildah: Buildah, base_image: str) -> Iterator[str]:
    """A fresh container of the base image, removed after the test."""
    ctr = buildah.new_container(base_image)
    yield ctr
    buildah("rm", ctr, check=False)
