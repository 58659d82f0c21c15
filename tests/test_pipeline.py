"""The checkpoint's one pass (walk, diff and layer together): the same layer as
writing a finished diff, nothing written when nothing changed, deletions and
late hardlink names at the end, progress that says which phase it is in."""

from __future__ import annotations

import io
import marshal
import os
import threading
from pathlib import Path

import pytest
import zstandard
from fsutil import copy_tree, diff_snapshots, snapshot

from agent.checkpoint.diff import Changes, diff, join
from agent.checkpoint.layer_reader import LayerReader
from agent.checkpoint.layer_writer import write_layer
from agent.checkpoint.pipeline import scan_and_write
from agent.checkpoint.restore import apply_layers
from agent.checkpoint.scan import Excluder, Listing, Stat, scan
from agent.checkpoint.state import (
    StateReader,
    StateWriter,
    blocks_of,
    entries_of,
    load_state,
    save_state,
)
from agent.errors import AgentError


def _entries(root: Path) -> dict[str, Stat]:
    return scan(root, Excluder(root, [], [])).entries


def _members(layer: bytes) -> list[tuple[str, bytes, str]]:
    with LayerReader(io.BytesIO(layer)) as reader:
        return [(m.name, m.type, m.linkname) for m in reader.members()]


def _compress_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "layer-compress"]


def _tree(root: Path) -> None:
    for d in ("etc", "opt/tool", "home/u"):
        (root / d).mkdir(parents=True)
    (root / "etc/old.conf").write_text("old\n")
    (root / "etc/keep.conf").write_text("keep\n")
    (root / "opt/tool/gone").mkdir()
    (root / "opt/tool/gone/f").write_bytes(os.urandom(5000))
    (root / "home/u/notes").write_text("notes\n")


def _change(root: Path) -> None:
    (root / "etc/old.conf").unlink()
    (root / "opt/tool/gone/f").unlink()
    (root / "opt/tool/gone").rmdir()
    (root / "opt/tool/bin").mkdir()
    (root / "opt/tool/bin/run").write_bytes(os.urandom(3 << 20))  # read in chunks
    (root / "home/u/notes").write_text("notes, more\n")
    os.symlink("../opt/tool/bin/run", root / "home/run")


def test_one_pass_writes_what_a_finished_diff_writes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _tree(root)
    base = tmp_path / "base"
    copy_tree(root, base)
    parent = _entries(root)
    _change(root)

    out = io.BytesIO()
    state = tmp_path / "next.state"
    done = scan_and_write(root, Excluder(root, [], []), parent, out, state=state)
    assert done.layer is not None and done.layer.size == len(out.getvalue())
    batch = io.BytesIO()
    current = _entries(root)
    write_layer(root, diff(parent, current), current, batch)

    assert done.state == state and load_state(state) == current
    assert done.changes.deletions == ["etc/old.conf", "opt/tool/gone"]
    assert _members(out.getvalue()) == _members(batch.getvalue())
    assert _members(out.getvalue())[-2:] == [
        ("etc/.wh.old.conf", b"0", ""),
        ("opt/tool/.wh.gone", b"0", ""),
    ]
    layer = tmp_path / "layer"
    layer.write_bytes(out.getvalue())
    apply_layers(base, [layer])
    assert diff_snapshots(snapshot(root), snapshot(base)) == []
    assert _compress_threads() == []


def test_nothing_changed_writes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _tree(root)
    out = io.BytesIO()
    done = scan_and_write(root, Excluder(root, [], []), _entries(root), out)
    assert done.layer is None and not done.changes
    assert out.getvalue() == b""
    assert _compress_threads() == []


def test_only_deletions_make_a_layer_of_whiteouts(tmp_path: Path) -> None:
    """Found only once the walk is over, and nothing else to write: the layer starts
    then.  (Deleting a file changes its directory too; a parent that knows a path
    no longer there is the way to have deletions alone.)"""
    root = tmp_path / "root"
    _tree(root)
    parent = _entries(root)
    parent["etc/old.conf.bak"] = parent["etc/old.conf"]
    out = io.BytesIO()
    done = scan_and_write(root, Excluder(root, [], []), parent, out)
    assert done.layer is not None
    assert _members(out.getvalue()) == [("etc/.wh.old.conf.bak", b"0", "")]


def test_the_pass_counts_the_parent_bytes_its_changes_replace(tmp_path: Path) -> None:
    """Rewritten and deleted files count (with all a deleted directory held), new
    ones and directories do not: what squashing weighs a layer by."""
    root = tmp_path / "root"
    _tree(root)
    parent = _entries(root)
    _change(root)
    done = scan_and_write(root, Excluder(root, [], []), parent, io.BytesIO())
    assert done.changes.replaced == len("old\n") + 5000 + len("notes\n")
    # the same as the whole dicts' comparison finds
    assert diff(parent, _entries(root)).replaced == done.changes.replaced


