"""The one-shot commands as a user runs them: output, names, errors, exit codes."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.checkpoint.names import NAME_RULE, normalize_name
from agent.cli import _COMMANDS
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
        """The studio's checkpoints; none when nothing was ever written to the store
        (which ``checkpoints`` reports as an error of its own)."""
        proc = self("checkpoints", "--json", ok=False)
        if proc.returncode == 1 and "no checkpoint store at" in proc.stderr:
            return []
        assert proc.returncode == 0, proc.stderr
        out: list[dict[str, object]] = json.loads(proc.stdout)
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
    assert normalize_name("v1.2-rc+3@home") == "v1.2-rc+3@home"
    for bad, why in [
        ("", "checkpoint name is empty"),
        ("x" * 129, "checkpoint name is longer than 128 characters"),
        ("a/b", "checkpoint name 'a/b' contains '/'"),
        ("a\tb", "checkpoint name 'a\\tb' contains '\\t'"),
        ("a:b", "checkpoint name 'a:b' contains ':'"),
        ("café", "checkpoint name 'café' contains 'é'"),
        ("-x", "checkpoint name '-x' starts with '-'"),
        (".hidden", "checkpoint name '.hidden' starts with '.'"),
        (" x", "checkpoint name ' x' starts with ' '"),
    ]:
        with pytest.raises(InvalidName) as e:
            normalize_name(bad)
        assert str(e.value).startswith(why), str(e.value)
    assert normalize_name("x" * 128) == "x" * 128


@pytest.mark.parametrize(
    "name",
    ["ok", "my work", "a:b", "café", "-x", "_x", ".x", "", " x", "x ", "a/b", "a\tb", "x" * 128,
     "x" * 129, "ünïcode", "1.0", "a@b+c-d", "tab\there", "new\nline", "x\u00a0y"],
)  # fmt: skip
def test_the_cli_and_the_api_accept_the_same_names(name: str) -> None:
    """One rule: the API's published schema accepts a name iff normalize_name does."""
    from pydantic import TypeAdapter, ValidationError

    from agent.daemon.models import CheckpointName

    try:
        normalize_name(name)
        cli_ok = True
    except InvalidName:
        cli_ok = False
    try:
        TypeAdapter(CheckpointName).validate_python(name)
        api_ok = True
    except ValidationError:
        api_ok = False
    assert cli_ok == api_ok


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", f"checkpoint name is empty: {NAME_RULE}"),
        ("a:b", f"checkpoint name 'a:b' contains ':': {NAME_RULE}"),
        ("café", f"checkpoint name 'café' contains 'é': {NAME_RULE}"),
        ("-x", f"checkpoint name '-x' starts with '-': {NAME_RULE}"),
        ("a/b", f"checkpoint name 'a/b' contains '/': {NAME_RULE}"),
        ("x" * 200, f"checkpoint name is longer than 128 characters: {'x' * 40}..."),
    ],
)
def test_invalid_names_are_one_line_errors(cli: Cli, name: str, message: str) -> None:
    proc = cli("checkpoint", f"--name={name}", ok=False)
    assert (proc.returncode, proc.stderr) == (1, f"studio-agent: error: {message}\n")
    assert cli.listing() == []  # nothing written, not even under the automatic name


def test_rename_of_a_missing_checkpoint_and_to_a_bad_name(cli: Cli) -> None:
    one_line_error(cli("rename", "missing", "other", ok=False), "no checkpoint 'missing'")
    cli("checkpoint", "--name", "kept")
    proc = cli("rename", "kept", "a:b", ok=False)
    assert proc.stderr == f"studio-agent: error: checkpoint name 'a:b' contains ':': {NAME_RULE}\n"
    assert [c["name"] for c in cli.listing()] == ["kept"]


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
    assert paths[:2] == ["/etc/large", "/etc/small"]  # as the text output shows them
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


# -- usage errors: one line, a pointer to --help, exit 2 ------------------------------------


def _usage_error(proc: subprocess.CompletedProcess[str], message: str) -> None:
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == f"studio-agent: error: {message}\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "the following arguments are required: COMMAND (see 'studio-agent --help')"),
        (["frob"], "argument COMMAND: invalid choice: 'frob' (choose from "
         f"{', '.join(map(repr, ['run', *_COMMANDS]))}) (see 'studio-agent --help')"),
        (["checkpoints", "--bogus"],
         "unrecognized arguments: --bogus (see 'studio-agent checkpoints --help')"),
        (["--bogus", "diff"], "unrecognized arguments: --bogus (see 'studio-agent diff --help')"),
        (["checkpoint", "--state", "done"], "argument --state: invalid choice: 'done' (choose "
         "from 'interim', 'finalized') (see 'studio-agent checkpoint --help')"),
        (["checkpoint", "--name"],
         "argument --name: expected one argument (see 'studio-agent checkpoint --help')"),
        (["diff", "--limit", "many"],
         "argument --limit: invalid int value: 'many' (see 'studio-agent diff --help')"),
        (["rename", "a"],
         "the following arguments are required: NEW (see 'studio-agent rename --help')"),
        (["--log-level", "loud", "checkpoints"], "argument --log-level: invalid choice: 'loud' "
         "(choose from 'debug', 'info', 'warning', 'error') (see 'studio-agent --help')"),
        (["diff", "--", "ls"],
         "'diff' takes no command after '--' (see 'studio-agent diff --help')"),
    ],
)  # fmt: skip
def test_bad_flags_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    _usage_error(Cli(tmp_path)(*args, ok=False), message)


