"""The streaming executor: a plan's byte ranges → pinned host buffers → device staging slots →
one batched transform launch per slot, writing every tensor straight into its final place.

    reader thread: a chunk, read and copied a small pinned buffer at a time by the extension's
        HostReader (C++, GIL released: pread or O_DIRECT ─► H2D on the thread's own stream into its
        place in staging slot k, after the slot's previous transform) ─► event
    orchestrator: once every chunk of slot k has landed ─► compute stream: one multi_tensor_transform
        over every tensor in the slot ─► event k frees slot k

Each reader copies its own chunk as soon as it is read: no chunk waits for the rest of its slot,
and no thread serializes the copies (on the H200 host side alone, pread + H2D a slot at a time
moved 37.5 GB/s, per-thread copies 44-46; bench/NOTES.md). Scales (small) go to the device first, so a weight never
waits for its scale. A tensor larger than a slot is split by rows (scale blocks are indexed from
each part's global row, so any row split is exact). Memory is ``num_slots x slot_bytes`` on the
device and ``read_threads x buffers_per_thread x pinned_buffer_bytes`` pinned (``cold_read_threads``
readers when files are read with O_DIRECT; ``read_chunk_bytes`` buffers with the Python readers),
whatever the model size. On a CPU device the same plan runs with the torch backend, reading
straight into host slots. Small buffers, no Python a buffer: 12 readers x 2 x 8 MiB (192 MiB, which
the H200 host's 300 MiB last-level cache can hold between the page-cache copy and the DMA that
reads it back) moved 46-47 GB/s warm where 32 MiB buffers with torch copies moved 44 (same run;
bench/NOTES.md, session 5).
"""

import logging
import math
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .backend import resolve_backend
from .checkpoint import TensorInfo, gc_paused
from .errors import PyloaderInputError
from .plan import Piece, Plan
from .transform import TransformJob, run_jobs

logger = logging.getLogger("pyloader")

_ALIGN = 256  # every part starts 256-byte aligned in a slot: the kernels' 16-byte vector path applies


@dataclass
class ExecutorConfig:
    slot_bytes: int = 128 << 20
    num_slots: int = 8               # device staging: num_slots x slot_bytes
    # 12 readers, not 16, on the 16-core H200 host: with a reader a core the orchestrator that
    # launches the transforms and frees the slots is starved (33 vs 39 GB/s, bench/NOTES.md)
    read_threads: int = 12
    # one preadv (and, on a GPU, one H2D copy) at most this large: 32 MiB x 2 buffers a reader
    # moved 43.5 GB/s warm where 16 MiB x 3 moved 40.4 (same run, bench/NOTES.md): fewer Python
    # steps a byte, and deeper O_DIRECT requests on cold files
    read_chunk_bytes: int = 32 << 20
    # GPU: pinned host buffers, this many a reader thread; each reader copies what it read to the
    # device itself, on its own stream
    buffers_per_thread: int = 2
    # GPU, native readers: the pinned buffer size. A chunk is read and copied a buffer at a time
    # (C++, no Python a buffer), so buffers stay small: 12 x 2 x 8 MiB = 192 MiB pinned, which the
    # last-level cache can hold between the page-cache copy and the DMA that reads it back
    # (bench/NOTES.md, session 5). The Python readers use buffers of read_chunk_bytes.
    pinned_buffer_bytes: int = 8 << 20
    # GPU: "native": the extension's HostReader (pread/O_DIRECT and the H2D copies in C++, the GIL
    # released); "python": preadv and torch copies from a pool of read_chunk_bytes pinned buffers;
    # "auto": native where the CUDA extension is built, else python (logged).
    readers: str = "auto"
    # "pread": reader threads into pinned buffers, each copying its own chunks. "mmap": files mapped read-only and registered
    # with cudaHostRegister(ReadOnly) in windows, DMA straight from the page cache (no CPU copy;
    # the copies run at the PCIe ceiling, but registering the pages costs more than the copy
    # saves: 21.6 vs 35.3 GB/s warm on the H200, bench/NOTES.md). "auto": pread.
    io: str = "auto"
    # GPU loads, files not in the page cache (sampled with mincore at the start): "direct" reads
    # them with O_DIRECT into pinned buffers (3.4-3.9 vs 2.3-2.5 GB/s buffered in session 5;
    # posix_fadvise(WILLNEED) ahead did no better than buffered, bench/NOTES.md); "buffered": plain
    # reads, the kernel's readahead only. "auto": direct where the filesystem allows it (logged),
    # else buffered. Files in the page cache are read buffered.
    cold_reads: str = "auto"
    # Native readers when some file is read with O_DIRECT: the disk, not the CPU, is then the
    # limit. The readers take small chunks of the batch in file order and read each in requests of
    # cold_request_bytes, so the disk sees one ascending stream of small requests, 16 in flight
    # (fastsafetensors 0.5.0's nogds shape): on the H200 machine's virtual disk 512 KiB requests
    # read 3.53 GB/s where 2-8 MiB ones read 2.80-2.85 (same run, bench/NOTES.md, session 7).
    cold_read_threads: int = 16
    cold_request_bytes: int = 512 << 10
    cold_chunk_bytes: int = 4 << 20
    # pyloader.load of a whole model (no tp/pp/ep) from warm files: reads of the first slots begin
    # as soon as the headers are read, while the plan is built (StreamingExecutor.start_early)
    early_reads: bool = True


