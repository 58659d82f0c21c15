"""The hand-written tar code against Python's ``tarfile``: 35k entries, same run.

    python bench/tarformat_bench.py [--entries 35000] [--repeat 5] [--seed 1]

Layers are PAX tar written by ``agent/checkpoint/tarformat.py`` (headers),
``layer_writer.py`` and ``layer_reader.py`` rather than by ``tarfile``; this
measures what that buys, per entry, where a checkpoint of many small files
spends its Python time.  The entries are generated in memory, shaped like the
checkpoint benchmark's tree (a copy of site-packages): mostly small files
(median 2.8 kB, a long tail up to 1 MiB, the most a layer reads whole),
directories, a few symlinks and names over 100 bytes, nanosecond mtimes (so
both writers add a PAX mtime record to every entry, as a scan's stats need).

- **write**: frame every entry, content included, into one uncompressed PAX
  stream in memory: our writer's header code (``encode_header``, the content,
  ``padding``, handed on in ``FLUSH_AT`` slices, as ``LayerWriter`` does) against
  ``tarfile.TarFile.addfile`` with ``PAX_FORMAT``, both into a ``BytesIO``.
- **read**: parse that stream back from a zstd frame, as layers are stored, and
  read every file's content: ``LayerReader.members`` against
  ``tarfile.open(mode="r|")`` over zstandard's stream reader.  Our reader
  decompresses in a thread of its own, as in a restore; decompressing the frame
  alone is timed too, what both readers include.  A third row gives ``tarfile``
  the uncompressed stream instead, sparing it the decompression altogether.

Before timing, each parser reads both writers' streams back and must agree with
the generated entries.  Sides alternate who goes first from round to round;
each figure is the best of ``--repeat`` rounds, shown with every round's ratio
and their median.  Everything is held in memory: about 2 GB at 35k entries.
"""

from __future__ import annotations

import argparse
import gc
import io
import os
import random
import statistics
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.checkpoint import tarformat as tf  # noqa: E402
from agent.checkpoint.layer_reader import LayerReader  # noqa: E402
from agent.checkpoint.layer_writer import FLUSH_AT, WHOLE_FILE_MAX  # noqa: E402

# The checkpoint benchmark's tree (site-packages, 34676 files): median file
# 2828 bytes, 75th percentile 10152; a log-normal through both.
MEDIAN_SIZE = 2828
SIGMA = 1.9
DIR_SHARE = 0.13  # 5151 directories beside its 34676 files
SYMLINK_SHARE = 0.01
LONG_NAME_SHARE = 0.01  # 336 of its names are over 100 bytes
POOL = 64 << 20


@dataclass(slots=True)
class Entry:
    name: str
    type: bytes
    mode: int
    mtime_ns: int
    data: bytes = b""
    link: str = ""


def make_entries(n: int, seed: int) -> list[Entry]:
    rnd = random.Random(seed)
    # Content: bytes of eight symbols, which zstd shrinks about as much as the
    # benchmark tree's (560 MB to 157 MB), from a pool far larger than zstd's
    # window, so that no file repeats another one zstd still sees.
    pool = rnd.randbytes(POOL).translate(bytes(b"etaoin s"[i % 8] for i in range(256)))

    def word() -> str:
        return "".join(rnd.choices("abcdefghijklmnopqrstuvwxyz_", k=rnd.randint(3, 12)))

    def mtime() -> int:
        return 1_700_000_000_000_000_000 + rnd.randrange(10**17) | 1  # a nanosecond part

    dirs = ["data"]
    entries = [Entry("data", tf.DIRTYPE, 0o755, mtime())]
    while len(entries) < n:
        r = rnd.random()
        parent = rnd.choice(dirs)
        while len(parent) > 60:  # its names' median is 51 bytes, few over 100
            parent = rnd.choice(dirs)
        if r < DIR_SHARE:
            name = f"{parent}/{word()}"
            dirs.append(name)
            entries.append(Entry(name, tf.DIRTYPE, 0o755, mtime()))
        elif r < DIR_SHARE + SYMLINK_SHARE:
            entries.append(
                Entry(f"{parent}/{word()}.so", tf.SYMTYPE, 0o777, mtime(), link=f"{word()}.so")
            )
        else:
            name = f"{parent}/{word()}_{word()}.py"
            if rnd.random() < LONG_NAME_SHARE:
                name = f"{parent}/{'x' * rnd.randint(101, 160)}.py"
            size = min(int(rnd.lognormvariate(0, SIGMA) * MEDIAN_SIZE), WHOLE_FILE_MAX)
            start = rnd.randrange(len(pool) - size)
            entries.append(Entry(name, tf.REGTYPE, 0o644, mtime(), pool[start : start + size]))
    return entries


