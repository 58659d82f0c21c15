"""The tar wire format of layers: PAX (POSIX.1-2001) headers, encoded and parsed.

Written by hand rather than with ``tarfile`` because per-member overhead is what
makes a Python tar pipeline slow: a header here is one ``struct.pack`` and, only
when needed (long names, nanosecond mtimes, xattrs, large ids), one PAX record
block.  The parser is strict: a bad checksum, a malformed record or an unknown
entry type raises ``CorruptLayer``.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from zlib import adler32

from agent.errors import CorruptLayer

BLOCK = 512
REGTYPE = b"0"
AREGTYPE = b"\0"
LNKTYPE = b"1"
SYMTYPE = b"2"
CHRTYPE = b"3"
BLKTYPE = b"4"
DIRTYPE = b"5"
FIFOTYPE = b"6"
CONTTYPE = b"7"
XHDTYPE = b"x"
XGLTYPE = b"g"
GNU_LONGNAME = b"L"
GNU_LONGLINK = b"K"

WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"

MAX_PAX_SIZE = 1 << 20

_HEADER = struct.Struct("100s8s8s8s12s12s8s1s100s6s2s32s32s8s8s155s12s")
_ZERO_BLOCK = bytes(BLOCK)
_MAX_OCTAL_7 = 0o7777777
_MAX_OCTAL_11 = 0o77777777777
_PAX_HEADERS: dict[int, bytes] = {}


@dataclass(slots=True)
class Member:
    """One tar entry, as the restore needs it."""

    name: str
    type: bytes
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    linkname: str = ""
    xattrs: dict[str, bytes] = field(default_factory=dict)


def _pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n).encode()) + len(body) != n:
        n += 1
    return str(n).encode() + body


def _fits(value: bytes, width: int) -> bool:
    return len(value) <= width and value.isascii()


def _ustar(
    name: bytes,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime: int,
    typeflag: bytes,
    linkname: bytes,
) -> bytes:
    header = _HEADER.pack(
        name,
        b"%07o\0" % (mode & 0o7777),
        b"%07o\0" % uid,
        b"%07o\0" % gid,
        b"%011o\0" % size,
        b"%011o\0" % mtime,
        b"        ",
        typeflag,
        linkname,
        b"ustar\0",
        b"00",
        b"",
        b"",
        b"",
        b"",
        b"",
        b"",
    )
    view = memoryview(header)
    chk = (adler32(view[:256]) & 0xFFFF) + (adler32(view[256:]) & 0xFFFF) - 2
    return b"%s%06o\0 %s" % (view[:148], chk, view[156:])


def encode_header(
    name: str,
    typeflag: bytes,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime_ns: int,
    linkname: str = "",
    xattrs: dict[str, bytes] | None = None,
) -> bytes:
    """The header block(s) for one entry: a PAX header first when ustar can't say it all."""
    bname = name.encode("utf-8", "surrogateescape")
    blink = linkname.encode("utf-8", "surrogateescape")
    mtime_ns = max(mtime_ns, 0)
    secs, frac = divmod(mtime_ns, 1_000_000_000)
    if (
        frac
        and not xattrs
        and len(bname) <= 100
        and len(blink) <= 100
        and size <= _MAX_OCTAL_11
        and uid <= _MAX_OCTAL_7
        and gid <= _MAX_OCTAL_7
        and secs <= _MAX_OCTAL_11
        and bname.isascii()
        and blink.isascii()
    ):
        # The common case, a nanosecond mtime and nothing else: the PAX header
        # block depends only on the record's length, so it comes from a cache.
        value = b"%d.%09d" % (secs, frac)
        record = b"%d mtime=%s\n" % (len(value) + 10, value)  # 10: length digits, " mtime=\n"
        return (
            _mtime_pax_header(len(record))
            + record
            + _ZERO_BLOCK[len(record) :]
            + _ustar(bname, mode, uid, gid, size, secs, typeflag, blink)
        )
    records: list[bytes] = []
    if not _fits(bname, 100):
        records.append(_pax_record(b"path", bname))
        bname = bname[:99].decode("ascii", "replace").encode("ascii", "replace")
    if blink and not _fits(blink, 100):
        records.append(_pax_record(b"linkpath", blink))
        blink = b""
    if frac:
        records.append(_pax_record(b"mtime", b"%d.%09d" % (secs, frac)))
    if secs > _MAX_OCTAL_11:
        secs = _MAX_OCTAL_11
    if size > _MAX_OCTAL_11:
        records.append(_pax_record(b"size", b"%d" % size))
        size = 0
    if uid > _MAX_OCTAL_7:
        records.append(_pax_record(b"uid", b"%d" % uid))
        uid = 0
    if gid > _MAX_OCTAL_7:
        records.append(_pax_record(b"gid", b"%d" % gid))
        gid = 0
    if xattrs:
        for key, value in sorted(xattrs.items()):
            records.append(_pax_record(b"SCHILY.xattr." + os.fsencode(key), value))
    header = _ustar(bname, mode, uid, gid, size, secs, typeflag, blink)
    if not records:
        return header
    pax = b"".join(records)
    pax_name = (b"PaxHeaders/" + os.fsencode(os.path.basename(name)))[:99]
    if not pax_name.isascii():
        pax_name = b"PaxHeaders/entry"
    return (
        _ustar(pax_name, 0o644, 0, 0, len(pax), secs, XHDTYPE, b"")
        + pax
        + padding(len(pax))
        + header
    )


