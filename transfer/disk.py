"""Disk reads of expert bytes: positional reads straight into host rows, several in flight.

    # a run: (path, file offset, byte offset in the destination row, bytes)
    reader = DiskReader(threads=4)
    read = reader.submit(runs, row_bytes, priority=DEMAND)   # row_bytes: a uint8 numpy view of a host row
    read.wait()

Each read is a list of runs copied with ``os.preadv`` into the destination's own memory (a page-locked
host row): no staging copy, no second in-memory copy of the checkpoint, and no reliance on the page
cache beyond what the kernel does for any read. A small pool of threads keeps several reads in flight
so the disk's queue stays full (``os.preadv`` releases the GIL). Reads wait in one priority queue:
demand reads go before every queued prefetch read, and a queued read can be cancelled before it starts
(a stale prefetch).
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading
from dataclasses import dataclass, field

import numpy as np

DEMAND, PREFETCH = 0, 1


@dataclass(frozen=True)
class Run:
    """``nbytes`` bytes of ``path`` at ``offset`` go to byte ``dest`` of the destination row."""

    path: str
    offset: int
    dest: int
    nbytes: int


@dataclass
class Read:
    """One submitted read: ``wait()`` returns when its bytes have landed (or raises the read's error)."""

    runs: list[Run]
    out: np.ndarray
    priority: int
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    cancelled: bool = False
    started: bool = False

    @property
    def nbytes(self) -> int:
        return sum(run.nbytes for run in self.runs)

    def wait(self) -> None:
        self.done.wait()
        if self.error is not None:
            raise self.error


class DiskReader:
    """``threads`` I/O threads serving reads by priority (DEMAND before PREFETCH, then in submission order)."""

    def __init__(self, threads: int = 4):
        self._queue: list[tuple[int, int, Read]] = []
        self._order = itertools.count()
        self._cv = threading.Condition()
        self._fds: dict[str, int] = {}
        self._fd_lock = threading.Lock()
        self._closed = False
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
        with self._cv:
            if self._closed:
                raise RuntimeError("disk reader is closed")
            heapq.heappush(self._queue, (priority, next(self._order), read))
            self._cv.notify()
        return read

    def remaining_s(self, read: Read, full_s: float) -> float:
        """Seconds until ``read`` lands, as far as known: 0 once landed, else a whole read's ``full_s``."""
        return 0.0 if read.done.is_set() else full_s

    def promote(self, read: Read) -> None:
        """A queued prefetch read is needed now: it goes before the other queued prefetches."""
        with self._cv:
            if read.started or read.priority == DEMAND:
                return
            read.priority = DEMAND
            heapq.heappush(self._queue, (DEMAND, -1, read))   # (its old entry is skipped when popped)

    def cancel(self, read: Read) -> bool:
        """Drop a read that has not started; True if it was dropped (its destination is left untouched)."""
        with self._cv:
            if read.started or read.done.is_set():
                return False
            read.cancelled = True
            read.done.set()
            return True

    def _serve(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if not self._queue:
                    return
                _, _, read = heapq.heappop(self._queue)
                if read.started or read.cancelled:
                    continue
                read.started = True
            try:
                for run in read.runs:
                    self._pread(run, read.out)
                with self._cv:
                    self.bytes_read += read.nbytes
            except BaseException as err:   # handed to the waiter
                read.error = err
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

    def drop_cache(self) -> None:
        """Ask the kernel to drop the page cache of every file read so far (for cold-read measurements)."""
        with self._fd_lock:
            for fd in self._fds.values():
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        """Finish the reads that started, drop the queued ones, stop the threads, close the files."""
        with self._cv:
            self._closed = True
            for _, _, read in self._queue:
                if not read.started:
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
