"""``studio-agent``: the daemon (``run``) and one-shot checkpoint commands.

Every setting is a flag ``--<name>`` (built from the settings model) that wins
over ``STUDIO_<NAME>``.  Expected failures print one line on stderr and exit
non-zero; only bugs print a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence, Sized
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO, TypeVar, get_args, get_origin
from urllib.parse import quote

from agent import __version__
from agent.checkpoint.manifest import CheckpointState
from agent.checkpoint.names import normalize_name
from agent.daemon.checkpointer import Kind, state_for
from agent.errors import AgentError, ConfigError, NotFound
from agent.log import setup_logging
from agent.session import CheckpointInfo, Progress, ProgressFn, Session
from agent.session.owner import Owner, StateDirBusy
from agent.settings import (
    DEFAULT_STATE_DIR,
    Settings,
    check_paths,
    choices,
    env_name,
    env_names,
    flag_name,
    load_settings,
)
from agent.store import open_store

if TYPE_CHECKING:
    from agent.daemon.client import DaemonApi

T = TypeVar("T")

EXIT_ERROR = 1
EXIT_USAGE = 2

# the commands that write the state dir (made if missing, so it must be writable)
_WRITES_STATE = frozenset({"run", "baseline", "checkpoint", "restore"})


class UsageError(Exception):
    """A mistake in the command line: one line on stderr, exit 2."""


class Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line naming ``--help``.

    Subcommands are made with this class too (argparse builds them with the
    parent's class), so every command, present and future, errs the same way;
    the namespace remembers which parser parsed it, so an unknown flag is
    reported by its subcommand.  Flags are never abbreviated: with a flag per
    setting, a prefix that names one today names two tomorrow."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.set_defaults(_parser=self)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: None = None
    ) -> argparse.Namespace:
        ns, extra = self.parse_known_args(args, namespace)
        if extra:
            culprit: argparse.ArgumentParser = getattr(ns, "_parser", self)
            culprit.error(f"unrecognized arguments: {' '.join(extra)}")
        return ns


def _default_text(name: str) -> str:
    """A setting's default as help shows it ("" when it has none worth showing)."""
    field = Settings.model_fields[name]
    default = field.get_default(call_default_factory=True)
    if name == "state_dir":
        return "<root>/" + DEFAULT_STATE_DIR
    return "" if default in ("", [], None) else str(default)


def _settings_parser() -> Parser:
    """Flags for every settings field; unset flags stay absent so the environment counts."""
    p = Parser(add_help=False)
    group = p.add_argument_group("settings (a flag wins over its environment variable)")
    for name, field in Settings.model_fields.items():
        flag = flag_name(name)
        default = _default_text(name)
        help_ = (field.description or "").replace("%", "%%")
        help_ += f" [{' or '.join(env_names(name))}"
        help_ += f"; default: {default}]" if default else "]"
        values = choices(name)
        if get_origin(field.annotation) is list or list in get_args(field.annotation):
            group.add_argument(
                flag,
                dest=name,
                action="append",
                default=argparse.SUPPRESS,
                metavar="VALUE",
                help=help_ + " (repeatable)",
            )
        elif values:
            group.add_argument(
                flag,
                dest=name,
                default=argparse.SUPPRESS,
                type=str.lower,
                choices=values,
                help=help_,
            )
        else:
            group.add_argument(
                flag, dest=name, default=argparse.SUPPRESS, metavar="VALUE", help=help_
            )
    return p