@dataclass
class Timings:
    read_s: float = 0.0       # summed over reader threads
    wait_read_s: float = 0.0  # orchestrator waiting for reads (the critical path when I/O bound)
    # device time with at least one host→device copy running (CUDA events; with native readers a
    # chunk's span also covers the read of its first buffer, so this is an upper bound)
    h2d_s: float = 0.0
    transform_s: float = 0.0  # device time of transform launches
    wall_s: float = 0.0       # executor start (start_early, else run) until the device is done
    setup_s: float = 0.0      # executor start until the first reads are queued (buffers, readers)
    # seconds by step, in order: batches, staging, cold_check, readers, scales_queued,
    # reads_queued; with reads before the plan: staging, cold_check, readers, early_reads_queued,
    # plan (the caller planning while those reads ran), batches, scales_queued, reads_queued
    setup_parts: Dict[str, float] = field(default_factory=dict)
    drain_s: float = 0.0      # last transform enqueued until the device is done
    cold_files: int = 0       # files read as cold (see ExecutorConfig.cold_reads)
    read_threads: int = 0     # reader threads used (ExecutorConfig.cold_read_threads where files are cold)
    pinned_bytes: int = 0     # pinned host buffers of the readers (scales aside)
    # pyloader.load before the executor (seconds): headers (read and checked), preset (rules and
    # target layout), plan (routing, pairing, shape and coverage checks)
    prepare_parts: Dict[str, float] = field(default_factory=dict)
    finish_s: float = 0.0     # pyloader.load after the executor (report, tied targets)
    early_bytes: int = 0      # read before the plan existed (StreamingExecutor.start_early)
    early_unused_bytes: int = 0  # of those, bytes of tensors the plan did not use


@dataclass(slots=True)
class _Part:
    piece: Optional[Piece]   # None: a tensor read before the plan existed (see StreamingExecutor.start_early)
    row0: int        # first row of the part, relative to the rows this rank reads of the source
    rows: int
    file_offset: int
    nbytes: int
    slot_offset: int = 0
    source: Optional[TensorInfo] = None  # what is read (the piece's source)


@dataclass(slots=True)
class _Batch:
    parts: List[_Part] = field(default_factory=list)
    nbytes: int = 0
    layers: set = field(default_factory=set)


def _read_rows(piece: Piece) -> Tuple[int, int]:
    """Rows of the source that this rank reads (a column-parallel slice reads only its rows)."""
    shape = piece.source.shape
    n = shape[0] if shape else 1
    pl = piece.placement
    if pl.src_rows is not None and pl.src_cols is None and len(shape) >= 1:
        return pl.src_rows
    return 0, n


