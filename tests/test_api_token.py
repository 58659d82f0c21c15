"""The generated API token file: mode 0600, replaced atomically, never written
through a symlink or into a file planted at its name."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agent.daemon.api_token import FILE_NAME, api_token
from agent.errors import ConfigError
from agent.settings import Settings, load_settings


def settings(tmp_path: Path, **kw: object) -> Settings:
    return Settings(root=tmp_path / "root", state_dir=tmp_path / "state", **kw)  # type: ignore[arg-type]


def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "state" / FILE_NAME
    s = os.lstat(path)
    assert stat.S_ISREG(s.st_mode) and stat.S_IMODE(s.st_mode) == 0o600
    return path


def test_made_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        token = api_token(settings(tmp_path))
    finally:
        os.umask(old)
    assert token_file(tmp_path).read_text() == token + "\n"
    assert [p.name for p in (tmp_path / "state").iterdir()] == [FILE_NAME]  # no temp left


def test_a_symlink_at_its_name_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "state").mkdir(mode=0o700)
    (tmp_path / "state" / FILE_NAME).symlink_to(victim)
    token = api_token(settings(tmp_path))
    assert victim.read_text() == "precious"
    assert token_file(tmp_path).read_text() == token + "\n"


def test_a_readable_file_at_its_name_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir(mode=0o700)
    planted = tmp_path / "state" / FILE_NAME
    planted.write_text("old")
    os.chmod(planted, 0o644)
    other = tmp_path / "hardlink"
    os.link(planted, other)  # someone keeps a handle on the old inode
    token = api_token(settings(tmp_path))
    assert token_file(tmp_path).read_text() == token + "\n"
    assert other.read_text() == "old"  # the token never went into the planted inode


def test_a_configured_token_writes_nothing(tmp_path: Path) -> None:
    assert api_token(settings(tmp_path, api_token="configured")) == "configured"
    assert not (tmp_path / "state" / FILE_NAME).exists()


@pytest.mark.parametrize("text", ["", "  \n"])
def test_an_empty_token_file_is_refused(tmp_path: Path, text: str) -> None:
    f = tmp_path / "token"
    f.write_text(text)
    with pytest.raises(ConfigError, match="holds no token"):
        api_token(settings(tmp_path, api_token_file=f))


@pytest.mark.parametrize("field", ["api_token", "control_plane_token"])
def test_a_whitespace_only_token_is_refused_at_start(field: str) -> None:
    with pytest.raises(ConfigError, match=f"{field}.*only whitespace"):
        load_settings(**{field: " \t "})
