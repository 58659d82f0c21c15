"""Damaged and hostile layers, and which of the tar benchmark's readers refuse them.

A small good layer (a directory, two files, a symlink) with one thing wrong, or
one file after a PAX header that says something no real entry does: what
``tests/test_restore_hostile.py`` and ``tests/test_corrupt_layer.py`` hold our
reader to, asked of every reader.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import zstandard

from agent.checkpoint import tarformat as tf

T = 1_700_000_000_000_000_001  # an mtime with a nanosecond part


def compress(stream: bytes) -> bytes:
    params = zstandard.ZstdCompressionParameters.from_level(3, write_checksum=1)
    return zstandard.ZstdCompressor(compression_params=params).compress(stream)


def _with_checksum(header: bytearray) -> bytes:
    header[148:156] = b"        "
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def _file(name: str, data: bytes, mtime_ns: int = T) -> bytes:
    header = tf.encode_header(name, tf.REGTYPE, 0o644, 0, 0, len(data), mtime_ns)
    return header + data + tf.padding(len(data))


def _pax_entry(body: bytes, symlink: bool = False) -> bytes:
    """A regular file (or a symlink) after a PAX header of exactly ``body``."""
    mtime = 1_700_000_000 * 10**9
    entry = (
        tf.encode_header("f", tf.SYMTYPE, 0o777, 0, 0, 0, mtime, "x")
        if symlink
        else _file("f", b"x", mtime)
    )
    return tf.encode_header("PaxHeaders/f", tf.XHDTYPE, 0o644, 0, 0, len(body), 0) + (
        body + tf.padding(len(body)) + entry
    )


def _record(key: bytes, value: bytes) -> bytes:
    rec = b" " + key + b"=" + value + b"\n"
    n = len(rec) + 1
    while len(str(n)) + len(rec) != n:
        n += 1
    return str(n).encode() + rec


def hostile_layers() -> list[tuple[str, bytes]]:
    """(what is wrong, the layer)."""
    end = tf.end_of_archive()
    good = (
        tf.encode_header("d/", tf.DIRTYPE, 0o755, 0, 0, 0, T)
        + _file("d/a", b"a" * 1500)
        + _file("d/b", b"b" * 700)
        + tf.encode_header("d/l", tf.SYMTYPE, 0o777, 0, 0, 0, T, "a")
        + end
    )
    at = good.find(b"d/b\0")  # the third entry's own header

    def patched(offset: int, value: bytes, fix: bool) -> bytes:
        block = bytearray(good[at : at + tf.BLOCK])
        block[offset : offset + len(value)] = value
        new = _with_checksum(block) if fix else bytes(block)
        return good[:at] + new + good[at + tf.BLOCK :]

    def pax(key: bytes, value: bytes) -> bytes:
        return _pax_entry(_record(key, value)) + end

    huge_uid = bytearray(tf.encode_header("d/u", tf.REGTYPE, 0o644, 0, 0, 0, 0))
    huge_uid[108:116] = b"\x80" + b"\xff" * 7  # base-256: 2**56 - 1
    streams = [
        ("a header's checksum wrong (the third of four entries)", patched(100, b"1", fix=False)),
        ("an unknown entry type (the third of four)", patched(156, b"Z", fix=True)),
        ("a malformed PAX record (its length)", _pax_entry(b"99 mtime=1.5\n") + end),
        ("a PAX record without '='", _pax_entry(b"11 mtime15\n") + end),
        ("a PAX mtime of 30 digits", pax(b"mtime", b"9" * 30)),
        ("a PAX size of 30 digits", pax(b"size", b"9" * 30)),
        (
            "a symlink's PAX linkpath holding a NUL",
            _pax_entry(_record(b"linkpath", b"a\0b"), True) + end,
        ),
        ("an xattr name holding a NUL", pax(b"SCHILY.xattr.user.a\0b", b"v")),
        ("an xattr value of 70,000 bytes", pax(b"SCHILY.xattr.user.b", b"v" * 70_000)),
        ("a base-256 uid of 2**56 - 1", _with_checksum(huge_uid) + end),
        ("cut in the third entry's header", good[: at + 100]),
        ("no end-of-archive blocks", good[: -len(end)]),
    ]
    out = [(what, compress(stream)) for what, stream in streams]
    flipped = bytearray(compress(good))
    flipped[len(flipped) // 2] ^= 1
    out.append(("one byte of the zstd frame flipped", bytes(flipped)))
    return out


def probe(readers: dict[str, Callable[[bytes], list[Any]] | None]) -> None:
    """A table: for each layer, whether each reader refuses it (any error) or how
    many entries it hands on; n/a for a reader that cannot run here."""
    print("\n| damaged or hostile layer | " + " | ".join(readers) + " |")
    print("| --- |" + " --- |" * len(readers))
    for what, layer in hostile_layers():
        cells = []
        for read in readers.values():
            if read is None:
                cells.append("n/a")
                continue
            try:
                got = read(layer)
            except Exception:  # any error is a refusal
                cells.append("refused")
            else:
                cells.append(f"read, {len(got)} {'entry' if len(got) == 1 else 'entries'}")
        print(f"| {what} | " + " | ".join(cells) + " |")