@pytest.mark.parametrize("command", ["run", *_COMMANDS])
def test_every_command_reports_an_unknown_flag_in_one_line(tmp_path: Path, command: str) -> None:
    positionals = {
        "rename": ["a", "b"],
        "delete": ["a"],
        "delete-studio": ["a"],
        "export": ["--oci", "x"],
    }.get(command, [])
    proc = Cli(tmp_path)(command, *positionals, "--no-such-flag", ok=False)
    _usage_error(
        proc, f"unrecognized arguments: --no-such-flag (see 'studio-agent {command} --help')"
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"STUDIO_CHECKPOINT_INTERVAL": "soon"}, "invalid setting checkpoint_interval "
         "(--checkpoint-interval or STUDIO_CHECKPOINT_INTERVAL): 'soon' is not a number"),
        ({"STUDIO_CHECKPOINT_INTERVAL": "0"}, "invalid setting checkpoint_interval "
         "(--checkpoint-interval or STUDIO_CHECKPOINT_INTERVAL): must be greater than 0, not 0"),
        ({"CONNECT_TOOL_PORT": "http"}, "invalid setting tool_port "
         "(--tool-port or STUDIO_TOOL_PORT or CONNECT_TOOL_PORT): 'http' is not a whole number"),
        ({"STUDIO_TOOL_PORT": "70000"}, "invalid setting tool_port (--tool-port or "
         "STUDIO_TOOL_PORT or CONNECT_TOOL_PORT): must be at most 65535, not 70000"),
        ({"STUDIO_S3_PART_SIZE": "1024"}, "invalid setting s3_part_size "
         "(--s3-part-size or STUDIO_S3_PART_SIZE): must be at least 5242880, not 1024"),
        ({"STUDIO_LOG_LEVEL": "loud"}, "invalid setting log_level (--log-level or "
         "STUDIO_LOG_LEVEL): must be one of debug, info, warning, error, not 'loud'"),
        ({"STUDIO_EXCLUDE": "[1"}, "invalid setting exclude (--exclude or STUDIO_EXCLUDE): "
         "'[1' is not a JSON list (Expecting ',' delimiter: line 1 column 3 (char 2))"),
        ({"STUDIO_IDE_COMMAND": "'jupyter"}, "invalid setting ide_command (--ide-command or "
         "STUDIO_IDE_COMMAND): \"'jupyter\" is not a shell command line (No closing quotation)"),
        ({"STUDIO_COMPRESSION_LEVEL": "20"}, "invalid setting compression_level "
         "(--compression-level or STUDIO_COMPRESSION_LEVEL): must be at most 19, not 20"),
    ],
)  # fmt: skip
def test_bad_settings_are_one_line_in_our_words(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    proc = Cli(tmp_path)("checkpoints", ok=False, env=dict(os.environ, **env))
    _usage_error(proc, message)
    assert "Input should" not in proc.stderr and "Value error" not in proc.stderr


def test_a_bad_studio_id_is_one_line(tmp_path: Path) -> None:
    c = Cli(tmp_path, studio="..")
    _usage_error(
        c("checkpoints", ok=False),
        "invalid setting studio (--studio or STUDIO_STUDIO): a studio id may not be empty, "
        "'.' or '..', nor contain '/' or control characters, not '..'",
    )


def test_run_reports_its_configuration_error_on_stderr(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STUDIO_")}
    proc = Cli(tmp_path)("run", ok=False, env=env)
    assert proc.returncode == 2
    assert proc.stderr == (
        "studio-agent: error: no IDE command: pass it after '--' (studio-agent run -- CMD ...) "
        "or set STUDIO_IDE_COMMAND\n"
    )
    logged = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [e["event"] for e in logged if e["level"] == "error"] == ["daemon.config_error"]


# -- paths that point the wrong way ---------------------------------------------------------


def test_a_root_that_does_not_exist_is_refused_not_created(tmp_path: Path) -> None:
    c = Cli(tmp_path)
    c.root = tmp_path / "typo"
    proc = c("baseline", ok=False)
    assert (proc.returncode, proc.stderr) == (
        1,
        f"studio-agent: error: the root {c.root} does not exist (set by --root or STUDIO_ROOT)\n",
    )
    assert not c.root.exists()


def test_a_state_dir_that_is_a_file_is_named_as_such(tmp_path: Path) -> None:
    c = Cli(tmp_path)
    c.state.write_text("not a directory")
    for command in ("baseline", "checkpoint", "diff"):
        proc = c(command, ok=False)
        assert (proc.returncode, proc.stderr) == (
            1,
            f"studio-agent: error: the state dir {c.state} is not a directory "
            "(set by --state-dir or STUDIO_STATE_DIR)\n",
        )


def test_a_state_dir_that_cannot_be_made_is_named_as_such(tmp_path: Path) -> None:
    c = Cli(tmp_path)
    c.state = Path("/proc/studio-agent-state")  # no one may create anything there
    proc = c("baseline", ok=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith(
        "studio-agent: error: cannot create the state dir /proc/studio-agent-state: "
    )
    assert proc.stderr.endswith(" (set by --state-dir or STUDIO_STATE_DIR)\n")
    assert proc.stderr.count("\n") == 1


# -- output: --json everywhere, help that says what it does ---------------------------------


def test_checkpoint_restore_and_rename_speak_json(cli: Cli, tmp_path: Path) -> None:
    (cli.root / "etc/conf").write_text("x" * 100)
    made = json.loads(cli("checkpoint", "--name", "first try", "--json").stdout)
    assert made["checkpoint"]["name"] == "first_try" and made["checkpoint"]["layers"] == 1
    assert made["changed"] >= 1 and made["layer_size"] > 0 and made["skipped"] == []
    renamed = json.loads(cli("rename", "first_try", "kept", "--json").stdout)
    assert (renamed["name"], renamed["digest"]) == ("kept", made["checkpoint"]["digest"])
    (tmp_path / "o").mkdir()
    other = Cli(tmp_path / "o")
    other.work, other.studio = cli.work, cli.studio
    restored = json.loads(other("restore", "--checkpoint", "kept", "--json").stdout)
    assert restored["restored"]["name"] == "kept" and restored["files"] >= 1
    assert restored["invalidated"] == []
    assert restored["session_checkpoint"].startswith("st_")


def test_help_shows_defaults_choices_and_the_ide_command(tmp_path: Path) -> None:
    run_help = Cli(tmp_path)("run", "--help").stdout
    assert run_help.startswith("usage: studio-agent run [SETTINGS ...] [-- CMD [ARG ...]]\n")
    flat = " ".join(run_help.split())
    assert "[STUDIO_CHECKPOINT_INTERVAL; default: 300.0]" in flat
    assert "[STUDIO_TOOL_PORT or CONNECT_TOOL_PORT; default: 8080]" in flat
    assert "--log-level {debug,info,warning,error}" in flat
    cp_help = " ".join(Cli(tmp_path)("checkpoint", "--help").stdout.split())
    assert "(default: finalized)" in cp_help and "--json" in cp_help


# -- a closed pipe is no error ---------------------------------------------------------------


def _through_head(cli: Cli, *args: str) -> tuple[int, str, bytes]:
    """``studio-agent ARGS | head -1`` through a real pipe: the agent's exit code and
    stderr, and what head printed."""
    cmd = [
        sys.executable, "-m", "agent", "--root", str(cli.root), "--workdir", str(cli.work),
        "--studio", cli.studio, "--state-dir", str(cli.state), *args,
    ]  # fmt: skip
    agent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert agent.stdout is not None and agent.stderr is not None
    head = subprocess.Popen(["head", "-1"], stdin=agent.stdout, stdout=subprocess.PIPE)
    agent.stdout.close()  # head alone holds the read end: its exit breaks the pipe
    out, _ = head.communicate(timeout=60)
    err = agent.stderr.read().decode()
    agent.stderr.close()
    return agent.wait(timeout=60), err, out


def test_output_into_head_exits_quietly(cli: Cli) -> None:
    for name in ("a", "b", "c"):
        cli("checkpoint", "--name", name)
    for _ in range(12):
        code, err, out = _through_head(cli, "checkpoints")
        assert (code, err) == (0, "")
        assert out.startswith(b"NAME ")
    # more output than a pipe holds: the agent surely writes into a closed pipe
    for i in range(3000):
        (cli.root / "etc" / f"f{i:04}").write_bytes(b"x")
    for args in (("diff",), ("diff", "--json"), ("checkpoints", "--json")):
        code, err, out = _through_head(cli, *args)
        assert (code, err) == (0, ""), args
        assert out
