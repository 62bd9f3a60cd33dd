"""Output files: the filesystem's write mode, allocation ahead of mapped writes, and an output file in progress."""

import errno
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


from ..errors import PyloaderInputError
from ..format.safetensors import CheckpointError, read_safetensors_header

from .planning import OutFile


def file_complete(path: Path, f: OutFile) -> bool:
    if not path.is_file() or path.stat().st_size != f.size:
        return False
    try:
        h = read_safetensors_header(path)
    except CheckpointError:
        return False
    return all(n in h.tensors and h.tensors[n].shape == tuple(t.shape) and h.tensors[n].dtype == t.dtype
               for t in f.tensors for n in [t.name]) and len(h.tensors) == len(f.tensors)


def filesystem_type(path: Path) -> str:
    """Type of the filesystem holding ``path`` (the longest mount point in /proc/mounts above it)."""
    path = path.resolve()
    best, kind = "", ""
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3:
                    mnt = parts[1].replace("\\040", " ")
                    if (str(path) == mnt or str(path).startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                        best, kind = mnt, parts[2]
    except OSError:
        pass
    return kind


def writes_for(dst: Path, writes: str) -> str:
    """auto: mapped windows on memory filesystems, where one file's write(2) lock is the limit;
    write(2) on disks (docs/decisions.md#convert-writes)."""
    if writes != "auto":
        return writes
    return "mmap" if filesystem_type(dst) in ("tmpfs", "ramfs", "hugetlbfs") else "pwrite"


class Reservation:
    """Allocates an output file ahead of mapped writes, in steps, on its own thread: a mapped
    write that finds the disk full would kill the process (SIGBUS) instead of raising, so no chunk
    is written before its bytes are allocated. Steps let the first chunks go while the rest is
    allocated (tmpfs allocates a page at a time, slowly)."""

    STEP = 256 << 20

    def __init__(self, fd: int, size: int, path: Path):
        self.fd, self.size, self.path = fd, size, path
        self.reserved = 0
        self.cancelled = False
        self.error: Optional[OSError] = None
        self.cv = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="pyloader-reserve", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        pos = 0
        try:
            while pos < self.size and not self.cancelled:
                n = min(self.STEP, self.size - pos)
                os.posix_fallocate(self.fd, pos, n)
                pos += n
                with self.cv:
                    self.reserved = pos
                    self.cv.notify_all()
        except OSError as e:
            with self.cv:
                self.error = e
                self.cv.notify_all()

    def supported(self) -> bool:
        """Whether the filesystem allocates ahead (write(2) is used where it cannot)."""
        self.wait(min(self.size, self.STEP), first=True)
        return self.error is None or self.reserved > 0

    def wait(self, end: int, first: bool = False) -> None:
        with self.cv:
            while self.reserved < end and self.error is None:
                self.cv.wait()
        e = self.error
        if self.reserved >= end or e is None:
            return
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise PyloaderInputError(f"{self.path}: cannot allocate {self.size} bytes for the output: {e.strerror}")
        if not (first and self.reserved == 0):
            raise PyloaderInputError(f"{self.path}: allocating the output failed: {e.strerror}")

    def join(self) -> None:
        self.thread.join()


def free_bytes(path: Path) -> Optional[int]:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


@dataclass
class OpenFile:
    path: Path
    tmp: Path
    f: OutFile
    fd: int
    futures: list = field(default_factory=list)
    reservation: Optional[Reservation] = None

    def abort(self) -> None:
        """Cancel what has not started, wait for what has (it writes through fd), remove the file."""
        for fut in self.futures:
            fut.cancel()
        for fut in self.futures:
            if not fut.cancelled():
                try:
                    fut.result()
                except BaseException:
                    pass  # the first error is the one being raised
        if self.reservation is not None:
            self.reservation.cancelled = True
            self.reservation.join()  # it allocates through fd
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.tmp.unlink(missing_ok=True)
