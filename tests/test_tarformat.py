"""The layer reader against Python's own tarfile, and against our writer.

The reader parses headers by hand for speed, with fast paths for the common
cases; these property tests hold it to the meaning tarfile gives the same
bytes, in each of the formats tarfile writes (USTAR, GNU with base-256 numbers
and long-name records, PAX), and to an exact round trip of our own headers.
"""

from __future__ import annotations

import io
import tarfile

import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.checkpoint import tarformat as tf
from agent.checkpoint.layer_reader import LayerReader

_NAME_PART = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="/\0", min_codepoint=32),
    min_size=1,
    max_size=40,
).filter(lambda s: s not in (".", ".."))
_NAMES = st.lists(_NAME_PART, min_size=1, max_size=6).map("/".join)
_TYPES = st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.FIFOTYPE])


def _members(layer: bytes) -> list[tuple[tf.Member, bytes]]:
    """What the reader makes of an uncompressed tar: each member and its content."""
    out = []
    with LayerReader(io.BytesIO(zstandard.compress(layer))) as reader:
        for m in reader.members():
            out.append((m, reader.read(m.size)))
    return out


@st.composite
def _tar_infos(draw: st.DrawFn, big_numbers: bool) -> list[tuple[tarfile.TarInfo, bytes]]:
    out = []
    for name in draw(st.lists(_NAMES, min_size=1, max_size=5, unique=True)):
        info = tarfile.TarInfo(name)
        info.type = draw(_TYPES)
        info.mode = draw(st.integers(0, 0o7777))
        top = (1 << 32) - 1 if big_numbers else 0o7777777
        info.uid = draw(st.integers(0, top))
        info.gid = draw(st.integers(0, top))
        info.mtime = draw(st.integers(0, (1 << 36) if big_numbers else 0o77777777777))
        data = b""
        if info.type == tarfile.REGTYPE:
            data = draw(st.binary(max_size=1500))
        elif info.type == tarfile.SYMTYPE:
            info.linkname = draw(_NAMES)
        info.size = len(data)
        out.append((info, data))
    return out


@settings(max_examples=150, deadline=None)
@given(
    fmt=st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]),
    data=st.data(),
)
def test_reader_agrees_with_tarfile(fmt: int, data: st.DataObject) -> None:
    infos = data.draw(_tar_infos(big_numbers=fmt != tarfile.USTAR_FORMAT))
    buf = io.BytesIO()
    written = []
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8") as tar:
        for info, content in infos:
            try:
                tar.addfile(info, io.BytesIO(content))
            except ValueError:  # USTAR can't say it (a name too long): not written
                continue
            written.append((info, content))
    got = _members(buf.getvalue())
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue()), encoding="utf-8") as tar:
        expected = tar.getmembers()
    assert len(got) == len(expected) == len(written)
    for (m, content), want, (_, wrote) in zip(got, expected, written, strict=True):
        assert m.name.rstrip("/") == want.name
        assert m.type == want.type
        assert (m.mode, m.uid, m.gid, m.size) == (want.mode, want.uid, want.gid, want.size)
        assert m.mtime_ns == int(want.mtime) * 1_000_000_000
        assert m.linkname == want.linkname
        assert content == wrote


_XATTRS = st.dictionaries(
    st.sampled_from(["user.a", "user.comment", "security.capability", "trusted.x"]),
    st.binary(max_size=40),
    max_size=2,
)


@settings(max_examples=200, deadline=None)
@given(
    entries=st.lists(
        st.tuples(
            _NAMES,
            st.sampled_from([tf.REGTYPE, tf.DIRTYPE, tf.SYMTYPE, tf.LNKTYPE, tf.FIFOTYPE]),
            st.integers(0, 0o7777),
            st.integers(0, (1 << 32) - 1),
            st.integers(0, (1 << 32) - 1),
            st.integers(0, 1 << 62),  # mtime in nanoseconds
            _NAMES,
            _XATTRS,
            st.binary(max_size=1200),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_our_headers_round_trip(
    entries: list[tuple[str, bytes, int, int, int, int, str, dict[str, bytes], bytes]],
) -> None:
    """Every field our writer sets comes back exactly, whichever of its header
    shapes (plain ustar, the cached mtime-only PAX header, a full PAX header)
    it took."""
    layer = b""
    for name, kind, mode, uid, gid, mtime_ns, link, xattrs, content in entries:
        data = content if kind == tf.REGTYPE else b""
        linkname = link if kind in (tf.SYMTYPE, tf.LNKTYPE) else ""
        layer += tf.encode_header(name, kind, mode, uid, gid, len(data), mtime_ns, linkname, xattrs)
        layer += data + tf.padding(len(data))
    got = _members(layer + tf.end_of_archive())
    assert len(got) == len(entries)
    for (m, content), entry in zip(got, entries, strict=True):
        name, kind, mode, uid, gid, mtime_ns, link, xattrs, data = entry
        assert (m.name, m.type, m.mode, m.uid, m.gid) == (name, kind, mode, uid, gid)
        assert m.mtime_ns == mtime_ns
        assert m.linkname == (link if kind in (tf.SYMTYPE, tf.LNKTYPE) else "")
        assert m.xattrs == xattrs
        assert content == (data if kind == tf.REGTYPE else b"")
