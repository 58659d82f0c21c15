# The compiled lister (_listdir.c); see scan.walk.
from collections.abc import Sequence

_Record = tuple[int, int, int, int, int, int, int, int, str]
_Listing = tuple[list[str], list[_Record]]

def list_dirs(
    fds: Sequence[int], dev: int, skip: bytes, threads: int, /
) -> list[_Listing | None]: ...

class Later:
    def take(self, i: int, /) -> _Listing | None: ...

class Lister:
    def __init__(self, dev: int, skip: bytes, threads: int, budget: int = ...) -> None: ...
    def later(self, fds: list[int], /) -> Later: ...