def test_a_name_walked_before_its_inode_was_written_links_to_it(tmp_path: Path) -> None:
    """``a`` is unchanged as the parent recorded it, ``b`` (same inode) is new: the
    walk passes ``a`` first, so its link entry can only come at the end."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "b").write_text("shared\n")
    os.link(root / "b", root / "a")
    current = _entries(root)
    parent = {"a": current["a"]}
    out = io.BytesIO()
    done = scan_and_write(root, Excluder(root, [], []), parent, out)
    assert done.changes.upserts == ["b"]
    assert _members(out.getvalue()) == [("b", b"0", ""), ("a", b"1", "b")]
    assert done.layer is not None and set(done.layer.linked) == {"a", "b"}


def test_progress_reports_the_walk_then_the_write(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    for i in range(600):
        (root / f"d/f{i:03}").write_bytes(b"x" * 100)
    seen: list[tuple[str, int, int, int, int]] = []
    scan_and_write(
        root, Excluder(root, [], []), {}, io.BytesIO(), progress=lambda *p: seen.append(p)
    )
    phases = [p[0] for p in seen]
    assert phases[0] == "scan" and phases[-1] == "write"
    assert phases == sorted(phases)  # "scan" only before "write"
    assert all(p[2] == 0 and p[4] == 0 for p in seen if p[0] == "scan")
    assert seen[-1] == ("write", 601, 601, 60_000, 60_000)


def test_walk_and_state_agree_on_order_around_the_separator(tmp_path: Path) -> None:
    """Names sorting before "/" ("a-b", "a.b") or after it ("a0"): the walk and the
    state order directories alike, so nothing unchanged is taken for a change."""
    root = tmp_path / "root"
    for d in ("a/x", "a-b/y", "a.b/z", "a0", "a/x/deep"):
        (root / d).mkdir(parents=True)
        (root / d / "f").write_text(d)
    state = tmp_path / "first.state"
    first = scan_and_write(root, Excluder(root, [], []), {}, io.BytesIO(), state=state)
    assert first.scan.count == len(_entries(root))
    with StateReader(state) as r:
        dirs = [d for (d, _, _), _ in r.blocks()]
    assert dirs == ["", "a", "a/x", "a/x/deep", "a-b", "a-b/y", "a.b", "a.b/z", "a0"]
    with StateReader(state) as r:
        again = scan_and_write(root, Excluder(root, [], []), r.blocks(), io.BytesIO())
    assert not again.changes and again.layer is None


def test_a_directory_the_walk_cannot_list_keeps_what_the_parent_recorded() -> None:
    """Unknown, not deleted: no whiteout, and the parent's records below it stand
    in the next state (a listing fails for root only on odd filesystems, so the
    join is given one)."""
    d_rec: Stat = (0o40755, 0, 0, 0, 1, 1, 10, 2, "")
    f_rec: Stat = (0o100644, 0, 0, 5, 1, 1, 11, 1, "")
    parent = {"d": d_rec, "d/f": f_rec, "d/sub": d_rec, "d/sub/g": f_rec, "e": f_rec}
    listings = [
        Listing("", ["d", "e"], [d_rec, f_rec], True),
        Listing("d", [], [], False),
    ]
    changes = Changes()
    joined = list(join(((b, None) for b in blocks_of(parent)), listings, changes))
    assert not changes
    assert entries_of((j.dir, j.names, j.records) for j in joined) == parent


def test_a_state_of_the_first_format_is_read(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _tree(root)
    entries = _entries(root)
    old = tmp_path / "old.state"
    old.write_bytes(
        b"STUDIO-STATE-1\n" + zstandard.ZstdCompressor().compress(marshal.dumps(entries))
    )
    assert load_state(old) == entries
    with StateReader(old) as r:
        done = scan_and_write(root, Excluder(root, [], []), r.blocks(), io.BytesIO())
    assert not done.changes


def test_a_truncated_state_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _tree(root)
    state = tmp_path / "s.state"
    save_state(state, _entries(root))
    data = state.read_bytes()
    for cut in (len(data) - 1, len(data) // 2):
        state.write_bytes(data[:cut])
        with pytest.raises(AgentError, match="corrupt"):
            load_state(state)


class _FullDisk(io.RawIOBase):
    """A layer file whose disk is full: the error surfaces when the layer is finished
    (a small tree's zstd frame is written out only then)."""

    def writable(self) -> bool:
        return True

    def write(self, data: object) -> int:
        raise OSError(28, "No space left on device")


def test_a_layer_failing_at_its_end_leaves_no_state_closed_beside_it(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _tree(root)
    state = tmp_path / "next.state"
    with pytest.raises(OSError, match="No space"):
        scan_and_write(root, Excluder(root, [], []), {}, _FullDisk(), state=state)  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]  # neither state nor .tmp


def test_a_state_closed_in_the_background_is_whole_or_gone(tmp_path: Path) -> None:
    entries = {f"d/f{i}": (0o100644, 0, 0, i, 1, 1, i, 1, "") for i in range(5000)}
    entries["d"] = (0o40755, 0, 0, 0, 1, 1, 0, 2, "")
    kept, dropped = tmp_path / "kept.state", tmp_path / "dropped.state"
    for path in (kept, dropped):
        w = StateWriter(path)
        for block in blocks_of(entries):
            w.write(block)
        w.start_close()  # the caller goes on; the thread ends the file
        if path == kept:
            assert w.close() == kept
        else:
            w.abandon()  # after the thread put it in place or before: nothing is left
    assert load_state(kept) == entries
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.state"]