def _pack(batches: List[_Batch], source: TensorInfo, piece: Optional[Piece], rows: int, first_byte: int,
          total: int, slot_bytes: int, max_batches: Optional[int] = None) -> bool:
    """Append ``rows`` rows (``total`` bytes from file offset ``first_byte``) of ``source`` to the
    batches, split by rows where larger than a slot. With ``max_batches``: all or nothing (False,
    the batches unchanged, where the rows would not fit)."""
    row_bytes = total // rows if rows else total
    if row_bytes > slot_bytes:
        raise PyloaderInputError(f"{source.file}: tensor {source.name}: one row is {row_bytes} bytes, "
                                 f"larger than a staging slot ({slot_bytes}); raise slot_bytes")
    if source.shape is None or len(source.shape) <= 1 or rows == 0:
        chunks = [(0, rows, total)]
    else:
        per = max(1, (slot_bytes - _ALIGN) // row_bytes)
        chunks = [(r, min(per, rows - r), min(per, rows - r) * row_bytes) for r in range(0, rows, per)]
    placed, count, used, empty = [], len(batches), batches[-1].nbytes, not batches[-1].parts
    for _, _, nbytes in chunks:  # where each chunk goes (batch index, slot offset)
        start = -(-used // _ALIGN) * _ALIGN
        if start + nbytes > slot_bytes and not empty:
            count, start = count + 1, 0
        placed.append((count - 1, start))
        used, empty = start + nbytes, False
    if max_batches is not None and count > max_batches:
        return False
    for (r, n, nbytes), (k, start) in zip(chunks, placed):
        if k == len(batches):
            batches.append(_Batch())
        cur = batches[k]
        cur.parts.append(_Part(piece, r, n, first_byte + r * row_bytes, nbytes, start, source))
        cur.nbytes = start + nbytes
        if piece is not None:
            cur.layers.add(piece.layer)
    return True


def split_into_batches(pieces: List[Piece], slot_bytes: int) -> List[_Batch]:
    """Pack pieces (in plan order) into slot-sized batches; pieces larger than a slot are split by rows."""
    batches: List[_Batch] = [_Batch()]
    for p in pieces:
        a, b = _read_rows(p)
        _pack(batches, p.source, p, b - a, p.read_range[0], p.read_range[1] - p.read_range[0], slot_bytes)
    return [b for b in batches if b.parts]


def early_batches(tensors: List[TensorInfo], slot_bytes: int, max_batches: int) -> List[_Batch]:
    """Whole tensors, in the given order, packed into at most ``max_batches`` slots. A tensor that
    does not fit entirely is left to the plan's reads and packing goes on with the next (a real
    checkpoint may open with an embedding larger than all the slots)."""
    batches: List[_Batch] = [_Batch()]
    misses = 0
    for t in tensors:
        if t.shape is None or t.nbytes <= 0:
            continue
        rows = t.shape[0] if t.shape else 1
        if _pack(batches, t, None, rows, t.start, t.nbytes, slot_bytes, max_batches):
            misses = 0
        else:
            misses += 1
            if misses >= 64 or (len(batches) == max_batches and batches[-1].nbytes >= slot_bytes - slot_bytes // 64):
                break  # full: not worth looking through every remaining tensor
    return [b for b in batches if b.parts]


def _adopt_early_parts(pieces: List[Piece], early: List[_Batch]) -> Tuple[List[Piece], int]:
    """Give each piece whose rows were read before the plan its parts in the early batches (the
    rows it reads, wherever they landed); returns the pieces still to be read, and the bytes read
    early that no piece uses."""
    where: Dict[str, List[Tuple[_Batch, _Part]]] = {}
    for b in early:
        for part in b.parts:
            if part.piece is None:
                where.setdefault(part.source.name, []).append((b, part))
    rest, adopted = [], set()
    for p in pieces:
        got = where.get(p.source.name)
        if not got or p.source.shape is None:
            rest.append(p)
            continue
        a, b_ = _read_rows(p)
        if a >= b_:
            rest.append(p)
            continue
        row_bytes = p.source.nbytes // (p.source.shape[0] if p.source.shape else 1)
        for batch, t in got:
            lo, hi = max(a, t.row0), min(b_, t.row0 + t.rows)
            if lo < hi:
                batch.parts.append(_Part(p, lo - a, hi - lo, p.source.start + lo * row_bytes, (hi - lo) * row_bytes,
                                         t.slot_offset + (lo - t.row0) * row_bytes, p.source))
                batch.layers.add(p.layer)
                adopted.add(p.source.name)
    unused = sum(part.nbytes for name, got in where.items() if name not in adopted for _, part in got)
    return rest, unused


def _preadv_into(fd: int, buf: memoryview, offset: int, path) -> None:
    pos = 0
    while pos < len(buf):
        n = os.preadv(fd, [buf[pos:]], offset + pos)
        if n <= 0:
            raise PyloaderInputError(f"{path}: file ended at byte {offset + pos} while reading (truncated or changed?)")
        pos += n


class _FileCache:
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


_DIRECT_ALIGN = 4096  # O_DIRECT: file offset, length and buffer address aligned to the logical block (4 KiB covers all)


def _pread_direct(fd: int, view: memoryview, base_addr: int, offset: int, n: int, path) -> int:
    """O_DIRECT read of file[offset:offset + n] into ``view`` (a pinned buffer whose first byte is at
    ``base_addr``); returns where in ``view`` the data starts. The read is widened to aligned
    bounds; the end may pass the end of the file (the read stops there)."""
    lead_buf = (-base_addr) % _DIRECT_ALIGN
    a = offset - offset % _DIRECT_ALIGN
    b = -(-(offset + n) // _DIRECT_ALIGN) * _DIRECT_ALIGN
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
        if got < need and (r <= 0 or got % _DIRECT_ALIGN):  # a direct read stops short only at the end
            raise PyloaderInputError(f"{path}: file ended at byte {a + got} while reading (truncated or changed?)")
    return lead_buf + (offset - a)


def _direct_read_sizes(read_chunk_bytes: int) -> Tuple[int, int]:
    """(bytes a read, bytes a buffer) with O_DIRECT reads: a read is widened to aligned bounds
    (up to 2 blocks more) and may start up to a block into an unaligned buffer, so chunks shrink
    by 3 blocks and buffers keep their size (torch rounds pinned blocks up to a power of two:
    larger buffers would nearly double the pinned memory)."""
    step = max(_DIRECT_ALIGN, read_chunk_bytes - 3 * _DIRECT_ALIGN)
    return step, step + 3 * _DIRECT_ALIGN


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


def _file_resident(path) -> float:
    """Sampled share of a file's pages in the page cache (mincore on a read-only mapping)."""
    mapped = _map_read_only(path)
    if mapped is None:
        return 1.0
    mm, t = mapped
    frac = _resident_fraction(t.data_ptr(), t.numel())
    del t, mapped
    mm.close()
    return frac


_CUDA_HOST_REGISTER_READ_ONLY = 0x08


def _clear_torch_cuda_error() -> None:
    """A failed cudaHostRegister leaves the error as the runtime's "last error", where torch's next
    launch check would report it against an unrelated kernel: consume it in torch's cudart."""
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "libcudart" in line}
        for lib in libs:
            ctypes.CDLL(lib).cudaGetLastError()
    except OSError:
        pass


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


class _RegisteredFiles:
    """Files mapped read-only; windows of them registered as pinned memory (cudaHostRegister
    ReadOnly) by a few threads ahead of the copies, so DMA reads straight from the page cache
    while registration of later windows proceeds. Copies are split at window boundaries."""

    def __init__(self, window_bytes: int = 1 << 30, threads: int = 8):
        self.window = window_bytes
        self.maps: Dict[str, Tuple[object, torch.Tensor]] = {}
        self.futures: Dict[Tuple[str, int], object] = {}
        self.refused: Dict[str, str] = {}
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pyloader-register")
        self.registered: List[int] = []
        self.lock = threading.Lock()

    def map(self, path) -> Optional[torch.Tensor]:
        key = str(path)
        if key in self.maps:
            return self.maps[key][1]
        if key in self.refused:
            return None
        mapped = _map_read_only(key)
        if mapped is None:
            self.refused[key] = "empty file"
            return None
        mm, t = mapped
        size = t.numel()
        self.maps[key] = (mm, t)
        for k, off in enumerate(range(0, size, self.window)):
            self.futures[(key, k)] = self.pool.submit(self._register, t.data_ptr() + off, min(self.window, size - off))
        return t

    def _register(self, ptr: int, n: int) -> Optional[str]:
        err = int(torch.cuda.cudart().cudaHostRegister(ptr, n, _CUDA_HOST_REGISTER_READ_ONLY))
        if err != 0:
            _clear_torch_cuda_error()
            return f"cudaHostRegister(ReadOnly) failed with error {err}"
        with self.lock:
            self.registered.append(ptr)
        return None

    def first_window_ok(self, path) -> bool:
        """Registration of the file's first window (decides the path before any copy)."""
        key = str(path)
        why = self.futures[(key, 0)].result()
        if why:
            self.refused[key] = why
            logger.info("pyloader: %s: %s; reading through pinned slots instead", key, why)
        return why is None

    def copy(self, dst: torch.Tensor, path, offset: int, n: int) -> None:
        """Enqueue dst[:n] <- file[offset:offset + n] on the current stream, window by window."""
        key = str(path)
        t = self.maps[key][1]
        pos = 0
        while pos < n:
            k = (offset + pos) // self.window
            why = self.futures[(key, k)].result()
            if why:
                raise PyloaderInputError(f"{path}: {why} (window {k}) after earlier windows registered")
            end = min(n, (k + 1) * self.window - offset)
            dst[pos:end].copy_(t[offset + pos:offset + end], non_blocking=True)
            pos = end

    def close(self):
        self.pool.shutdown(wait=True)
        for ptr in self.registered:
            torch.cuda.cudart().cudaHostUnregister(ptr)
        self.registered.clear()
        tensors = [t for _, t in self.maps.values()]
        maps = [mm for mm, _ in self.maps.values()]
        self.maps.clear()
        del tensors
        for mm in maps:
            try:
                mm.close()
            except BufferError:
                pass  # a view is still alive; the mapping goes with it


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 0:
        return t.reshape(1, 1)
    if t.dim() == 1:
        return t.unsqueeze(0)
    return t.reshape(t.shape[0], -1)


def piece_jobs(piece: Piece, src: torch.Tensor, row0: int, target: torch.Tensor,
               scales: Dict[str, torch.Tensor], experts: Optional[Dict[int, int]]) -> List[TransformJob]:
    """Jobs writing ``src`` (rows ``row0..`` of what this rank reads of ``piece.source``, already
    viewed with the source dtype and shape) into ``target``."""
    pl = piece.placement
    jobs = []
    if experts is not None and piece.expert_id is None:  # pre-stacked experts: one job per owned expert
        for g, slot in experts.items():
            if row0 <= g < row0 + src.shape[0]:  # this part holds experts row0 .. row0 + len
                jobs.append(TransformJob(_as_matrix(src[g - row0]), _as_matrix(target[slot])))
        return jobs
    plane = target[piece.slot] if piece.slot is not None else target
    if plane.dim() <= 1:  # 1-D target (norm, bias): elements
        dst = plane.reshape(-1)[pl.offset:pl.offset + src.numel()].unsqueeze(0)
        s = src.reshape(1, -1)
        return [_job(piece, s, dst, scales, 0, 0)]
    src2 = _as_matrix(src)
    rows_base = pl.src_rows[0] if (pl.src_rows is not None and pl.src_cols is None) else 0
    c0 = 0
    if pl.src_cols is not None:
        c0 = pl.src_cols[0]
        src2 = src2[:, pl.src_cols[0]:pl.src_cols[1]]
    global_row0 = rows_base + row0
    dst_row0 = pl.offset + (global_row0 - (pl.src_rows[0] if pl.src_rows is not None else 0))
    dst = _as_matrix(plane)[dst_row0:dst_row0 + src2.shape[0]]
    return [_job(piece, src2, dst, scales, global_row0, c0)]


def _job(piece: Piece, src, dst, scales, global_row0: int, c0: int) -> TransformJob:
    if piece.transform != "dequant":
        return TransformJob(src, dst)
    scale = scales[piece.scale.name]
    shape = piece.source.shape
    if scale.numel() == 1:  # per-tensor
        return TransformJob(src, dst, scale.reshape(1, 1), (max(1, shape[0]), max(1, math.prod(shape[1:]) or 1)))
    bm, bn = piece.block_size
    grid = scale if scale.dim() == 2 else scale.reshape(1, -1)
    return TransformJob(src, dst, grid[global_row0 // bm:, c0 // bn:], (bm, bn), (global_row0 % bm, c0 % bn))


def _view_source(raw: torch.Tensor, info: TensorInfo, rows: int) -> torch.Tensor:
    dtype = info.torch_dtype
    shape = info.shape
    t = raw.view(dtype)
    if not shape:
        return t.reshape(())
    return t.view((rows,) + tuple(shape[1:]))


class _NativeReaders:
    """One ``_C.HostReader`` and one stream a reader thread. The pinned buffers come from torch's
    caching host allocator (reused by the next load; small ones are not page aligned, which the
    reader's O_DIRECT path allows for)."""

    def __init__(self, device: torch.device, threads: int, buffers: int, nbytes: int):
        import queue

        from . import _C

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


class _PinnedPool:
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


def _busy_seconds(spans: List[Tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (copies on many streams overlap)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


class StreamingExecutor:
    """Runs a :class:`~pyloader.plan.Plan` into ``tensors`` (target name → tensor on ``device``)::

        ex = StreamingExecutor(tensors, device)
        ex.start_early(checkpoint)   # optional: reads begin while the caller builds the plan
        timings = ex.run(plan)       # or ex.close() when no plan comes: nothing was written
    """

    def __init__(self, tensors: Dict[str, torch.Tensor], device: torch.device,
                 backend: Optional[str] = None, config: ExecutorConfig = ExecutorConfig(),
                 progress: bool = True, hooks: Optional[Callable[[Optional[int]], None]] = None):
        self.plan: Optional[Plan] = None
        self.tensors, self.device = tensors, torch.device(device)
        self.cfg = config
        self.backend = resolve_backend(backend, self.device, "load")
        self.progress = progress
        self.hooks = hooks
        self.timings = Timings()
        self.bytes_read = 0
        self.io_used = ""
        self.readers_used = ""  # "native" or "python" (GPU pinned-buffer path), see ExecutorConfig.readers
        self._read_step = config.read_chunk_bytes  # bytes a read (smaller with O_DIRECT reads, see _open)
        self._opened = False
        self._t_start = 0.0
        self._marks: List[Tuple[str, float]] = []
        self._early: Optional[Tuple[List[_Batch], list]] = None  # batches read before the plan, their reads
        self.files = self.pool = self.native = self.pinned = self.registered = None
        self.staging_all = None
        self.staging: List[torch.Tensor] = []
        self.nslots = 0
        self.threads = config.read_threads
        self._usable: Dict[str, bool] = {}

    def _read_chunks(self, files: _FileCache, chunks, host: torch.Tensor, slot_free=None) -> float:
        if slot_free is not None:
            slot_free.synchronize()  # the slot's previous batch is copied and transformed: overwrite it
        t = time.perf_counter()
        buf = memoryview(host.numpy()).cast("B")
        for path, file_offset, slot_offset, n in chunks:
            _preadv_into(files.fd(path), buf[slot_offset:slot_offset + n], file_offset, path)
        return time.perf_counter() - t

    def _read_and_copy(self, files: _FileCache, chunk, staging: torch.Tensor, slot_free, pool: "_PinnedPool"):
        """GPU path of one chunk: preadv into a free pinned buffer, then H2D into the staging slot
        on this thread's stream once the slot's previous transform is done (a sleeping wait). Returns the copy's
        (start, end) events; the buffer goes back to the pool behind the end event."""
        path, file_offset, slot_offset, n = chunk
        buf, view = pool.take()
        try:
            t = time.perf_counter()
            if str(path) in files.direct:
                at = _pread_direct(files.fd(path, True), view, buf.data_ptr(), file_offset, n, path)
            else:
                at = 0
                _preadv_into(files.fd(path), view[:n], file_offset, path)
            read_s = time.perf_counter() - t
            if slot_free is not None:
                # Waiting here, not with stream.wait_event: a copy parked on a GPU-side wait blocks
                # the copies of other streams that share its hardware queue (37 -> 28 GB/s measured).
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

    def _read_and_copy_native(self, files: _FileCache, chunk, staging: torch.Tensor, slot_free,
                              readers: _NativeReaders):
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

    def _choose_readers(self) -> str:
        from . import _C

        mode = self.cfg.readers
        built = getattr(_C, "cuda_built", False) and hasattr(_C, "HostReader")
        if mode == "native" and not built:
            raise PyloaderInputError("readers='native' needs the CUDA extension (pyloader._C), which is not built")
        chosen = "native" if (mode == "native" or (mode == "auto" and built)) else "python"
        if mode == "auto" and not built:
            logger.info("pyloader: the CUDA extension is not built: reading through Python readers (slower)")
        return chosen

    def _choose_cold_reads(self, files: _FileCache, file_names: List[str]) -> None:
        """Mark the files not in the page cache for O_DIRECT reads."""
        mode = self.cfg.cold_reads
        if mode == "buffered":
            return
        cold = [f for f in file_names if _file_resident(f) < 0.5]
        self.timings.cold_files = len(cold)
        for f in cold:
            try:
                files.fd(f, direct=True)
            except PyloaderInputError as e:
                if mode == "direct":
                    raise
                logger.info("pyloader: %s; reading it buffered", e)  # e.g. a filesystem without O_DIRECT
                continue
            files.direct.add(f)
        if cold:
            logger.info("pyloader: %d of the checkpoint's %d files are not in the page cache: %d read with O_DIRECT",
                        len(cold), len(file_names), len(files.direct))

    def _chunks(self, parts: List[_Part]):
        """A batch's reads as (file, file offset, slot offset, bytes) pieces of at most read_chunk_bytes."""
        out, step = [], self._read_step
        for part in parts:
            for off in range(0, part.nbytes, step):
                out.append((part.source.file, part.file_offset + off, part.slot_offset + off,
                            min(step, part.nbytes - off)))
        return out

    def _start_scales(self, files: _FileCache, pool: ThreadPoolExecutor, threads: int,
                      native: Optional["_NativeReaders"] = None):
        """Queue the reads of every scale tensor (small) ahead of the first batches' reads: they
        overlap those reads instead of delaying them. Native readers read them straight into one
        device buffer, a contiguous group of scales a thread in one call (a DeepSeek-V3 slice has
        ~1000 scales of a few KiB: a Python read each held the GIL the orchestrator needs);
        otherwise into one pinned buffer, moved in one copy by _finish_scales."""
        infos = list({s.name: s for s in self.plan.scales}.values())
        if not infos:
            return None
        offsets, pos = [], 0
        for info in infos:
            offsets.append(pos)
            pos += -(-info.nbytes // 16) * 16
        if native is not None:
            dev = torch.empty(max(pos, 1), dtype=torch.uint8, device=self.device)
            per = -(-len(infos) // threads)
            groups = [range(k, min(len(infos), k + per)) for k in range(0, len(infos), per)]
            return infos, offsets, dev, [pool.submit(self._read_scales_native, files, native, infos, offsets, g, dev)
                                         for g in groups]
        host = torch.empty(pos, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        chunks = [(info.file, info.start, off, info.nbytes) for info, off in zip(infos, offsets)]
        groups = [chunks[k::threads] for k in range(min(threads, len(chunks)))]
        return infos, offsets, host, [pool.submit(self._read_chunks, files, g, host) for g in groups]

    @staticmethod
    def _read_ranges_native(files: _FileCache, reader, stream, ranges, dst: int, what: str) -> None:
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

    @staticmethod
    def _read_scales_native(files: _FileCache, native: "_NativeReaders", infos, offsets, group: range,
                            dev: torch.Tensor):
        reader, stream = native.get()
        StreamingExecutor._read_ranges_native(files, reader, stream,
                                              [(infos[i], infos[i].start, infos[i].nbytes, offsets[i]) for i in group],
                                              dev.data_ptr(), "scale tensors")
        done = torch.cuda.Event()
        done.record(stream)
        return done

    def _finish_scales(self, started) -> Dict[str, torch.Tensor]:
        """Wait for the scale reads (and, from pinned memory, move them to the device in one copy)."""
        if started is None:
            return {}
        infos, offsets, buf, futures = started
        results = [f.result() for f in futures]
        if buf.device.type == "cuda":  # native readers read straight to the device, on their streams
            current = torch.cuda.current_stream(self.device)
            for done in results:
                current.wait_event(done)
            dev = buf
        else:
            dev = buf.to(self.device, non_blocking=True) if self.device.type == "cuda" else buf
        self.bytes_read += sum(info.nbytes for info in infos)
        return {info.name: dev[off:off + info.nbytes].view(info.torch_dtype).view(info.shape)
                for info, off in zip(infos, offsets)}

    def _start_clock(self) -> None:
        """The executor's start (start_early, else run): wall_s, setup_s and setup_parts count from here."""
        self._t_start = time.perf_counter()
        self._marks = [("start", self._t_start)]

    def _open(self, file_names: List[str], nslots: int) -> None:
        """What a load needs before its first read: staging slots, descriptors, the cold check, the
        readers and their pool (after :meth:`_start_clock`)."""
        cfg, dev = self.cfg, self.device
        if cfg.io not in ("auto", "mmap", "pread"):
            raise PyloaderInputError(f"io must be 'auto', 'mmap' or 'pread', not {cfg.io!r}")
        if cfg.readers not in ("auto", "native", "python"):
            raise PyloaderInputError(f"readers must be 'auto', 'native' or 'python', not {cfg.readers!r}")
        if cfg.cold_reads not in ("auto", "direct", "buffered"):
            raise PyloaderInputError(f"cold_reads must be 'auto', 'direct' or 'buffered', not {cfg.cold_reads!r}")
        self._opened = True
        self.files = _FileCache()
        cuda = dev.type == "cuda"
        self.nslots = nslots
        # one allocation: a group of reads before the plan spans several slots in one call
        self.staging_all = torch.empty(nslots * cfg.slot_bytes, dtype=torch.uint8, device=dev if cuda else "cpu")
        self.staging = [self.staging_all[k * cfg.slot_bytes:(k + 1) * cfg.slot_bytes] for k in range(nslots)]
        self._marks.append(("staging", time.perf_counter()))
        if cuda and cfg.io == "mmap":
            self.registered = _RegisteredFiles()
            # cold files too: their pages are faulted in during registration
            self._usable = {f: self.registered.map(f) is not None and self.registered.first_window_ok(f)
                            for f in file_names}
            if self.registered.refused:
                raise PyloaderInputError(f"io='mmap': {next(iter(self.registered.refused.items()))}")
        if cuda and not (self._usable and all(self._usable.values())):
            self._choose_cold_reads(self.files, file_names)
            self._marks.append(("cold_check", time.perf_counter()))
            self.readers_used = self._choose_readers()
            buffer_bytes = cfg.pinned_buffer_bytes
            if self.files.direct and self.readers_used == "native":  # Python readers: 32 MiB buffers, 12 keep 768 MiB
                self.threads = max(1, cfg.cold_read_threads)
                # a buffer a request: the reader widens an O_DIRECT read by up to 3 blocks
                buffer_bytes = max(cfg.cold_request_bytes, _DIRECT_ALIGN) + 3 * _DIRECT_ALIGN
                self._read_step = max(cfg.cold_chunk_bytes, _DIRECT_ALIGN)
            if self.readers_used == "native":  # chunks of any size: the reader splits them into its buffers
                self.native = _NativeReaders(dev, self.threads, cfg.buffers_per_thread, buffer_bytes)
            else:
                buffer_bytes = cfg.read_chunk_bytes
                if self.files.direct:
                    self._read_step, buffer_bytes = _direct_read_sizes(cfg.read_chunk_bytes)
                self.pinned = _PinnedPool(self.threads * cfg.buffers_per_thread, buffer_bytes)
        self.pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="pyloader-read")
        self._marks.append(("readers", time.perf_counter()))
        self.timings.read_threads = self.threads
        held = self.native.buffers if self.native is not None else (self.pinned.buffers if self.pinned is not None else [])
        self.timings.pinned_bytes = sum(b.numel() for b in held)

    def start_early(self, checkpoint) -> bool:
        """Start reading before the plan exists: whole tensors of the checkpoint, in file order,
        into the staging slots (never into a target: nothing is written before the plan checks out).
        :meth:`run` then transforms the ones its plan uses and reads the rest; bytes the plan does
        not use are counted in ``Timings.early_unused_bytes``. Planning (10-20 ms for a 16 GB
        checkpoint) and this executor's setup then overlap the first reads instead of preceding
        them (on the H200 host the planning slowed while readers copied, and the A/B came out
        within noise: bench/NOTES.md, session 7). Taken for files in the page cache, read by native
        readers on a GPU (or on a CPU); cold files and io="mmap" wait for the plan. Returns whether
        reads began."""
        cfg = self.cfg
        if self._opened or not cfg.early_reads or cfg.io == "mmap" or not checkpoint.headers_read:
            return False
        total = checkpoint.total_bytes()
        if total <= 0:
            return False
        self._start_clock()
        order = {str(f): k for k, f in enumerate(checkpoint.files)}
        infos = sorted(checkpoint.tensors.values(), key=lambda t: (order.get(str(t.file), len(order)), t.start))
        self._open(list(order), max(1, min(cfg.num_slots, -(-total // cfg.slot_bytes))))
        cuda = self.device.type == "cuda"
        if self.files.direct or (cuda and self.native is None):
            return False  # the disk sets the pace of cold files; Python readers would contend with the planner for the GIL
        batches = early_batches(infos, cfg.slot_bytes, self.nslots)
        if not batches:
            return False
        step = cfg.pinned_buffer_bytes if cuda else cfg.read_chunk_bytes  # pieces small enough to balance the threads
        ranges = [(part.source, part.file_offset + off, min(step, part.nbytes - off),
                   k * cfg.slot_bytes + part.slot_offset + off)
                  for k, b in enumerate(batches) for part in b.parts for off in range(0, part.nbytes, step)]
        total_read = sum(r[2] for r in ranges)
        groups, cur, acc = [], [], 0
        for r in ranges:  # contiguous runs of about equal bytes, one a reader
            cur.append(r)
            acc += r[2]
            if acc * self.threads >= total_read * (len(groups) + 1):
                groups.append(cur)
                cur = []
        if cur:
            groups.append(cur)
        if cuda:
            entered = threading.Semaphore(0)
            futures = [self.pool.submit(self._read_early_native, g, entered) for g in groups]
            # Wait until every reader is inside the extension (GIL released): a reader still waiting
            # for the GIL while the caller plans in Python would wait a switch interval (5 ms) each.
            for _ in groups:
                entered.acquire()
        else:
            futures = [self.pool.submit(self._read_chunks, self.files, [(r[0].file, r[1], r[3], r[2]) for r in g],
                                        self.staging_all) for g in groups]
        self._early = (batches, futures)
        self.timings.early_bytes = total_read
        self._marks.append(("early_reads_queued", time.perf_counter()))
        return True

    def _read_early_native(self, ranges, entered: threading.Semaphore):
        try:
            reader, stream = self.native.get()
            e0 = torch.cuda.Event(enable_timing=True)
            e0.record(stream)
        finally:
            entered.release()
        t = time.perf_counter()
        self._read_ranges_native(self.files, reader, stream, ranges, self.staging_all.data_ptr(),
                                 "tensors before the plan")
        read_s = time.perf_counter() - t
        e1 = torch.cuda.Event(enable_timing=True, blocking=True)
        e1.record(stream)
        return e0, e1, read_s

    def run(self, plan: Plan) -> Timings:
        cfg = self.cfg
        self.plan = plan
        if self._opened:
            self._marks.append(("plan", time.perf_counter()))  # the caller planned meanwhile
        else:
            self._start_clock()
        try:
            early, early_reads = self._early if self._early is not None else ([], [])
            with gc_paused():  # a part a piece (45K for DeepSeek-R1): see checkpoint.gc_paused
                pieces = [p for _, group in plan.by_layer() for p in group]
                if early:
                    rest, self.timings.early_unused_bytes = _adopt_early_parts(pieces, early)
                    batches = early + split_into_batches(rest, cfg.slot_bytes)
                else:
                    batches = split_into_batches(pieces, cfg.slot_bytes)
            self._marks.append(("batches", time.perf_counter()))
            if not self._opened:
                self._open(list(dict.fromkeys(str(p.source.file) for p in pieces)),
                           max(1, min(cfg.num_slots, len(batches))))
            return self._run(batches, early, early_reads)
        finally:
            self.close()

    def _run(self, batches: List[_Batch], early: List[_Batch], early_reads: list) -> Timings:
        dev = self.device
        cuda = dev.type == "cuda"
        files, pool, native, pinned, registered = self.files, self.pool, self.native, self.pinned, self.registered
        nslots, staging, threads = self.nslots, self.staging, self.threads
        host = None if cuda else staging  # CPU: readers fill the slots the transforms read
        copy_stream = torch.cuda.Stream(dev) if cuda else None  # copies from registered mappings (io="mmap")
        compute = torch.cuda.current_stream(dev) if cuda else None
        done = [None] * nslots
        timing_events = []  # (transform start, end) on the compute stream
        copy_spans = []     # (start, end) events of every H2D copy, on whichever stream it ran
        used = [sum(part.nbytes for part in b.parts if part.piece is not None) for b in batches]
        bar = _progress(sum(used), self.progress)
        mapped_batch = [False] * len(batches)
        if registered is not None:
            for i, b in enumerate(batches):
                mapped_batch[i] = all(self._usable[str(part.source.file)] for part in b.parts)
            self.io_used = "mmap" if all(mapped_batch) else ("mixed" if any(mapped_batch) else "pread")
        else:
            self.io_used = "pread"
        logger.info("pyloader: load reads through %s%s", self.io_used,
                    f" ({self.timings.early_bytes} bytes before the plan)" if early else "")
        try:
            scales_started = self._start_scales(files, pool, threads, native)
            self._marks.append(("scales_queued", time.perf_counter()))
            last_batch_of_layer = {}
            for i, b in enumerate(batches):
                for layer in b.layers:
                    last_batch_of_layer[layer] = i
            pending = deque()
            if early:  # read before the plan: every group is waited for before the first batch
                pending.append(early_reads)
                pending.extend([] for _ in early[1:])

            def submit(j):
                slot = j % nslots
                if mapped_batch[j]:
                    pending.append([])  # copied straight from the registered mapping below
                    return
                chunks = self._chunks(batches[j].parts)
                if native is not None:  # a task a chunk: read it, wait for the slot, copy it
                    pending.append([pool.submit(self._read_and_copy_native, files, c, staging[slot], done[slot], native)
                                    for c in chunks])
                    return
                if cuda:
                    pending.append([pool.submit(self._read_and_copy, files, c, staging[slot], done[slot], pinned)
                                    for c in chunks])
                    return
                # CPU: the readers wait for the slot to be free, so this thread keeps going
                groups = [chunks[k::threads] for k in range(min(threads, len(chunks)))]
                pending.append([pool.submit(self._read_chunks, files, g, host[slot], done[slot]) for g in groups])

            for j in range(len(early), nslots):
                if j < len(batches):
                    submit(j)
            self._marks.append(("reads_queued", time.perf_counter()))
            first_reads = next((t for label, t in self._marks if label in ("early_reads_queued", "reads_queued")))
            self.timings.setup_s = first_reads - self._t_start
            self.timings.setup_parts = {label: round(t - self._marks[k][1], 6)
                                        for k, (label, t) in enumerate(self._marks[1:])}
            scales = self._finish_scales(scales_started)
            for i, batch in enumerate(batches):
                slot = i % nslots
                t = time.perf_counter()
                results = [f.result() for f in pending.popleft()]
                self.timings.wait_read_s += time.perf_counter() - t
                jobs = []
                if cuda and mapped_batch[i]:  # straight from the registered mapping, on the copy stream
                    with torch.cuda.stream(copy_stream):
                        e0 = torch.cuda.Event(enable_timing=True)
                        e1 = torch.cuda.Event(enable_timing=True)
                        if done[slot] is not None:
                            copy_stream.wait_event(done[slot])  # the slot's previous transform read it
                        e0.record()
                        for part in batch.parts:
                            registered.copy(staging[slot][part.slot_offset:part.slot_offset + part.nbytes],
                                            part.source.file, part.file_offset, part.nbytes)
                        e1.record()
                    compute.wait_event(e1)
                    copy_spans.append((e0, e1))
                elif cuda:
                    for e0, e1, read_s in results:
                        compute.wait_event(e1)
                        copy_spans.append((e0, e1))
                        self.timings.read_s += read_s
                else:
                    self.timings.read_s += sum(results)
                for part in batch.parts:
                    p = part.piece
                    if p is None:  # read before the plan, not used by it
                        continue
                    raw = staging[slot][part.slot_offset:part.slot_offset + part.nbytes]
                    src = _view_source(raw, p.source, part.rows if p.source.shape else 1)
                    spec = self.plan.targets[p.target]
                    jobs += piece_jobs(p, src, part.row0, self.tensors[p.target], scales, spec.experts)
                t0 = torch.cuda.Event(enable_timing=True) if cuda else None
                if cuda:
                    t0.record()
                run_jobs([j for j in jobs if j.src.numel()], self.backend)
                if cuda:
                    t1 = torch.cuda.Event(enable_timing=True, blocking=True)  # readers sleep on it
                    t1.record()
                    done[slot] = t1
                    timing_events.append((t0, t1))
                for layer in batch.layers:
                    if last_batch_of_layer[layer] == i and self.hooks is not None:
                        self.hooks(layer)
                self.bytes_read += used[i]
                if bar is not None:
                    bar.update(used[i])
                if i + nslots < len(batches):
                    submit(i + nslots)
            t_drain = time.perf_counter()
            if cuda:
                torch.cuda.synchronize(dev)
                self.timings.drain_s = time.perf_counter() - t_drain
                for t0, t1 in timing_events:
                    self.timings.transform_s += t0.elapsed_time(t1) / 1e3
                if copy_spans:  # device time with at least one copy running
                    ref = copy_spans[0][0]
                    self.timings.h2d_s = _busy_seconds([(ref.elapsed_time(a) / 1e3, ref.elapsed_time(b) / 1e3)
                                                        for a, b in copy_spans])
        finally:
            if bar is not None:
                bar.close()
        self.timings.wall_s = time.perf_counter() - self._t_start
        return self.timings

    def close(self) -> None:
        """Wait for every read in flight and release the readers, descriptors and mappings (run
        does this itself; call it when a load stops before run, e.g. its plan did not check out)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        if self.native is not None:
            self.native.close()  # no copy may still read a pinned buffer when torch reuses it
            self.native = None
        if self.files is not None:
            self.files.close()
        if self.registered is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.registered.close()
            self.registered = None
        self._early = None


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="pyloader load", leave=False)
