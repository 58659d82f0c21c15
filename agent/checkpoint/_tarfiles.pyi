# The compiled framer of small files (_tarfiles.c); see layer_writer.LayerWriter.add_listing.
_Record = tuple[int, int, int, int, int, int, int, int, str]

def frame_files(
    buf: bytearray,
    dirfd: int,
    prefix: bytes,
    names: list[str],
    records: list[_Record],
    which: list[int],
    start: int,
    limit: int,
    max_size: int,
    /,
) -> tuple[int, int, list[int]]: ...
