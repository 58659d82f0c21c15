"""libarchive's PAX writer and tar reader, through libarchive-c, as the tar benchmark drives them.

An optional bench requirement (``pip install libarchive-c``, over the system's
libarchive built with zstd), never a dependency of the agent: ``load`` says None
without it.  One ``archive_entry`` is reused for every entry (libarchive-c's
``ArchiveEntry`` objects and ``get_blocks`` cost more per entry); the calls
libarchive-c does not bind (xattrs, symlink and hardlink targets) and a
``archive_read_next_header2`` that returns every code (libarchive-c's binding
only logs a warning, such as a malformed PAX record, and goes on) are taken
from the library it loaded.  The format is ``pax``: ``pax_restricted`` drops the
nanoseconds of an mtime when nothing else needs a PAX header.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any, Protocol

REGTYPE, LNKTYPE, SYMTYPE, DIRTYPE = b"0", b"1", b"2", b"5"
AE_IFREG, AE_IFDIR, AE_IFLNK = 0o100000, 0o040000, 0o120000
ARCHIVE_OK, ARCHIVE_EOF, ARCHIVE_WARN = 0, 1, -20
_AE_TYPE = {REGTYPE: AE_IFREG, LNKTYPE: AE_IFREG, DIRTYPE: AE_IFDIR, SYMTYPE: AE_IFLNK}
READ_MAX = 1 << 20  # the most one read hands back

# What every reader of the benchmark makes of a layer, entry by entry: the name
# (no trailing slash), type, content bytes, mtime (ns), link target, owner, xattrs.
Row = tuple[str, bytes, int, int, str, int, tuple[tuple[str, bytes], ...]]
Listing = list[Row]


class TarEntry(Protocol):
    name: str
    type: bytes
    mode: int
    mtime_ns: int
    data: bytes
    link: str
    uid: int  # and the gid
    xattrs: dict[str, bytes]


class Libarchive:
    def __init__(self, module: ModuleType, ffi: ModuleType) -> None:
        from ctypes import POINTER, c_char_p, c_int, c_size_t, c_ssize_t, c_void_p

        self.module, self.ffi = module, ffi
        lib = ffi.libarchive

        def bind(name: str, argtypes: list[Any], restype: Any) -> Any:
            f = lib["archive_" + name]  # a new function object: libarchive-c's stay as they are
            f.argtypes, f.restype = argtypes, restype
            return f

        p, s = c_void_p, c_char_p
        self.xattr_add = bind("entry_xattr_add_entry", [p, s, p, c_size_t], None)
        self.xattr_reset = bind("entry_xattr_reset", [p], c_int)
        self.xattr_next = bind(
            "entry_xattr_next", [p, POINTER(c_char_p), POINTER(c_void_p), POINTER(c_size_t)], c_int
        )
        self.set_symlink = bind("entry_update_symlink_utf8", [p, s], c_int)
        self.set_hardlink = bind("entry_update_hardlink_utf8", [p, s], c_int)
        self.next_header = bind("read_next_header2", [p, p], c_int)  # every code returned
        self.read_data = bind("read_data", [p, p, c_size_t], c_ssize_t)
        details = bind("version_details", [], c_char_p)
        self.version: str = details().decode()

    def _error(self, archive: int) -> str:
        msg = self.ffi.error_string(archive)
        return msg.decode("utf-8", "replace") if msg else "no message"

    def write(
        self,
        entries: Iterable[TarEntry],
        sink: Callable[[Any], int],
        *,
        threads: int | None,
        block_size: int,
    ) -> None:
        """A PAX stream of ``entries`` to ``sink`` in ``block_size`` pieces, as a zstd
        frame at level 3 on ``threads`` workers, uncompressed when ``threads`` is None."""
        ffi = self.ffi
        compressed = threads is not None
        opts = f"zstd:compression-level=3,zstd:threads={threads}" if compressed else ""
        writer = self.module.custom_writer(
            sink, "pax", "zstd" if compressed else None, options=opts, block_size=block_size
        )
        clear, pathname = ffi.entry_clear, ffi.entry_update_pathname_utf8
        filetype, perm, uid, gid = (
            ffi.entry_set_filetype, ffi.entry_set_perm, ffi.entry_set_uid, ffi.entry_set_gid
        )  # fmt: skip
        set_mtime, set_size = ffi.entry_set_mtime, ffi.entry_set_size
        header, data, finish = ffi.write_header, ffi.write_data, ffi.write_finish_entry
        xattr_add, symlink, hardlink = self.xattr_add, self.set_symlink, self.set_hardlink
        with writer as archive:
            a = archive._pointer
            entry = ffi.entry_new()
            try:
                for e in entries:
                    clear(entry)
                    pathname(entry, e.name.encode("utf-8", "surrogateescape"))
                    filetype(entry, _AE_TYPE[e.type])
                    perm(entry, e.mode)
                    uid(entry, e.uid)
                    gid(entry, e.uid)
                    set_mtime(entry, *divmod(e.mtime_ns, 1_000_000_000))
                    if e.link:
                        link = e.link.encode("utf-8", "surrogateescape")
                        (symlink if e.type == SYMTYPE else hardlink)(entry, link)
                    for k, v in sorted(e.xattrs.items(), reverse=True):  # it keeps the last first
                        xattr_add(entry, k.encode(), v, len(v))
                    size = len(e.data)
                    set_size(entry, size)
                    header(a, entry)
                    if size:
                        data(a, e.data, size)
                    finish(a)
            finally:
                ffi.entry_free(entry)

    def read(self, layer: bytes, compressed: bool = True, strict: bool = True) -> Listing:
        """Every entry, its content read.  ``strict``: any code but OK from
        ``read_next_header2`` fails, a warning too; otherwise warnings pass, as
        libarchive-c's own binding lets them."""
        ffi = self.ffi
        got: Listing = []
        with self.module.memory_reader(layer, "tar", "zstd" if compressed else "none") as archive:
            a = archive._pointer
            entry = ffi.entry_new()
            buf = ctypes.create_string_buffer(READ_MAX)
            name, value, size_ = ctypes.c_char_p(), ctypes.c_void_p(), ctypes.c_size_t()
            refs = ctypes.byref(name), ctypes.byref(value), ctypes.byref(size_)
            next_header, read_data, string_at = self.next_header, self.read_data, ctypes.string_at
            e_type, e_size, e_hardlink, e_symlink = (
                ffi.entry_filetype, ffi.entry_size, ffi.entry_hardlink, ffi.entry_symlink
            )  # fmt: skip
            e_path, e_mtime, e_nsec, e_uid = (
                ffi.entry_pathname, ffi.entry_mtime, ffi.entry_mtime_nsec, ffi.entry_uid
            )  # fmt: skip
            xattr_reset, xattr_next = self.xattr_reset, self.xattr_next
            try:
                while True:
                    r = next_header(a, entry)
                    if r == ARCHIVE_EOF:
                        break
                    if r != ARCHIVE_OK and (strict or r != ARCHIVE_WARN):
                        raise ValueError(f"libarchive: {self._error(a)} ({r})")
                    ft = e_type(entry)
                    hard = e_hardlink(entry)
                    link = b""
                    n = 0
                    if hard is not None:
                        kind, link = LNKTYPE, hard
                    elif ft == AE_IFREG:
                        kind = REGTYPE
                        want = e_size(entry)
                        while n < want:
                            k = read_data(a, buf, min(want - n, READ_MAX))
                            if k <= 0:
                                raise ValueError(f"libarchive: {self._error(a)} ({k})")
                            n += len(string_at(buf, k))
                    elif ft == AE_IFDIR:
                        kind = DIRTYPE
                    elif ft == AE_IFLNK:
                        kind, link = SYMTYPE, e_symlink(entry)
                    else:
                        raise ValueError(f"libarchive: file type {ft:o}")
                    x: tuple[tuple[str, bytes], ...] = ()
                    if xattr_reset(entry):
                        xattrs = {}  # its own layers say each twice (SCHILY. and LIBARCHIVE.)
                        while xattr_next(entry, *refs) == ARCHIVE_OK:
                            key = (name.value or b"").decode("utf-8", "surrogateescape")
                            xattrs[key] = string_at(value, size_.value)
                        x = tuple(sorted(xattrs.items()))
                    got.append(
                        (
                            e_path(entry).decode("utf-8", "surrogateescape").rstrip("/"),
                            kind,
                            n,
                            e_mtime(entry) * 1_000_000_000 + e_nsec(entry),
                            link.decode("utf-8", "surrogateescape"),
                            e_uid(entry),
                            x,
                        )
                    )
            finally:
                ffi.entry_free(entry)
        return got


def load() -> Libarchive | None:
    """libarchive through libarchive-c, or None when either is absent."""
    try:
        import libarchive
        from libarchive import ffi
    except (ImportError, OSError, AttributeError):  # the package or the system library
        return None
    return Libarchive(libarchive, ffi)