def build_parser() -> argparse.ArgumentParser:
    common = _settings_parser()
    parser = Parser(
        prog="studio-agent",
        description="Data studio session agent: supervises the IDE and checkpoints the root "
        "filesystem as OCI layers.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"studio-agent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help_: str, **kwargs: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_, parents=[common], **kwargs)

    def json_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="print the result as JSON")

    add(
        "run",
        "Run the session daemon: restore, launch the IDE, checkpoint, serve the API.",
        usage="%(prog)s [SETTINGS ...] [-- CMD [ARG ...]]",
        epilog="CMD is the IDE's command line, run as the daemon's child; without it the "
        "daemon runs ide_command.\nExit codes: 0 stopped, 1 errored, 2 bad configuration.",
    )
    add("baseline", "Record the root as it is now as the parent state (a new session).")
    cp = add("checkpoint", "Write the changes since the parent state as a new checkpoint layer.")
    cp.add_argument(
        "--name",
        dest="checkpoint_name",
        help="checkpoint name; spaces become underscores (default: the session's automatic "
        "name, <studio>_<epoch>)",
    )
    cp.add_argument(
        "--state",
        dest="checkpoint_state",
        choices=[CheckpointState.INTERIM.value, CheckpointState.FINALIZED.value],
        default=state_for(Kind.COMMAND).value,
        help="state recorded in the checkpoint (default: %(default)s)",
    )
    json_flag(cp)
    rs = add("restore", "Apply a checkpoint to the root and make it the parent state.")
    rs.add_argument(
        "--checkpoint",
        dest="checkpoint_ref",
        default="",
        metavar="NAME",
        help="NAME or STUDIO/NAME (default: the studio's most recently written checkpoint)",
    )
    rs.add_argument(
        "--force",
        action="store_true",
        help="restore even over changes since the last checkpoint (they are lost)",
    )
    json_flag(rs)
    ls = add("checkpoints", "List the studio's checkpoints, most recently written first.")
    json_flag(ls)
    df = add("diff", "Show what changed since the parent state, largest first.")
    json_flag(df)
    df.add_argument(
        "--limit", type=int, default=0, help="show at most this many changes (default: all)"
    )
    rn = add("rename", "Rename a checkpoint (spaces in NEW become underscores).")
    rn.add_argument("old", metavar="OLD")
    rn.add_argument("new", metavar="NEW")
    json_flag(rn)
    vf = add("verify", "Check that every blob of a checkpoint is in the store, whole.")
    which = vf.add_mutually_exclusive_group()
    which.add_argument(
        "--checkpoint",
        dest="checkpoint_ref",
        default="",
        help="NAME or STUDIO/NAME (default: the studio's most recently written checkpoint)",
    )
    which.add_argument("--all", dest="every", action="store_true", help="every checkpoint")
    vf.add_argument(
        "--read-data",
        action="store_true",
        help="also read each blob, decompress each layer, and check their digests",
    )
    json_flag(vf)
    _add_storage_commands(add)
    st = add("studios", "List the studios that have checkpoints in the work directory.")
    json_flag(st)
    sq = add("squash", "Squash a checkpoint's layers into one (a new manifest, the ref moved).")
    sq.add_argument(
        "--checkpoint",
        dest="checkpoint_ref",
        default="",
        help="NAME or STUDIO/NAME (default: this session's own checkpoint, else the latest)",
    )
    json_flag(sq)
    ex = add(
        "export",
        "Export a checkpoint as an OCI image layout: its chain squashed into one layer, on "
        "the layers of a base image.",
        epilog="The layout is read by any OCI tool: skopeo copy oci:DIR:TAG docker://REGISTRY/"
        "IMAGE:TAG pushes it.\nDIR must be new or empty; it is complete once it has index.json.",
    )
    ex.add_argument(
        "--checkpoint",
        dest="checkpoint_ref",
        default="",
        metavar="NAME",
        help="NAME or STUDIO/NAME (default: the studio's most recently written checkpoint)",
    )
    ex.add_argument(
        "--oci", required=True, metavar="DIR", help="the OCI image layout to write (new or empty)"
    )
    ex.add_argument(
        "--base",
        default="",
        metavar="DIR",
        help="an OCI image layout of the image the session ran on (e.g. skopeo copy "
        "docker://TEMPLATE oci:DIR): the export is that image plus the checkpoint",
    )
    ex.add_argument(
        "--tag",
        default="",
        help="the image's name in the layout, org.opencontainers.image.ref.name (default: "
        "the checkpoint's name)",
    )
    json_flag(ex)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _main(list(sys.argv[1:] if argv is None else argv))
        sys.stdout.flush()  # a closed pipe shows here, not at exit where it cannot be caught
        return code
    except BrokenPipeError:  # output piped into head and the like: the reader has enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except UsageError as e:
        print(f"studio-agent: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("studio-agent: interrupted", file=sys.stderr)
        return 130


def _main(args_in: list[str]) -> int:
    ide_argv: list[str] = []
    if "--" in args_in:
        cut = args_in.index("--")
        args_in, ide_argv = args_in[:cut], args_in[cut + 1 :]
    args = build_parser().parse_args(args_in)
    if ide_argv and args.command != "run":
        args._parser.error(f"'{args.command}' takes no command after '--'")
    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    try:
        settings = load_settings(**overrides)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    try:
        check_paths(settings, create_state=args.command in _WRITES_STATE)
        if args.command == "run":
            from agent.daemon.main import run

            return run(settings, ide_argv)
        explicit_level = "log_level" in overrides or env_name("log_level") in os.environ
        setup_logging(settings.log_level if explicit_level else "warning", sys.stderr)
        # What the imports built lives until exit: frozen, no collection traverses it
        # again, nor the interpreter's at exit (tens of ms after a large checkpoint).
        gc.freeze()
        return asyncio.run(_one_shot(args, settings))
    except BrokenPipeError:
        raise
    except AgentError as e:
        print(f"studio-agent: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as e:  # the machine's, not ours: a full disk, a read-only mount...
        where = f": {e.filename}" if e.filename else ""
        print(f"studio-agent: error: {e.strerror or e}{where}", file=sys.stderr)
        return EXIT_ERROR


async def _one_shot(args: argparse.Namespace, settings: Settings) -> int:
    owner: Owner | None = None
    if args.command in _OWNING:
        owner = Owner(settings.state_path, args.command)
        try:
            owner.acquire()
        except StateDirBusy as e:
            holder = e.holder
            if holder is None or holder.command != "run" or args.command not in _THROUGH_API:
                raise _refusal(args.command, e) from None
            from agent.daemon.client import DaemonApi  # aiohttp: only when needed

            return await _THROUGH_API[args.command](args, DaemonApi(holder, settings))
    store = open_store(settings)
    try:
        session = Session(settings, store)
        if owner is not None:
            await session.clear_leftovers()
        handler: Callable[[argparse.Namespace, Session], Awaitable[int]] = _COMMANDS[args.command]
        try:
            return await handler(args, session)
        finally:
            # A one-shot command's lease (a checkpoint's, a restore's) ends with it.
            await session.release_lease()
    finally:
        await store.close()
        if owner is not None:
            owner.release()


def _refusal(command: str, busy: StateDirBusy) -> AgentError:
    """Why ``command`` cannot run beside the daemon, and what to do instead."""
    holder = busy.holder
    if holder is None or holder.command != "run":
        return busy
    where = f"{holder.describe()}, which owns the state dir {busy.state_dir}"
    if command == "restore":
        return AgentError(
            f"cannot restore under {where}: stop it first (POST /v1/stop), "
            "or start it with restore_from"
        )
    return AgentError(f"cannot '{command}' beside {where}: stop it first")


# -- commands ---------------------------------------------------------------------------


async def _baseline(args: argparse.Namespace, session: Session) -> int:
    await session.baseline()
    print(f"baseline recorded; this session's checkpoint will be {session.auto_name}")
    return 0


async def _checkpoint(args: argparse.Namespace, session: Session) -> int:
    # an empty --name is a mistake, not a request for the automatic name
    name = None if args.checkpoint_name is None else normalize_name(args.checkpoint_name)
    with _ProgressLine(sys.stderr) as bar:
        result = await session.checkpoint(
            name, CheckpointState(args.checkpoint_state), progress=bar.update
        )
    assert result is not None
    if result.note:
        print(f"studio-agent: note: {result.note}", file=sys.stderr)
    info = result.info
    if args.json:
        _print_json(
            {
                "checkpoint": info.to_json(),
                "changed": result.changed,
                "layer_size": result.layer_size,
                "duration": round(result.duration, 6),
                "skipped": _skipped_json(result.skipped),
            }
        )
        return 0
    print(
        f"checkpoint {info.name} ({info.state.value}): {result.changed} changes, "
        f"new layer {_size(result.layer_size)}; {info.layers} layers, {_size(info.size)} in all "
        f"({result.duration:.1f} s)"
    )
    _report_skipped(result.skipped)
    return 0


async def _restore(args: argparse.Namespace, session: Session) -> int:
    try:
        with _ProgressLine(sys.stderr) as bar:
            outcome = await session.start(
                args.checkpoint_ref, progress=bar.update, required=True, force=args.force
            )
    except NotFound as e:
        if not await session.store.exists():  # a mistyped work directory, most likely
            raise NotFound(f"{e}: no checkpoint store at {session.store.url}") from None
        raise
    for bad in outcome.invalidated:
        print(f"checkpoint {bad.name} was unsound and is now marked invalid", file=sys.stderr)
    info = outcome.restored
    assert info is not None
    files = outcome.stats.files if outcome.stats else 0
    if args.json:
        _print_json(
            {
                "restored": info.to_json(),
                "files": files,
                "invalidated": [bad.to_json() for bad in outcome.invalidated],
                "session_checkpoint": session.auto_name,
            }
        )
        return 0
    print(
        f"restored {info.studio}/{info.name} ({info.layers} layers, {files} files); "
        f"this session's checkpoint will be {session.auto_name}"
    )
    return 0


async def _checkpoints(args: argparse.Namespace, session: Session) -> int:
    infos = await session.list_checkpoints(sizes=True)
    if not infos:
        if not await session.store.exists():
            raise NotFound(f"no checkpoint store at {session.store.url}")
        studios = await session.store.list_studios()
        if not args.json and not studios:
            print(f"studio {session.studio} has no checkpoints")
            return 0
        if not args.json:
            print(
                f"studio {session.studio} has no checkpoints in {session.store.url} "
                f"(it holds: {', '.join(studios)})"
            )
            return 0
    if args.json:
        _print_json([i.to_json() for i in infos])
        return 0
    rows = [_row(i) for i in infos]
    header = ("NAME", "STATE", "CREATED", "UPDATED", "SIZE", "FREES", "LAYERS")
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    return 0


def _row(i: CheckpointInfo) -> tuple[str, ...]:
    fmt = "%Y-%m-%d %H:%M:%S"
    return (
        i.name,
        i.state.value,
        i.created.strftime(fmt),
        i.updated.strftime(fmt),
        _size(i.size),
        _size(i.frees or 0),
        str(i.layers),
    )


async def _diff(args: argparse.Namespace, session: Session) -> int:
    report = await session.diff()
    lines = report.lines[: args.limit] if args.limit > 0 else report.lines
    if args.json:
        doc: dict[str, Any] = {
            "changes": [{"path": "/" + x.path, "kind": x.kind, "size": x.size} for x in lines],
            "total_size": sum(x.size for x in report.lines),
            "count": len(report.lines),
            "skipped": _skipped_json(report.skipped),
        }
        _print_json(doc)
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
    if args.json:
        _print_json(info.to_json())
        return 0
    print(f"renamed {args.old} to {info.name}")
    return 0


async def _verify(args: argparse.Namespace, session: Session) -> int:
    with _ProgressLine(sys.stderr) as bar:
        report = await session.verify(
            args.checkpoint_ref, every=args.every, read_data=args.read_data, progress=bar.update
        )
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    elif not report.checkpoints:
        print(f"studio {session.studio} has no checkpoints")
    else:
        for p in report.problems:
            print(f"{p.status.value} {p.kind.value} {p.digest}: {p.detail}")
            print(f"  breaks {', '.join(p.checkpoints)}")
        for v in report.checkpoints:
            print(
                f"{v.label}: {'sound' if v.sound else 'BROKEN, ' + _count(v.problems, 'problem')}"
            )
        how = "read and hashed" if report.read_data else "sizes checked (--read-data: hashes too)"
        print(
            f"{_count(report.checkpoints, 'checkpoint')}, {report.blobs} blobs "
            f"({_size(report.size)}) {how}: {_count(report.problems, 'problem')}"
        )
    return 0 if report.sound else EXIT_ERROR


# -- storage: delete, delete-studio, gc --------------------------------------------------


def _add_storage_commands(add: Callable[[str, str], argparse.ArgumentParser]) -> None:
    dl = add("delete", "Delete a checkpoint (its ref; gc removes the blobs nothing else needs).")
    dl.add_argument(
        "checkpoint", metavar="CHECKPOINT", help="NAME of this studio's, or STUDIO/NAME"
    )
    ds = add("delete-studio", "Delete every checkpoint of a studio (refs; blobs go through gc).")
    ds.add_argument("studio_id", metavar="ID")
    gcp = add("gc", "Delete the blobs no checkpoint or running session needs, and leftovers.")
    gcp.add_argument(
        "--grace",
        default="24h",
        metavar="DURATION",
        help="keep blobs written more recently than this (24h, 30m, 1h30m, 0s; default 24h)",
    )
    gcp.add_argument("--dry-run", action="store_true", help="print what would go; delete nothing")


_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


def parse_duration(text: str) -> timedelta:
    """``1d``, ``24h``, ``30m``, ``0s``, ``1h30m``: a number and a unit, largest first."""
    m = _DURATION.fullmatch(text.strip())
    if not text.strip() or m is None:
        raise ValueError(
            f"invalid duration {text!r}: use a number and a unit (24h, 30m, 1h30m, 0s)"
        )
    d, h, mi, s = (int(g or 0) for g in m.groups())
    return timedelta(days=d, hours=h, minutes=mi, seconds=s)


async def _delete(args: argparse.Namespace, session: Session) -> int:
    info = await session.delete(args.checkpoint)
    studio, _, name = args.checkpoint.rpartition("/")
    where = f"{studio or session.studio}/{info.name if info else name}"
    print(f"deleted checkpoint {where}; gc removes its blobs that no other checkpoint needs")
    return 0


async def _delete_studio(args: argparse.Namespace, session: Session) -> int:
    done = await session.delete_studio(args.studio_id)
    print(f"deleted {len(done.deleted)} checkpoints of studio {done.studio}")
    for why in done.failed:
        print(f"studio-agent: error: not deleted: {why}", file=sys.stderr)
    return EXIT_ERROR if done.failed else 0


async def _gc(args: argparse.Namespace, session: Session) -> int:
    from agent.session.gc import collect

    try:
        grace = parse_duration(args.grace)
    except ValueError as e:
        print(f"studio-agent: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    with tempfile.TemporaryDirectory(prefix="studio-agent-gc-") as scratch:
        report = await collect(
            session.store,
            Path(scratch),
            grace=grace,
            dry_run=args.dry_run,
            progress=_Throttled(sys.stderr).line,
        )
    for problem in report.problems:
        print(f"studio-agent: warning: {problem}", file=sys.stderr)
    if report.refused is not None:
        print(f"studio-agent: error: gc deleted nothing: {report.refused}", file=sys.stderr)
        return report.exit_code
    if report.dry_run:
        for digest, size in report.doomed:
            print(f"would delete {digest} ({_size(size)})")
        for what, size in report.leftovers:
            print(f"would remove {what} ({_size(size)})")
        freed = report.doomed_bytes + sum(size for _, size in report.leftovers)
        print(
            f"dry run: would free {_size(freed)}: {len(report.doomed)} of {report.blobs} blobs "
            f"unreachable and older than {args.grace}, {len(report.leftovers)} leftovers"
        )
        return report.exit_code
    for digest in report.left:
        print(f"left behind {digest}")
    leftover_bytes = sum(size for _, size in report.leftovers)
    print(
        f"gc: deleted {report.deleted} of {report.blobs} blobs, freed {_size(report.freed)}; "
        f"removed {len(report.leftovers)} leftovers ({_size(leftover_bytes)}) "
        f"in {report.seconds:.1f} s"
    )
    if report.left:
        print(
            f"studio-agent: warning: {len(report.left)} blobs ({_size(report.left_bytes)}) "
            "were left behind",
            file=sys.stderr,
        )
    for error in report.errors:
        print(f"studio-agent: warning: {error}", file=sys.stderr)
    if report.stopped is not None:
        print(f"studio-agent: warning: gc stopped early: {report.stopped}", file=sys.stderr)
    return report.exit_code


async def _studios(args: argparse.Namespace, session: Session) -> int:
    store = session.store
    if not await store.exists():
        raise NotFound(f"no checkpoint store at {store.url}")
    studios = await store.list_studios()
    if not studios and not args.json:
        print(f"no studio has checkpoints in {store.url}")
        return 0
    counts = [len(await store.list_refs(s)) for s in studios]
    if args.json:
        doc = [{"studio": s, "checkpoints": n} for s, n in zip(studios, counts, strict=True)]
        print(json.dumps(doc, indent=2))
        return 0
    width = max(len("STUDIO"), *(len(s) for s in studios))
    print(f"{'STUDIO'.ljust(width)}  CHECKPOINTS")
    for s, n in zip(studios, counts, strict=True):
        print(f"{s.ljust(width)}  {n}")
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


async def _export(args: argparse.Namespace, session: Session) -> int:
    with _ProgressLine(sys.stderr) as bar:
        out = await session.export(
            args.checkpoint_ref,
            Path(args.oci),
            base=Path(args.base) if args.base else None,
            tag=args.tag,
            progress=bar.update,
        )
    if args.json:
        _print_json(out.to_json())
        return 0
    c = out.checkpoint
    on = f" on {out.base_layers} base layers" if out.base is not None else ""
    print(
        f"exported {c.studio}/{c.name} to oci:{out.directory}:{out.tag}: {c.layers} layers "
        f"squashed into one of {_size(out.layer.size)}{on}; manifest {out.manifest}"
    )
    return 0


_COMMANDS: dict[str, Callable[[argparse.Namespace, Session], Awaitable[int]]] = {
    "baseline": _baseline,
    "checkpoint": _checkpoint,
    "restore": _restore,
    "checkpoints": _checkpoints,
    "diff": _diff,
    "rename": _rename,
    "verify": _verify,
    "delete": _delete,
    "delete-studio": _delete_studio,
    "gc": _gc,
    "studios": _studios,
    "squash": _squash,
    "export": _export,
}

# Commands that change the session's files: one process at a time owns them.
# (``checkpoints``, ``diff`` and ``studios`` only read.)
_OWNING = frozenset({"baseline", "checkpoint", "restore", "rename", "squash"})


# -- beside a running daemon: through its local API -----------------------------------


async def _checkpoint_via_api(args: argparse.Namespace, api: DaemonApi) -> int:
    body = {"name": args.checkpoint_name} if args.checkpoint_name is not None else {}
    doc = await api.request("POST", "/v1/checkpoints", body)
    info = doc["checkpoint"]
    print(
        f"checkpoint {info['name']} ({info['state']}) written by {api.holder.describe()}: "
        f"{doc['changed']} changes, new layer {_size(doc['layer_size'])}; "
        f"{info['layers']} layers, {_size(info['size'])} in all ({doc['duration']:.1f} s)"
    )
    for s in doc["skipped"]:
        print(f"skipped /{s['path']}: {s['reason']}", file=sys.stderr)
    return 0


async def _rename_via_api(args: argparse.Namespace, api: DaemonApi) -> int:
    doc = await api.request(
        "PATCH", f"/v1/checkpoints/{quote(args.old, safe='')}", {"name": args.new}
    )
    print(f"renamed {args.old} to {doc['name']}")
    return 0


_THROUGH_API: dict[str, Callable[[argparse.Namespace, DaemonApi], Awaitable[int]]] = {
    "checkpoint": _checkpoint_via_api,
    "rename": _rename_via_api,
}


# -- output helpers --------------------------------------------------------------------------


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2))


def _skipped_json(skipped: Sequence[Any]) -> list[dict[str, str]]:
    """Paths as the text output shows them: absolute in the root."""
    return [{"path": "/" + s.path, "reason": s.reason} for s in skipped]


def _count(items: Sized, what: str) -> str:
    return f"{len(items)} {what}{'' if len(items) == 1 else 's'}"


def _report_skipped(skipped: Sequence[Any]) -> None:
    for s in skipped:
        print(f"skipped /{s.path}: {s.reason}", file=sys.stderr)


class _Throttled:
    """Progress lines of a long run, one every few seconds; a short run prints none."""

    def __init__(self, stream: TextIO, every: float = 2.0) -> None:
        self.stream = stream
        self.every = every
        self._last = time.monotonic()

    def line(self, text: str) -> None:
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            print(f"gc: {text}", file=self.stream, flush=True)


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
