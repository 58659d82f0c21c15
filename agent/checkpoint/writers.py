"""A restore's file writers: the work left on a file once the ordered pass has
decided it and opened it (its content, owner, mode, xattrs, times and the
close) done on worker threads, so that a disk on which every write waits for
the device has several files in flight.

Nothing here decides anything.  The ordered pass (``restore.py``) decides each
path and opens its file by a directory fd from ``RootDirs``, then hands it over
as a ``FileJob``; a worker touches nothing but that job's own fd.  Whatever
the job leaves to do by name (renaming a temporary over the final name, or
removing what a failed job created) is the pass's again: it ``settle``s a path
before any later entry touches it (a hardlink to it, a removal, another entry
at it or below it, the directory's metadata), and ``drain``s everything at the
end of each layer.  A failed job surfaces when it is settled or found done,
whichever comes first.

Handing a file to a thread costs more than writing it where writes only copy
into the page cache: with two cores the GIL changes hands on every short
system call.  So the pass writes files itself and times that work; only once
most small files take ``WritePolicy.blocked_us`` (a disk that blocks) do the
workers start, for the rest of the restore.  Large files, whose
content could not be held in memory, are always written by the pass.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from agent.checkpoint import tarformat as tf
from agent.checkpoint.metadata import finish_file

# Files up to this size are the ones timed: larger writes take long on any disk.
SAMPLE_MAX = 64 << 10
# Timed files are judged by the median of each window of this many: one file
# that meets a busy CPU (preempted, or waiting for the GIL) does not count.
SAMPLE_WINDOW = 32


@dataclass(frozen=True, slots=True)
class WritePolicy:
    """How a restore writes files.  ``workers`` 1 writes every file in the
    ordered pass, as a plain ``tar -x`` does; more start that many threads once
    the median small file takes ``blocked_us`` (0: from the first file)."""

    workers: int = 2
    max_files: int = 16  # files handed over and not yet settled
    max_bytes: int = 64 << 20  # their content, held in memory until written
    blocked_us: float = 500.0

    @property
    def max_job(self) -> int:
        """The largest file handed over; larger ones are streamed by the pass."""
        return self.max_bytes // 4


class Cancelled(Exception):
    """A job a failed restore stopped before its worker wrote it."""


@dataclass(slots=True, eq=False)
class FileJob:
    """A decided, opened file whose content and metadata are still to write."""

    fd: int
    pfd: int  # its directory, held open in RootDirs until the job is settled
    name: str  # its final name there
    tmp: str | None  # the temporary name it was created under, renamed over ``name``
    rel: str
    layer: str  # which layer, for the error
    member: tf.Member
    data: Sequence[bytes]
    owner: bool  # fchown to the member's ids
    mode: int | None  # fchmod to this
    strict: bool = True  # a refused fchown is an error (a restore as root)
    error: BaseException | None = None

    @property
    def size(self) -> int:
        return self.member.size


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _run(job: FileJob) -> None:
    """A worker's whole part of a job; the fd is closed whatever happens."""
    try:
        for piece in job.data:
            write_all(job.fd, piece)
        finish_file(job.fd, job.member, job.rel, job.owner, job.mode, job.strict)
    except BaseException as e:  # handed to the ordered pass, raised there
        job.error = e
    finally:
        job.data = ()  # the content is written (or never will be): let it go
        try:
            os.close(job.fd)
        except OSError as e:
            job.error = job.error or e


