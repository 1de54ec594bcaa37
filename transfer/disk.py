"""Disk reads of expert bytes: positional reads straight into host rows, several in flight.

    # a run: (path, file offset, byte offset in the destination row, bytes)
    reader = DiskReader(threads=4)
    read = reader.submit(runs, row_bytes, priority=DEMAND)   # row_bytes: a uint8 numpy view of a host row
    read.wait()

Each read is a list of runs copied with ``os.preadv`` into the destination's own memory (a page-locked
host row): no staging copy, no second in-memory copy of the checkpoint, and no reliance on the page
cache beyond what the kernel does for any read. Runs are cut into pieces of ``piece_bytes`` served by a
small pool of threads (``os.preadv`` releases the GIL), so several pieces are in flight and the disk's
queue stays full, while the pieces in flight stay next to each other in the file (one read's pieces go
out in file order): parallel, yet sequential for the disk. Pieces wait in one priority queue: demand
reads go before every queued prefetch read, and a queued read can be cancelled before any of its
pieces starts (a stale prefetch).
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np

DEMAND, PREFETCH = 0, 1
PIECE_BYTES = 16 * 2**20


@dataclass(frozen=True)
class Run:
    """``nbytes`` bytes of ``path`` at ``offset`` go to byte ``dest`` of the destination row."""

    path: str
    offset: int
    dest: int
    nbytes: int


@dataclass(eq=False)      # a read is itself: compared by identity
class Read:
    """One submitted read: ``wait()`` returns when its bytes have landed (or raises the read's error)."""

    runs: list[Run]
    out: np.ndarray
    priority: int
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    cancelled: bool = False
    started: bool = False
    left: int = 0           # pieces not yet read
    started_at: float = 0.0     # perf_counter when its first piece started, and when it landed
    done_at: float = 0.0

    @property
    def nbytes(self) -> int:
        return sum(run.nbytes for run in self.runs)

    def wait(self) -> None:
        self.done.wait()
        if self.error is not None:
            raise self.error


class DiskReader:
    """``threads`` I/O threads serving pieces by priority (DEMAND before PREFETCH, then in submission order)."""

    def __init__(self, threads: int = 4, piece_bytes: int = PIECE_BYTES):
        self._queue: list[tuple[int, int, Read, Run]] = []
        self._order = itertools.count()
        self._cv = threading.Condition()
        self._fds: dict[str, int] = {}
        self._fd_lock = threading.Lock()
        self._closed = False
        self.piece_bytes = piece_bytes
        self.bytes_read = 0
        self._threads = [threading.Thread(target=self._serve, name=f"moe-disk-{i}", daemon=True)
                         for i in range(max(1, threads))]
        for thread in self._threads:
            thread.start()

    def submit(self, runs: list[Run], out: np.ndarray, priority: int = DEMAND) -> Read:
        """Queue a read of ``runs`` into ``out`` (a contiguous uint8 array that outlives the read)."""
        if out.dtype != np.uint8 or not out.flags.c_contiguous:
            raise ValueError("disk reads land in a contiguous uint8 array")
        read = Read(runs, out, priority)
        pieces = [piece for run in sorted(runs, key=lambda r: (r.path, r.offset)) for piece in self._pieces(run)]
        read.left = len(pieces)
        with self._cv:
            if self._closed:
                raise RuntimeError("disk reader is closed")
            if not pieces:
                read.done.set()
            for piece in pieces:
                heapq.heappush(self._queue, (priority, next(self._order), read, piece))
            self._cv.notify_all()
        return read

    def _pieces(self, run: Run) -> list[Run]:
        step = self.piece_bytes
        return [Run(run.path, run.offset + at, run.dest + at, min(step, run.nbytes - at))
                for at in range(0, run.nbytes, step)]

    def remaining_s(self, read: Read, full_s: float) -> float:
        """Seconds until ``read`` lands, as far as known: 0 once landed, else a whole read's ``full_s``."""
        return 0.0 if read.done.is_set() else full_s

    def promote(self, read: Read) -> None:
        """A queued prefetch read is needed now: its pieces go before the other queued prefetches."""
        with self._cv:
            if read.priority == DEMAND or read.done.is_set():
                return
            read.priority = DEMAND
            mine = sorted((item for item in self._queue if item[2] is read), key=lambda item: item[1])
            self._queue = [item for item in self._queue if item[2] is not read]
            self._queue += [(DEMAND, next(self._order), read, piece) for *_, piece in mine]
            heapq.heapify(self._queue)

    def cancel(self, read: Read) -> bool:
        """Drop a read none of whose pieces has started; True if it was dropped (its destination is untouched)."""
        with self._cv:
            if read.started or read.done.is_set():
                return False
            read.cancelled = True
            self._queue = [item for item in self._queue if item[2] is not read]
            heapq.heapify(self._queue)
            read.done.set()
            return True

    def _serve(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if not self._queue:
                    return
                _, _, read, piece = heapq.heappop(self._queue)
                if read.cancelled or read.error is not None:
                    continue
                if not read.started:
                    read.started, read.started_at = True, time.perf_counter()
            try:
                self._pread(piece, read.out)
            except BaseException as err:   # handed to the waiter
                read.error = err
                read.done.set()
                continue
            with self._cv:
                self.bytes_read += piece.nbytes
                read.left -= 1
                if read.left == 0:
                    read.done_at = time.perf_counter()
                    read.done.set()

    def _fd(self, path: str) -> int:
        with self._fd_lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    def _pread(self, run: Run, out: np.ndarray) -> None:
        fd, view = self._fd(run.path), memoryview(out)[run.dest: run.dest + run.nbytes]
        done = 0
        while done < run.nbytes:
            got = os.preadv(fd, [view[done:]], run.offset + done)
            if got <= 0:
                raise OSError(f"{run.path}: read {done} of {run.nbytes} bytes at offset {run.offset}: file truncated")
            done += got

    def close(self) -> None:
        """Finish the reads that started, drop the queued ones, stop the threads, close the files."""
        with self._cv:
            self._closed = True
            for _, _, read, _ in self._queue:
                read.cancelled = True
                read.done.set()
            self._queue.clear()
            self._cv.notify_all()
        for thread in self._threads:
            thread.join()
        with self._fd_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
