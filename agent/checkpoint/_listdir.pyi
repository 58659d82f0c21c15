# The compiled lister (_listdir.c); see scan.walk.
def list_dir(
    fd: int, dev: int, skip: bytes, /
) -> tuple[list[str], list[tuple[int, int, int, int, int, int, int, int, str]]] | None: ...