def _mtime_pax_header(length: int) -> bytes:
    """The PAX header block before a record of ``length`` bytes that says only the mtime."""
    header = _PAX_HEADERS.get(length)
    if header is None:
        header = _ustar(b"PaxHeader", 0o644, 0, 0, length, 0, XHDTYPE, b"")
        _PAX_HEADERS[length] = header
    return header


# What our writer puts before most entries (a nanosecond mtime and nothing else
# to say), by the block's bytes: the reader knows such a block is well formed by
# comparing it, and reads its one record without the general parser.
_MTIME_RECORD_LENGTHS = range(21, 32)  # "NN mtime=<1 to 11 digits>.<9 digits>\n"
MTIME_PAX_BLOCKS = {_mtime_pax_header(n): n for n in _MTIME_RECORD_LENGTHS}
_MTIME_PREFIXES = {n: b"%d mtime=" % n for n in _MTIME_RECORD_LENGTHS}


def parse_mtime_record(record: bytes) -> int:
    """The nanosecond mtime from a PAX record that follows one of ``MTIME_PAX_BLOCKS``:
    ``"NN mtime=<seconds>.<9 digits>\\n"``, digits only."""
    secs, _, frac = record[9:-1].partition(b".")
    if (
        record[:9] == _MTIME_PREFIXES[len(record)]
        and record[-1] == 10  # "\n"
        and len(frac) == 9
        and secs.isdigit()
        and frac.isdigit()
    ):
        return int(secs) * 1_000_000_000 + int(frac)
    raise CorruptLayer(f"malformed PAX mtime record {record!r}")


def padding(size: int) -> bytes:
    rem = size % BLOCK
    return _ZERO_BLOCK[: BLOCK - rem] if rem else b""


def end_of_archive() -> bytes:
    return _ZERO_BLOCK * 2


# -- parsing ---------------------------------------------------------------------


def _num(field_: bytes, what: str) -> int:
    try:  # the common case: NUL- or space-terminated octal
        value = int(field_.rstrip(b"\0 "), 8)
    except ValueError:
        pass
    else:
        if value < 0:
            raise CorruptLayer(f"negative {what} in tar header")
        return value
    if field_ and field_[0] & 0x80:  # base-256 (GNU) for large values
        if field_[0] & 0x40:
            raise CorruptLayer(f"negative {what} in tar header")
        return int.from_bytes(field_[1:], "big") | ((field_[0] & 0x3F) << (8 * (len(field_) - 1)))
    text = field_.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise CorruptLayer(f"malformed {what} in tar header: {text!r}") from None


def _checksum(block: bytes) -> int:
    """The header's byte sum with the checksum field counted as spaces.

    Summing bytes in Python is slow; Adler-32's low half is the byte sum plus
    one, modulo 65521, which is exact for up to 256 bytes (at most 65280).
    """
    return (
        (adler32(block[:256]) & 0xFFFF)
        + (adler32(block[256:]) & 0xFFFF)
        - (adler32(block[148:156]) & 0xFFFF)
        + 255  # the three adler32 "plus one"s, and 8 spaces (256) for the field
    )


def extended_size(block: bytes) -> int:
    """The data size of a PAX or GNU extended header block, checksum verified."""
    f = _HEADER.unpack(block)
    try:
        size = int(f[4].rstrip(b"\0 ") or b"0", 8)
        stored = int(f[6].rstrip(b"\0 ") or b"0", 8)
    except ValueError:
        size, stored = _num(f[4], "size"), _num(f[6], "checksum")
    if stored != _checksum(block):
        raise CorruptLayer("tar header checksum mismatch (corrupt layer)")
    if size < 0:
        raise CorruptLayer("negative size in tar header")
    return size


def parse_header(block: bytes) -> Member | None:
    """A member from one 512-byte header, or None for an all-zero (end) block."""
    if not block[0] and block == _ZERO_BLOCK:
        return None
    f = _HEADER.unpack(block)
    try:  # the common case: every number NUL- or space-terminated octal
        mode = int(f[1].rstrip(b"\0 ") or b"0", 8)
        uid = int(f[2].rstrip(b"\0 ") or b"0", 8)
        gid = int(f[3].rstrip(b"\0 ") or b"0", 8)
        size = int(f[4].rstrip(b"\0 ") or b"0", 8)
        mtime = int(f[5].rstrip(b"\0 ") or b"0", 8)
        stored = int(f[6].rstrip(b"\0 ") or b"0", 8)
        wide = False
    except ValueError:  # base-256 (GNU) numbers, possibly out of any range
        mode, uid, gid = _num(f[1], "mode"), _num(f[2], "uid"), _num(f[3], "gid")
        size, mtime, stored = _num(f[4], "size"), _num(f[5], "mtime"), _num(f[6], "checksum")
        wide = True
    if stored != _checksum(block):
        raise CorruptLayer("tar header checksum mismatch (corrupt layer)")
    if (mode | uid | gid | size | mtime) < 0:
        raise CorruptLayer("negative number in tar header")
    name = f[0].partition(b"\0")[0]
    if f[15][0] and f[9][:5] == b"ustar":  # a prefix to join
        name = f[15].partition(b"\0")[0] + b"/" + name
    link = f[8]
    m = Member(
        name.decode("utf-8", "surrogateescape"),
        f[7],
        mode,
        uid,
        gid,
        size,
        mtime * 1_000_000_000,
        link.partition(b"\0")[0].decode("utf-8", "surrogateescape") if link[0] else "",
    )
    if wide:
        check_ranges(m)
    return m


