"""Readers: file byte ranges into pinned host buffers and on to device staging.

Three mechanisms, one job each: plain ``preadv`` (buffered, the page cache's speed), ``O_DIRECT``
reads widened to aligned bounds (files not in the page cache: the disk's speed, no double copy),
and the extension's ``HostReader`` (both of those and the host→device copies in C++, the GIL
released). A descriptor cache shares one descriptor a file among the reader threads; ``mincore``
samples tell which files are cold.
"""

import logging
import os
import threading
import time
from typing import Dict, Tuple

import torch

from ..errors import PyloaderInputError

logger = logging.getLogger("pyloader")

def preadv_into(fd: int, buf: memoryview, offset: int, path) -> None:
    pos = 0
    while pos < len(buf):
        n = os.preadv(fd, [buf[pos:]], offset + pos)
        if n <= 0:
            raise PyloaderInputError(f"{path}: file ended at byte {offset + pos} while reading (truncated or changed?)")
        pos += n


class FileCache:
    """One read-only descriptor per file (and one O_DIRECT descriptor for cold files), shared by
    the reader threads."""

    def __init__(self):
        self.fds: Dict[Tuple[str, bool], int] = {}
        self.lock = threading.Lock()
        self.direct: set = set()  # files read with O_DIRECT

    def fd(self, path, direct: bool = False) -> int:
        key = (str(path), direct)
        fd = self.fds.get(key)
        if fd is None:
            with self.lock:
                if key not in self.fds:
                    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
                    try:
                        self.fds[key] = os.open(key[0], flags)
                    except OSError as e:
                        what = " with O_DIRECT" if direct else ""
                        raise PyloaderInputError(f"{path}: cannot open{what}: {e.strerror}") from None
                fd = self.fds[key]
        return fd

    def close(self):
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


DIRECT_ALIGN = 4096  # O_DIRECT: file offset, length and buffer address aligned to the logical block (4 KiB covers all)


def pread_direct(fd: int, view: memoryview, base_addr: int, offset: int, n: int, path) -> int:
    """O_DIRECT read of file[offset:offset + n] into ``view`` (a pinned buffer whose first byte is at
    ``base_addr``); returns where in ``view`` the data starts. The read is widened to aligned
    bounds; the end may pass the end of the file (the read stops there)."""
    lead_buf = (-base_addr) % DIRECT_ALIGN
    a = offset - offset % DIRECT_ALIGN
    b = -(-(offset + n) // DIRECT_ALIGN) * DIRECT_ALIGN
    need = offset + n - a
    if lead_buf + (b - a) > len(view):
        raise PyloaderInputError(f"{path}: O_DIRECT read of {b - a} bytes does not fit a {len(view)}-byte buffer")
    got = 0
    while got < need:
        try:
            r = os.preadv(fd, [view[lead_buf + got:lead_buf + b - a]], a + got)
        except OSError as e:
            raise PyloaderInputError(f"{path}: O_DIRECT read at byte {a + got} failed: {e.strerror}") from None
        got += max(r, 0)
        if got < need and (r <= 0 or got % DIRECT_ALIGN):  # a direct read stops short only at the end
            raise PyloaderInputError(f"{path}: file ended at byte {a + got} while reading (truncated or changed?)")
    return lead_buf + (offset - a)


def direct_read_sizes(read_chunk_bytes: int) -> Tuple[int, int]:
    """(bytes a read, bytes a buffer) with O_DIRECT reads: a read is widened to aligned bounds
    (up to 2 blocks more) and may start up to a block into an unaligned buffer, so chunks shrink
    by 3 blocks and buffers keep their size (torch rounds pinned blocks up to a power of two:
    larger buffers would nearly double the pinned memory)."""
    step = max(DIRECT_ALIGN, read_chunk_bytes - 3 * DIRECT_ALIGN)
    return step, step + 3 * DIRECT_ALIGN


def _map_read_only(path):
    """(mapping, uint8 tensor over it) of a whole file, or None for an empty file."""
    import mmap
    import warnings

    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return None
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frombuffer warns that the mapping is read-only; it is only read
        return mm, torch.frombuffer(mm, dtype=torch.uint8)


def file_resident(path) -> float:
    """Sampled share of a file's pages in the page cache (mincore on a read-only mapping)."""
    mapped = _map_read_only(path)
    if mapped is None:
        return 1.0
    mm, t = mapped
    frac = _resident_fraction(t.data_ptr(), t.numel())
    del t, mapped
    mm.close()
    return frac


def _resident_fraction(mm_addr: int, size: int, samples: int = 64) -> float:
    """Share of sampled pages of a mapping that are in the page cache (mincore); 1.0 if unknown."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        page = os.sysconf("SC_PAGE_SIZE")
        vec = (ctypes.c_ubyte * 1)()
        hits = 0
        n = max(1, min(samples, size // page))
        for k in range(n):
            addr = mm_addr + (size * k // n) // page * page
            if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(page), vec) != 0:
                return 1.0
            hits += vec[0] & 1
        return hits / n
    except (OSError, AttributeError):
        return 1.0


class NativeReaders:
    """One ``_C.HostReader`` and one stream a reader thread. The pinned buffers come from torch's
    caching host allocator (reused by the next load; small ones are not page aligned, which the
    reader's O_DIRECT path allows for)."""

    def __init__(self, device: torch.device, threads: int, buffers: int, nbytes: int):
        import queue

        from .. import _C

        if nbytes < 16384:
            raise PyloaderInputError(f"pinned_buffer_bytes must be at least 16384, not {nbytes}")
        index = device.index if device.index is not None else torch.cuda.current_device()
        self.buffers = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(threads * buffers)]
        self.free: "queue.Queue" = queue.Queue()
        for k in range(threads):
            ptrs = [b.data_ptr() for b in self.buffers[k * buffers:(k + 1) * buffers]]
            self.free.put((_C.HostReader(index, ptrs, nbytes), torch.cuda.Stream(device)))
        self.taken: list = []
        self.local = threading.local()

    def get(self):
        r = getattr(self.local, "reader", None)
        if r is None:  # a thread's first chunk: at most read_threads threads ever ask
            r = self.local.reader = self.free.get_nowait()
            self.taken.append(r)
        return r

    def close(self) -> None:
        """Wait for every copy from the buffers: after this they may be freed or reused."""
        for reader, _ in self.taken:
            reader.synchronize()


class PinnedPool:
    """Pinned host buffers shared by the reader threads. A buffer comes back with the event of the
    copy that reads it; the next taker waits on that event (sleeping, not spinning) first."""

    def __init__(self, count: int, nbytes: int):
        import queue

        self.free: "queue.Queue" = queue.Queue()
        self.buffers = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(count)]
        for b in self.buffers:
            self.free.put((b, memoryview(b.numpy()).cast("B"), None))
        self.local = threading.local()

    def take(self):
        buf, view, busy = self.free.get()
        if busy is not None:
            busy.synchronize()
        return buf, view

    def give(self, buf, view, busy) -> None:
        self.free.put((buf, view, busy))

    def stream(self) -> "torch.cuda.Stream":
        st = getattr(self.local, "stream", None)
        if st is None:
            st = self.local.stream = torch.cuda.Stream()
        return st