def write_ours(entries: list[Entry]) -> bytes:
    out = io.BytesIO()
    buf = bytearray()
    encode, padding = tf.encode_header, tf.padding
    for e in entries:
        size = len(e.data)
        name = e.name + "/" if e.type == tf.DIRTYPE else e.name
        buf += encode(name, e.type, e.mode, 1000, 1000, size, e.mtime_ns, e.link)
        if size:
            buf += e.data
            buf += padding(size)
        if len(buf) >= FLUSH_AT:
            out.write(buf)
            buf = bytearray()
    buf += tf.end_of_archive()
    out.write(buf)
    return out.getvalue()


def write_tarfile(entries: list[Entry]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as t:
        for e in entries:
            ti = tarfile.TarInfo(e.name)
            ti.type = e.type
            ti.mode = e.mode
            ti.uid = ti.gid = 1000
            ti.size = len(e.data)
            ti.mtime = e.mtime_ns / 1e9  # a float: the PAX mtime record
            ti.linkname = e.link
            t.addfile(ti, io.BytesIO(e.data) if e.data else None)
    return out.getvalue()


Listing = list[tuple[str, bytes, int, int]]  # name, type, content bytes, mtime in µs


def read_ours(layer: bytes) -> Listing:
    got: Listing = []
    with LayerReader(io.BytesIO(layer)) as r:
        for m in r.members():
            n = len(r.read(m.size)) if m.type == tf.REGTYPE and m.size else 0
            got.append((m.name.rstrip("/"), m.type, n, m.mtime_ns // 1000))
    return got


def _tarfile_listing(src: BinaryIO) -> Listing:
    got: Listing = []
    with tarfile.open(fileobj=src, mode="r|") as t:
        for ti in t:
            n = 0
            if ti.isreg() and ti.size:
                f = t.extractfile(ti)
                assert f is not None
                n = len(f.read())
            got.append((ti.name, ti.type, n, round(ti.mtime * 1e6)))
    return got


def read_tarfile(layer: bytes) -> Listing:
    with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(layer)) as src:
        return _tarfile_listing(src)


def read_tarfile_uncompressed(stream: bytes) -> Listing:
    """``tarfile`` spared the decompression: the most any faster zstd could give it."""
    return _tarfile_listing(io.BytesIO(stream))


def decompress_only(layer: bytes) -> int:
    n = 0
    with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(layer)) as src:
        while chunk := src.read(1 << 20):
            n += len(chunk)
    return n


def compress(stream: bytes) -> bytes:
    """A layer's frame: level 3, checksummed, as ``LayerWriter`` makes it."""
    params = zstandard.ZstdCompressionParameters.from_level(3, write_checksum=1)
    return zstandard.ZstdCompressor(compression_params=params).compress(stream)


def check(entries: list[Entry], ours: bytes, theirs: bytes) -> None:
    """Both parsers read both writers' streams as the entries that went in
    (tarfile's float mtime is good to about a microsecond)."""
    want = [(e.name, e.type, len(e.data), e.mtime_ns // 1000) for e in entries]
    for label, stream in (("ours", ours), ("tarfile", theirs)):
        layer = compress(stream)
        for reader in (read_ours, read_tarfile):
            got = reader(layer)
            bad = [
                (a, b)
                for a, b in zip(got, want, strict=True)
                if a[:3] != b[:3] or abs(a[3] - b[3]) > 2
            ]
            if bad:
                raise SystemExit(f"{reader.__name__} on {label}'s stream: {bad[0]}")


def timed(fn: Callable[[], object]) -> float:
    gc.collect()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--entries", type=int, default=35_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    entries = make_entries(args.entries, args.seed)
    files = [e for e in entries if e.type == tf.REGTYPE]
    content = sum(len(e.data) for e in files)
    ours_stream = write_ours(entries)
    check(entries, ours_stream, write_tarfile(entries))
    layer = compress(ours_stream)
    dirs = sum(e.type == tf.DIRTYPE for e in entries)
    links = sum(e.type == tf.SYMTYPE for e in entries)
    long_names = sum(len(e.name.encode()) > 100 for e in entries)
    print(
        f"{len(entries)} entries: {len(files)} files ({content / 1e6:.0f} MB, median "
        f"{statistics.median(len(e.data) for e in files):.0f} bytes), {dirs} directories, "
        f"{links} symlinks, {long_names} names over 100 bytes; stream "
        f"{len(ours_stream) / 1e6:.0f} MB, zstd {len(layer) / 1e6:.0f} MB",
        file=sys.stderr,
    )

    # step: (label, ours, tarfile's)
    steps: dict[str, tuple[str, Callable[[], object], Callable[[], object]]] = {
        "write": (
            "write: frame into an uncompressed PAX stream",
            lambda: write_ours(entries),
            lambda: write_tarfile(entries),
        ),
        "read": (
            "read: parse back from the zstd frame, content read",
            lambda: read_ours(layer),
            lambda: read_tarfile(layer),
        ),
        "read_raw": (
            "read, `tarfile` given the uncompressed stream instead",
            lambda: read_ours(layer),
            lambda: read_tarfile_uncompressed(ours_stream),
        ),
    }
    ours_t: dict[str, list[float]] = {step: [] for step in steps}
    theirs_t: dict[str, list[float]] = {step: [] for step in steps}
    unzstd: list[float] = []
    for i in range(args.repeat):
        for step, (_, ours, theirs) in steps.items():
            pair = [(ours_t, ours, "ours"), (theirs_t, theirs, "tarfile")]
            for record, fn, side in pair if i % 2 == 0 else pair[::-1]:
                record[step].append(timed(fn))
                print(f"  round {i + 1} {step} {side} {record[step][-1]:.3f} s", file=sys.stderr)
        unzstd.append(timed(lambda: decompress_only(layer)))

    print(
        f"\n{len(entries)} entries, {content / 1e6:.0f} MB of content; {os.cpu_count()} CPUs; "
        f"Python {sys.version.split()[0]}, zstandard {zstandard.__version__}; "
        f"best of {args.repeat}.\n"
    )
    print("| step | ours | `tarfile` | ratio of the best times | ratio in each round | median |")
    print("| --- | --- | --- | --- | --- | --- |")
    for step, (label, _, _) in steps.items():
        o, t = ours_t[step], theirs_t[step]
        ratios = [x / y for x, y in zip(o, t, strict=True)]
        rounds = ", ".join(f"{r:.2f}" for r in ratios)
        print(
            f"| {label} | {min(o):.2f} s | {min(t):.2f} s | {min(o) / min(t):.2f} "
            f"| {rounds} | {statistics.median(ratios):.2f} |"
        )
    us = 1e6 / len(entries)
    print(
        f"\nPer entry (best): write {min(ours_t['write']) * us:.1f} µs against "
        f"{min(theirs_t['write']) * us:.1f} µs, read {min(ours_t['read']) * us:.1f} µs against "
        f"{min(theirs_t['read']) * us:.1f} µs; decompressing the frame alone {min(unzstd):.2f} s."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