def parse_pax(data: bytes) -> dict[bytes, bytes]:
    """PAX records ``"<len> <key>=<value>\\n"``; values are raw bytes."""
    out: dict[bytes, bytes] = {}
    pos = 0
    n = len(data)
    while pos < n:
        if data[pos] == 0:  # trailing NUL padding
            break
        sp = data.find(b" ", pos, pos + 20)
        if sp < 0:
            raise CorruptLayer("malformed PAX record length")
        try:
            length = int(data[pos:sp])
        except ValueError:
            raise CorruptLayer("malformed PAX record length") from None
        end = pos + length
        if length <= 0 or end > n or data[end - 1 : end] != b"\n":
            raise CorruptLayer("malformed PAX record")
        key, eq, value = data[sp + 1 : end - 1].partition(b"=")
        if not eq:
            raise CorruptLayer("malformed PAX record (no '=')")
        out[key] = value
        pos = end
    return out


def apply_pax(member: Member, pax: dict[bytes, bytes]) -> None:
    if len(pax) == 1 and b"mtime" in pax:  # what our own layers carry
        try:
            member.mtime_ns = _parse_pax_time(pax[b"mtime"])
        except ValueError:
            raise CorruptLayer(f"malformed PAX mtime in entry {member.name!r}") from None
        check_ranges(member)
        return
    try:
        for key, value in pax.items():
            if key == b"path":
                member.name = os.fsdecode(value)
            elif key == b"linkpath":
                if b"\0" in value:
                    raise CorruptLayer(f"PAX linkpath of entry {member.name!r} holds a NUL")
                member.linkname = os.fsdecode(value)
            elif key == b"size":
                member.size = int(value)
            elif key == b"uid":
                member.uid = int(value)
            elif key == b"gid":
                member.gid = int(value)
            elif key == b"mtime":
                member.mtime_ns = _parse_pax_time(value)
            elif key.startswith(b"SCHILY.xattr."):
                name = key[13:]
                if not name or b"\0" in name or len(name) > MAX_XATTR_NAME:
                    raise CorruptLayer(f"invalid xattr name {name!r} in entry {member.name!r}")
                if len(value) > MAX_XATTR_VALUE:
                    raise CorruptLayer(
                        f"xattr {os.fsdecode(name)!r} of entry {member.name!r} has "
                        f"{len(value)} bytes, more than any filesystem takes ({MAX_XATTR_VALUE})"
                    )
                member.xattrs[os.fsdecode(name)] = value
    except ValueError:
        raise CorruptLayer(f"malformed PAX value in entry {member.name!r}") from None
    check_ranges(member)


# What the system calls the restore makes take: a number outside would be an
# OverflowError there (uid_t, off_t, time_t), never a value a real entry holds.
MAX_ID = (1 << 32) - 1  # what uid_t holds
MAX_SIZE = (1 << 63) - 1
MAX_MTIME_NS = ((1 << 63) - 1) * 1_000_000_000
MAX_XATTR_NAME = 255
MAX_XATTR_VALUE = 65536


def check_ranges(m: Member) -> None:
    """Refuse numbers no file can have (``CorruptLayer``, naming the entry)."""
    if not 0 <= m.size <= MAX_SIZE:
        raise CorruptLayer(f"entry {m.name!r} has an impossible size ({m.size})")
    if not (0 <= m.uid <= MAX_ID and 0 <= m.gid <= MAX_ID):
        raise CorruptLayer(f"entry {m.name!r} has an impossible owner ({m.uid}:{m.gid})")
    if not -MAX_MTIME_NS <= m.mtime_ns <= MAX_MTIME_NS:
        raise CorruptLayer(f"entry {m.name!r} has an impossible mtime ({m.mtime_ns} ns)")


def _parse_pax_time(value: bytes) -> int:
    secs, _, frac = value.partition(b".")
    if len(secs) > 20:  # more than any time_t: refused before int() reads it
        raise ValueError("mtime out of range")
    neg = secs.startswith(b"-")
    ns = int(secs) * 1_000_000_000
    if frac:
        digits = (frac + b"000000000")[:9]
        ns += -int(digits) if neg else int(digits)
    return ns
