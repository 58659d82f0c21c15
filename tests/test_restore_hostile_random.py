"""Random hostile chains: whatever layers of names, symlinks (in and out of the
root, absolute and relative), hardlinks, whiteouts and opaque whiteouts are
stacked on whatever base root, nothing outside the root changes, and the
restore either succeeds or fails with one of the agent's one-line errors."""

from __future__ import annotations

import os
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fsutil import Entry, snapshot, tar_bytes, zstd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.checkpoint.restore import LayerFile, apply_layers
from agent.errors import AgentError

NAMES = ("a", "b", "c")

# Symlink targets, "{out}" and "{root}" filled in per example: outside (absolute,
# relative climbing out, a file), inside (absolute, relative, up and down).
TARGETS = (
    "{out}",
    "{out}/d",
    "{out}/secret",
    "../outside",
    "../../outside/d",
    "..",
    ".",
    "a",
    "b/c",
    "../a",
    "{root}/a",
    "{root}/b/c",
)

path_st = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map("/".join)


@dataclass(frozen=True)
class Op:
    kind: str  # file, dir, symlink, hardlink, whiteout, opaque
    path: str
    arg: str = ""


op_st = st.one_of(
    st.builds(Op, st.just("file"), path_st, st.sampled_from(("", "x", "yy"))),
    st.builds(Op, st.just("dir"), path_st),
    st.builds(Op, st.just("symlink"), path_st, st.sampled_from(TARGETS)),
    st.builds(Op, st.just("hardlink"), path_st, path_st | st.just("../outside/secret")),
    st.builds(Op, st.just("whiteout"), path_st),
    st.builds(Op, st.just("opaque"), path_st),
)
layers_st = st.lists(st.lists(op_st, max_size=8), min_size=1, max_size=3)
base_st = st.lists(op_st.filter(lambda o: o.kind in ("file", "dir", "symlink")), max_size=8)


def build_base(root: Path, ops: list[Op], fill: dict[str, str]) -> None:
    """The image: entries made where their parent is a real directory, others skipped."""
    for op in ops:
        full = root / op.path
        parent = full.parent
        if parent.is_symlink() or not parent.is_dir() or os.path.lexists(full):
            continue
        if op.kind == "file":
            full.write_text(op.arg)
        elif op.kind == "dir":
            full.mkdir()
        else:
            os.symlink(op.arg.format(**fill), full)


def layer_bytes(ops: list[Op], fill: dict[str, str]) -> bytes:
    entries = []
    for op in ops:
        head, _, base = op.path.rpartition("/")
        prefix = f"{head}/" if head else ""
        if op.kind == "file":
            entries.append(Entry(op.path, data=op.arg.encode()))
        elif op.kind == "dir":
            entries.append(Entry(op.path, tarfile.DIRTYPE, mode=0o755))
        elif op.kind == "symlink":
            entries.append(Entry(op.path, tarfile.SYMTYPE, linkname=op.arg.format(**fill)))
        elif op.kind == "hardlink":
            entries.append(Entry(op.path, tarfile.LNKTYPE, linkname=op.arg))
        elif op.kind == "whiteout":
            entries.append(Entry(f"{prefix}.wh.{base}"))
        else:
            entries.append(Entry(f"{op.path}/.wh..wh..opq"))
    return tar_bytes(entries)


def outside_state(tmp: Path) -> tuple[object, ...]:
    """Everything beside the root, with every attribute and mtime, the sentinel's own too."""
    out = tmp / "outside"
    s = os.lstat(out)
    beside = sorted(p.name for p in tmp.iterdir())
    return (beside, s.st_mode, s.st_mtime_ns, s.st_nlink, snapshot(out))


def make_sentinel(out: Path) -> None:
    out.mkdir()
    (out / "secret").write_text("do not touch")
    (out / "d").mkdir()
    (out / "d/x").write_text("x")
    (out / "a").mkdir()
    (out / "a/b").write_text("b")
    os.utime(out / "d", ns=(1, 1_000_000_000))
    os.utime(out, ns=(1, 2_000_000_000))


@settings(
    max_examples=int(os.environ.get("STUDIO_TEST_HOSTILE_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(base=base_st, layers=layers_st)
def test_random_hostile_chain_stays_inside_the_root(base: list[Op], layers: list[list[Op]]) -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        make_sentinel(tmp / "outside")
        root = tmp / "root"
        root.mkdir()
        fill = {"out": str(tmp / "outside"), "root": str(root)}
        build_base(root, base, fill)
        files = []
        store = Path(tempfile.mkdtemp(prefix="layers-"))  # not beside the root
        try:
            for i, ops in enumerate(layers):
                path = store / f"{i}.tar.zst"
                path.write_bytes(zstd(layer_bytes(ops, fill)))
                files.append(LayerFile(path))
            before = outside_state(tmp)
            try:
                apply_layers(root, files)
            except AgentError as e:
                assert "\n" not in str(e)
            assert outside_state(tmp) == before
        finally:
            for f in files:
                assert f.path is not None
                f.path.unlink()
            store.rmdir()
