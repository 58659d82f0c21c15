# The compiled lister (_listdir.c); see scan.walk.
from collections.abc import Sequence

_Record = tuple[int, int, int, int, int, int, int, int, str]

def list_dirs(
    fds: Sequence[int], dev: int, skip: bytes, threads: int, /
) -> list[tuple[list[str], list[_Record]] | None]: ...

class Later:
    def result(self) -> list[tuple[list[str], list[_Record]] | None]: ...

def list_later(fds: Sequence[int], dev: int, skip: bytes, threads: int, /) -> Later: ...
