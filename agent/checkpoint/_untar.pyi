# The compiled writer of runs of plain files (_untar.c); see restore._write_run.
def write_files(
    buf: bytes,
    pos: int,
    dirfd: int,
    prefix: bytes,
    pax_blocks: bytes,
    budget_bytes: int,
    budget_inodes: int,
    uid: int,
    gid: int,
    umask: int,
    strict: int,
    max_files: int,
    /,
) -> tuple[int, list[str], int]: ...