@dataclass(slots=True)
class Writers:
    """The jobs in flight, by root-relative path, and the threads that run them.

    ``land`` is the pass's own end of a job, called on the pass's thread as each
    is found done: rename, or clean up and raise.  Only that thread calls the
    methods here."""

    policy: WritePolicy
    land: Callable[[FileJob], None]
    pending: dict[str, FileJob] = field(default_factory=dict)
    active: bool = False  # files are handed over (else the pass writes them)
    sampling: bool = False  # the pass times the files it writes itself
    bytes: int = 0  # content of the pending jobs
    _window: list[float] = field(default_factory=list)
    _todo: queue.SimpleQueue[FileJob | None] = field(default_factory=queue.SimpleQueue)
    _done: queue.SimpleQueue[FileJob] = field(default_factory=queue.SimpleQueue)
    _threads: list[threading.Thread] = field(default_factory=list)
    _cancel: bool = False

    def __post_init__(self) -> None:
        if self.policy.workers > 1:
            self.active = self.policy.blocked_us <= 0
            self.sampling = not self.active

    def observe(self, seconds: float, size: int) -> None:
        """One file the pass wrote itself took ``seconds`` (its content, metadata
        and close): turn the workers on once most such files block."""
        if size > SAMPLE_MAX:
            return
        window = self._window
        window.append(seconds)
        if len(window) == SAMPLE_WINDOW:
            window.sort()
            if window[SAMPLE_WINDOW // 2] * 1e6 >= self.policy.blocked_us:
                self.active, self.sampling = True, False
            window.clear()

    def observe_run(self, seconds: float, files: int, size: int) -> None:
        """``observe`` of ``files`` written in one call, ``size`` bytes in all:
        each as their mean."""
        for _ in range(files):
            self.observe(seconds / files, size // files)
            if not self.sampling:
                return

    def takes(self, size: int) -> bool:
        """Whether a file of ``size`` bytes is to be handed over."""
        return self.active and size <= self.policy.max_job

    # -- jobs ---------------------------------------------------------------------

    def room(self, size: int) -> None:
        """Wait until a job of ``size`` bytes fits the bounds: call before its
        fd is opened, so that open files are bounded too."""
        self.reap()
        p = self.policy
        while self.pending and (
            len(self.pending) >= p.max_files or self.bytes + size > p.max_bytes
        ):
            self._land(self._wait())

    def start(self) -> None:
        """Start the threads, if not yet: before a job is handed over, so that
        one that cannot start (a pids limit) fails a job still the pass's."""
        while len(self._threads) < self.policy.workers:
            i = len(self._threads)
            t = threading.Thread(target=self._work, name=f"restore-writer-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def submit(self, job: FileJob) -> None:
        self.start()
        self.pending[job.rel] = job
        self.bytes += job.size
        self._todo.put(job)

    def _work(self) -> None:
        while (job := self._todo.get()) is not None:
            if self._cancel:
                job.error = Cancelled()
                with contextlib.suppress(OSError):
                    os.close(job.fd)
            else:
                _run(job)
            self._done.put(job)

    def _wait(self) -> FileJob:
        """The next job done, waiting for one: the pass blocks only here."""
        return self._done.get()

    def _land(self, job: FileJob) -> None:
        if self.pending.get(job.rel) is job:
            del self.pending[job.rel]
        self.bytes -= job.size
        self.land(job)

    def reap(self) -> None:
        """Land the jobs done so far, without waiting."""
        done = self._done
        while not done.empty():
            self._land(done.get())

    def settle(self, rel: str) -> None:
        """Wait for the job at ``rel``, if one is in flight, and land it."""
        job = self.pending.get(rel)
        while job is not None and self.pending.get(rel) is job:
            self._land(self._wait())

    def settle_path(self, rel: str) -> None:
        """Settle ``rel`` and every directory above it."""
        if self.pending:
            head = rel
            while head:
                self.settle(head)
                head = head.rpartition("/")[0]

    def settle_below(self, rel: str) -> None:
        """Settle ``rel`` and everything below it ("" is the root: every job)."""
        if not self.pending:
            return
        prefix = rel + "/" if rel else ""
        for k in [k for k in self.pending if k == rel or k.startswith(prefix)]:
            self.settle(k)

    def drain(self) -> None:
        while self.pending:
            self._land(self._wait())

    def close(self, abandon: Callable[[FileJob], None]) -> None:
        """Stop the threads.  Jobs still in flight (a failed restore) are not
        written if not yet started, waited for, and given to ``abandon``."""
        self._cancel = True
        try:
            while self.pending:
                job = self._wait()
                if self.pending.get(job.rel) is job:
                    del self.pending[job.rel]
                abandon(job)
        finally:
            for _ in self._threads:
                self._todo.put(None)
            for t in self._threads:
                t.join()
            self._threads.clear()