def read_chunks(files: FileCache, chunks, host: torch.Tensor, slot_free=None) -> float:
    if slot_free is not None:
        slot_free.synchronize()  # the slot's previous batch is copied and transformed: overwrite it
    t = time.perf_counter()
    buf = memoryview(host.numpy()).cast("B")
    for path, file_offset, slot_offset, n in chunks:
        preadv_into(files.fd(path), buf[slot_offset:slot_offset + n], file_offset, path)
    return time.perf_counter() - t


def read_and_copy(files: FileCache, chunk, staging: torch.Tensor, slot_free, pool: "PinnedPool"):
    """GPU path of one chunk: preadv into a free pinned buffer, then H2D into the staging slot
    on this thread's stream once the slot's previous transform is done (a sleeping wait). Returns the copy's
    (start, end) events; the buffer goes back to the pool behind the end event."""
    path, file_offset, slot_offset, n = chunk
    buf, view = pool.take()
    try:
        t = time.perf_counter()
        if str(path) in files.direct:
            at = pread_direct(files.fd(path, True), view, buf.data_ptr(), file_offset, n, path)
        else:
            at = 0
            preadv_into(files.fd(path), view[:n], file_offset, path)
        read_s = time.perf_counter() - t
        if slot_free is not None:
            # Waiting here, not with stream.wait_event: a copy parked on a GPU-side wait blocks
            # the copies of other streams that share its hardware queue.
            slot_free.synchronize()
        stream = pool.stream()
        with torch.cuda.stream(stream):
            e0 = torch.cuda.Event(enable_timing=True)
            e0.record(stream)
            staging[slot_offset:slot_offset + n].copy_(buf[at:at + n], non_blocking=True)
            e1 = torch.cuda.Event(enable_timing=True, blocking=True)
            e1.record(stream)
    except BaseException:
        pool.give(buf, view, None)  # a failed read must not strand the buffer: other readers wait on the pool
        raise
    pool.give(buf, view, e1)
    return e0, e1, read_s


def read_and_copy_native(files: FileCache, chunk, staging: torch.Tensor, slot_free,
                          readers: NativeReaders):
    """GPU path of one chunk with the native reader: read and copied a pinned buffer at a time,
    in C++; the copies wait (on the host) for the slot's previous transform. Returns events
    around the chunk's copies (the first one also spans the first buffer's read)."""
    path, file_offset, slot_offset, n = chunk
    reader, stream = readers.get()
    direct = str(path) in files.direct
    fd = files.fd(path, direct)
    e0 = torch.cuda.Event(enable_timing=True)
    e0.record(stream)
    t = time.perf_counter()
    try:
        reader.read_to_device(fd, file_offset, n, staging.data_ptr() + slot_offset, stream.cuda_stream,
                              slot_free.cuda_event if slot_free is not None else 0, direct)
    except ValueError as e:  # the read failed or ended early (CUDA errors are RuntimeErrors: not input errors)
        raise PyloaderInputError(f"{path}: {e}") from None
    read_s = time.perf_counter() - t
    e1 = torch.cuda.Event(enable_timing=True, blocking=True)
    e1.record(stream)
    return e0, e1, read_s


def read_ranges_native(files: FileCache, reader, stream, ranges, dst: int, what: str) -> None:
    """``ranges``: (tensor, file offset, bytes, destination offset), destinations ascending: read
    and copied to ``dst`` in one call (no GIL held); a failed read names its file and tensor."""
    try:
        reader.read_ranges_to_device([files.fd(r[0].file) for r in ranges], [r[1] for r in ranges],
                                     [r[2] for r in ranges], [r[3] for r in ranges], dst, stream.cuda_stream)
    except ValueError as e:  # "range K: what happened": name the file and the tensor
        text = str(e)
        k = int(text.split(":", 1)[0].split()[-1]) if text.startswith("range ") else None
        if k is not None and 0 <= k < len(ranges):
            raise PyloaderInputError(f"{ranges[k][0].file}: tensor {ranges[k][0].name}: "
                                     f"{text.split(': ', 1)[-1]}") from None
        raise PyloaderInputError(f"reading {what}: {text}") from None
