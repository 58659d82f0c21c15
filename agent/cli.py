"""``studio-agent``: the daemon (``run``) and one-shot checkpoint commands.

Every setting is a flag ``--<name>`` (built from the settings model) that wins
over ``STUDIO_<NAME>``.  Expected failures print one line on stderr and exit
non-zero; only bugs print a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TextIO, TypeVar, get_args, get_origin

from agent import __version__
from agent.checkpoint.manifest import CheckpointState
from agent.daemon.checkpointer import Kind, state_for
from agent.errors import AgentError
from agent.log import setup_logging
from agent.session import CheckpointInfo, Progress, ProgressFn, Session
from agent.settings import Settings, env_name, load_settings
from agent.store import open_store

T = TypeVar("T")

EXIT_ERROR = 1
EXIT_USAGE = 2


def _settings_parser() -> argparse.ArgumentParser:
    """Flags for every settings field; unset flags stay absent so the environment counts."""
    p = argparse.ArgumentParser(add_help=False)
    group = p.add_argument_group("settings (flag, or environment variable STUDIO_<NAME>)")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_ = f"{field.description or ''} [{env_name(name)}]"
        if get_origin(field.annotation) is list or list in get_args(field.annotation):
            group.add_argument(
                flag,
                dest=name,
                action="append",
                default=argparse.SUPPRESS,
                metavar="VALUE",
                help=help_ + " (repeatable)",
            )
        else:
            group.add_argument(
                flag, dest=name, default=argparse.SUPPRESS, metavar="VALUE", help=help_
            )
    return p


def build_parser() -> argparse.ArgumentParser:
    common = _settings_parser()
    parser = argparse.ArgumentParser(
        prog="studio-agent",
        description="Data studio session agent: supervises the IDE and checkpoints the root "
        "filesystem as OCI layers.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"studio-agent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_, parents=[common])

    add("run", "Run the session daemon: restore, launch the IDE, checkpoint, serve the API.")
    add("baseline", "Record the root as it is now as the parent state (a new session).")
    cp = add("checkpoint", "Write the changes since the parent state as a new checkpoint layer.")
    cp.add_argument("--name", dest="checkpoint_name", help="checkpoint name (default: automatic)")
    cp.add_argument(
        "--state",
        dest="checkpoint_state",
        choices=[CheckpointState.INTERIM.value, CheckpointState.FINALIZED.value],
        default=state_for(Kind.COMMAND).value,
        help="state recorded in the checkpoint (default: finalized)",
    )
    rs = add("restore", "Apply a checkpoint to the root and make it the parent state.")
    rs.add_argument(
        "--checkpoint",
        dest="checkpoint_ref",
        default="",
        help="NAME or STUDIO/NAME (default: the studio's most recently written checkpoint)",
    )
    ls = add("checkpoints", "List the studio's checkpoints, most recently written first.")
    ls.add_argument("--json", action="store_true", help="print JSON")
    df = add("diff", "Show what changed since the parent state, largest first.")
    df.add_argument("--json", action="store_true", help="print JSON")
    df.add_argument("--limit", type=int, default=0, help="show at most this many lines")
    rn = add("rename", "Rename a checkpoint.")
    rn.add_argument("old")
    rn.add_argument("new")
    sq = add("squash", "Squash a checkpoint's layers into one (a new manifest, the ref moved).")
    sq.add_argument(
        "--checkpoint",
        dest="checkpoint_ref",
        default="",
        help="NAME or STUDIO/NAME (default: this session's own checkpoint, else the latest)",
    )
    sq.add_argument("--json", action="store_true", help="print JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    ide_argv: list[str] = []
    if "--" in args_in:
        cut = args_in.index("--")
        args_in, ide_argv = args_in[:cut], args_in[cut + 1 :]
    parser = build_parser()
    args = parser.parse_args(args_in)
    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    try:
        settings = load_settings(**overrides)
        if args.command == "run":
            from agent.daemon.main import run

            return run(settings, ide_argv)
        if ide_argv:
            raise AgentError(f"'{args.command}' takes no command after '--'")
        explicit_level = "log_level" in overrides or env_name("log_level") in os.environ
        setup_logging(settings.log_level if explicit_level else "warning", sys.stderr)
        return asyncio.run(_one_shot(args, settings))
    except AgentError as e:
        print(f"studio-agent: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as e:  # the machine's, not ours: a full disk, a read-only mount...
        where = f": {e.filename}" if e.filename else ""
        print(f"studio-agent: error: {e.strerror or e}{where}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("studio-agent: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into head and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR


async def _one_shot(args: argparse.Namespace, settings: Settings) -> int:
    store = open_store(settings)
    try:
        session = Session(settings, store)
        handler: Callable[[argparse.Namespace, Session], Awaitable[int]] = _COMMANDS[args.command]
        return await handler(args, session)
    finally:
        await store.close()


# -- commands ---------------------------------------------------------------------------


async def _baseline(args: argparse.Namespace, session: Session) -> int:
    await session.baseline()
    print(f"baseline recorded; this session's checkpoint will be {session.auto_name}")
    return 0


async def _checkpoint(args: argparse.Namespace, session: Session) -> int:
    with _ProgressLine(sys.stderr) as bar:
        result = await session.checkpoint(
            args.checkpoint_name,
            CheckpointState(args.checkpoint_state),
            progress=bar.update,
        )
    assert result is not None
    info = result.info
    print(
        f"checkpoint {info.name} ({info.state.value}): {result.changed} changes, "
        f"new layer {_size(result.layer_size)}; {info.layers} layers, {_size(info.size)} in all "
        f"({result.duration:.1f} s)"
    )
    _report_skipped(result.skipped)
    return 0


async def _restore(args: argparse.Namespace, session: Session) -> int:
    with _ProgressLine(sys.stderr) as bar:
        outcome = await session.start(args.checkpoint_ref, progress=bar.update, required=True)
    for bad in outcome.invalidated:
        print(f"checkpoint {bad.name} was unsound and is now marked invalid", file=sys.stderr)
    info = outcome.restored
    assert info is not None
    files = outcome.stats.files if outcome.stats else 0
    print(
        f"restored {info.studio}/{info.name} ({info.layers} layers, {files} files); "
        f"this session's checkpoint will be {session.auto_name}"
    )
    return 0


async def _checkpoints(args: argparse.Namespace, session: Session) -> int:
    infos = await session.list_checkpoints()
    if args.json:
        print(json.dumps([i.to_json() for i in infos], indent=2))
        return 0
    if not infos:
        print(f"studio {session.studio} has no checkpoints")
        return 0
    rows = [_row(i) for i in infos]
    header = ("NAME", "STATE", "CREATED", "UPDATED", "SIZE", "LAYERS")
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    return 0


def _row(i: CheckpointInfo) -> tuple[str, str, str, str, str, str]:
    fmt = "%Y-%m-%d %H:%M:%S"
    return (
        i.name,
        i.state.value,
        i.created.strftime(fmt),
        i.updated.strftime(fmt),
        _size(i.size),
        str(i.layers),
    )


async def _diff(args: argparse.Namespace, session: Session) -> int:
    report = await session.diff()
    lines = report.lines[: args.limit] if args.limit > 0 else report.lines
    if args.json:
        doc: dict[str, Any] = {
            "changes": [{"path": x.path, "kind": x.kind, "size": x.size} for x in lines],
            "total_size": sum(x.size for x in report.lines),
            "count": len(report.lines),
            "skipped": [{"path": s.path, "reason": s.reason} for s in report.skipped],
        }
        print(json.dumps(doc, indent=2))
        return 0
    marks = {"added": "+", "modified": "~", "deleted": "-"}
    for x in lines:
        print(f"{marks[x.kind]} {_size(x.size):>10}  /{x.path}")
    total = sum(x.size for x in report.lines)
    print(f"{len(report.lines)} changes, {_size(total)} of file content")
    _report_skipped(report.skipped)
    return 0


async def _rename(args: argparse.Namespace, session: Session) -> int:
    info = await session.rename(args.old, args.new)
    print(f"renamed {args.old} to {info.name}")
    return 0


async def _squash(args: argparse.Namespace, session: Session) -> int:
    out = await session.squash(args.checkpoint_ref or None)
    if args.json:
        print(json.dumps(out.to_json(), indent=2))
        return 0
    b, a = out.before, out.after
    if not out.squashed:
        print(f"checkpoint {b.studio}/{b.name}: {b.layers} layers, nothing to squash")
        return 0
    print(
        f"squashed {b.studio}/{b.name}: {b.layers} layers, {_size(b.size)} -> "
        f"{a.layers} layers, {_size(a.size)} ({_size(out.superseded)} superseded left out)"
    )
    return 0


_COMMANDS: dict[str, Callable[[argparse.Namespace, Session], Awaitable[int]]] = {
    "baseline": _baseline,
    "checkpoint": _checkpoint,
    "restore": _restore,
    "checkpoints": _checkpoints,
    "diff": _diff,
    "rename": _rename,
    "squash": _squash,
}


# -- output helpers --------------------------------------------------------------------------


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"


def _report_skipped(skipped: Sequence[Any]) -> None:
    for s in skipped:
        print(f"skipped /{s.path}: {s.reason}", file=sys.stderr)


class _ProgressLine:
    """A throttled one-line progress report on a terminal; silent otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.enabled = stream.isatty()
        self._last = 0.0
        self._shown = False

    def __enter__(self) -> _ProgressLine:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()

    @property
    def update(self) -> ProgressFn | None:
        return self._update if self.enabled else None

    def _update(self, p: Progress) -> None:
        now = time.monotonic()
        final = 0 < p.bytes_total <= p.bytes_done  # always shown
        if now - self._last < 0.2 and not final:
            return
        self._last = now
        if p.bytes_total:
            amount = f"{100 * p.bytes_done / p.bytes_total:5.1f}% {_size(p.bytes_done)} of "
            amount += _size(p.bytes_total)
        else:  # still walking: how much is to come is not known yet
            amount = _size(p.bytes_done)
        if p.files_total:
            files = f"{p.files_done}/{p.files_total} entries"
        else:
            files = f"{p.files_done} entries" if p.files_done else ""
        self.stream.write(f"\r\033[K{p.phase:8} {amount} {files}")
        self.stream.flush()
        self._shown = True
