"""The one-shot commands as a user runs them: output, names, errors, exit codes."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.checkpoint.names import normalize_name
from agent.errors import InvalidName
from agent.settings import load_settings


class Cli:
    def __init__(self, tmp: Path, studio: str = "st") -> None:
        self.root = tmp / "root"
        self.root.mkdir(exist_ok=True)
        self.work = tmp / "work"
        self.state = tmp / f"state-{studio}"
        self.studio = studio

    def __call__(
        self, *args: str, ok: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        cmd = [
            sys.executable, "-m", "agent", "--root", str(self.root), "--workdir", str(self.work),
            "--studio", self.studio, "--state-dir", str(self.state), *args,
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if ok:
            assert proc.returncode == 0, proc.stderr
        return proc

    def listing(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = json.loads(self("checkpoints", "--json").stdout)
        return out


def one_line_error(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("studio-agent: error: ") and needle in lines[0], lines[0]


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    c = Cli(tmp_path)
    (c.root / "etc").mkdir()
    c("baseline")
    return c


def test_names_normalized_and_refused() -> None:
    assert normalize_name("my first try") == "my_first_try"
    for bad, why in [
        ("", "empty"),
        ("x" * 129, "longer than 128"),
        ("a/b", "'/'"),
        ("a\tb", "control"),
    ]:
        with pytest.raises(InvalidName, match=why):
            normalize_name(bad)
    assert normalize_name("x" * 128) == "x" * 128


def test_invalid_names_are_one_line_errors(cli: Cli) -> None:
    one_line_error(cli("checkpoint", "--name", "a/b", ok=False), "'/'")
    one_line_error(cli("checkpoint", "--name", "x" * 200, ok=False), "longer than 128")
    one_line_error(cli("rename", "missing", "other", ok=False), "no checkpoint 'missing'")


def test_second_name_leaves_first_as_it_was(cli: Cli) -> None:
    (cli.root / "etc/a").write_text("1")
    cli("checkpoint", "--name", "first try")
    before = {c["name"]: c for c in cli.listing()}
    assert set(before) == {"first_try"}
    (cli.root / "etc/b").write_text("2")
    cli("checkpoint", "--name", "second")
    after = {c["name"]: c for c in cli.listing()}
    # What deleting it would free shrinks: the second checkpoint shares its layer.
    assert after["first_try"].pop("frees") < before["first_try"].pop("frees")
    assert after["first_try"] == before["first_try"]
    assert after["second"]["layers"] == 2


def test_default_restore_takes_the_most_recently_written(cli: Cli, tmp_path: Path) -> None:
    (cli.root / "etc/v").write_text("1")
    cli("checkpoint", "--name", "a")
    (cli.root / "etc/v").write_text("2")
    cli("checkpoint", "--name", "b")
    (cli.root / "etc/v").write_text("3")
    cli("checkpoint", "--name", "a")  # a is updated last: it wins over b
    assert [c["name"] for c in cli.listing()] == ["a", "b"]
    (tmp_path / "o").mkdir()
    other = Cli(tmp_path / "o")
    other.work, other.studio = cli.work, cli.studio
    out = other("restore").stdout
    assert "restored st/a" in out
    assert (other.root / "etc/v").read_text() == "3"


def test_name_taken_by_another_session_is_a_conflict(cli: Cli, tmp_path: Path) -> None:
    cli("checkpoint", "--name", "shared")
    other = Cli(tmp_path, studio="st")
    other.state = tmp_path / "state-other"
    other("baseline")
    one_line_error(other("checkpoint", "--name", "shared", ok=False), "already exists")


def test_rename(cli: Cli) -> None:
    cli("checkpoint", "--name", "old")
    cli("checkpoint", "--name", "taken")
    one_line_error(cli("rename", "old", "taken", ok=False), "already exists")
    assert "renamed old to new_name" in cli("rename", "old", "new name").stdout
    assert sorted(c["name"] for c in cli.listing()) == ["new_name", "taken"]


def test_diff_largest_first(cli: Cli) -> None:
    (cli.root / "etc/small").write_bytes(b"x" * 10)
    (cli.root / "etc/large").write_bytes(b"x" * 5000)
    doc = json.loads(cli("diff", "--json").stdout)
    paths = [c["path"] for c in doc["changes"]]
    assert paths[:2] == ["etc/large", "etc/small"]
    assert doc["total_size"] == 5010
    text = cli("diff").stdout
    assert text.index("/etc/large") < text.index("/etc/small")


def test_checkpoint_before_baseline_says_what_to_do(tmp_path: Path) -> None:
    c = Cli(tmp_path)
    one_line_error(c("checkpoint", ok=False), "run 'studio-agent baseline'")


def test_no_workdir_is_a_clear_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STUDIO_")}
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "--root", str(tmp_path), "checkpoints"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    one_line_error(proc, "no workdir set")


def test_restore_of_a_studio_without_checkpoints_fails_clearly(tmp_path: Path) -> None:
    c = Cli(tmp_path, studio="empty")
    one_line_error(c("restore", ok=False), "no valid checkpoint")


def test_flag_wins_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STUDIO_STUDIO", "from-env")
    monkeypatch.setenv("STUDIO_CHECKPOINT_INTERVAL", "60")
    monkeypatch.setenv("STUDIO_EXCLUDE", "var/cache,home/*/.cache")
    s = load_settings(studio="from-flag")
    assert s.studio == "from-flag" and s.checkpoint_interval == 60.0
    assert s.exclude == ["var/cache", "home/*/.cache"]
    assert s.state_path == Path("/var/lib/studio-agent")


def test_bad_setting_is_one_line(tmp_path: Path) -> None:
    c = Cli(tmp_path)
    env = dict(os.environ, STUDIO_CHECKPOINT_INTERVAL="soon")
    one_line_error(c("checkpoints", ok=False, env=env), "checkpoint_interval")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_while_walking_then_writing() -> None:
    """While the walk goes on nothing says how much is to come: no percentage, no
    "of 0 B"; once it is known, the line shows it, and the last state always shows."""
    from agent.cli import _ProgressLine
    from agent.session import Progress

    term = _Terminal()
    line = _ProgressLine(term)
    assert line.update is not None
    line.update(Progress("scan", 1_500_000, 0, 300, 0))
    assert term.getvalue().endswith("scan     1.5 MB 300 entries")
    line.update(Progress("write", 4_000_000, 4_000_000, 800, 800))
    assert term.getvalue().endswith("write    100.0% 4.0 MB of 4.0 MB 800/800 entries")
