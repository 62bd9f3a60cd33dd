"""``pyloader convert SRC DST``: an FP8 checkpoint directory → a BF16 (or FP16/FP32) one that any
tool loads.

- Every shard is read with pyloader's validated reader; each quantized weight is paired with its
  scale wherever it is (``weight_scale_inv``, ``weight_scale`` or ``.scale`` names, any file).
  All pairing and format checks run before anything is written.
- Output headers are known before any data (every shape and dtype is), so data is written at
  computed offsets, tensor by tensor, in row chunks: resident memory stays at a few chunks
  whatever the model size. Reads, transforms (GPU with the CUDA/Triton backend, or the CPU torch
  reference) and writes overlap on a small thread pool, across file boundaries. On tmpfs each
  output file is allocated ahead of the writes, in steps on its own thread (a full disk is an
  error, never a SIGBUS), and chunks are copied into mapped windows of it, so the workers write
  one file side by side (write(2) to one file is serialized by its inode lock); on disks write(2)
  measured faster and is used.
- Atomic and resumable: each file is written as ``NAME.tmp``, fsynced, re-validated and renamed;
  ``--resume`` keeps finished files whose headers and sizes check out. The index (new weight map,
  correct ``total_size``, other metadata kept) and ``config.json`` (no ``quantization_config``,
  the new ``torch_dtype``) are written last; every other file of SRC is copied unchanged.
- A census of NaN/Inf per output tensor is reported (not fatal).
- ``torchrun --nproc-per-node N -m pyloader convert …``: output files are split across ranks;
  rank 0 writes the index and config after a barrier.
"""

import contextlib
import errno
import json
import logging
import math
import mmap
import os
import shutil
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from .backend import resolve_backend
from .checkpoint import (DTYPES, INDEX_NAME, CheckpointError, TensorInfo, open_checkpoint, read_safetensors_header,
                         write_safetensors_header)
from .errors import PyloaderInputError
from .transform import TransformJob, run_jobs

logger = logging.getLogger("pyloader")

OUT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_SAFETENSORS_NAME = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
FP8 = ("F8_E4M3", "F8_E5M2")
CHUNK_BYTES = 128 << 20  # output bytes a chunk: a tensor larger than this is converted in row chunks
FILES_AHEAD = 1  # files whose chunks are queued while an earlier file finishes


@dataclass
class OutTensor:
    name: str
    source: TensorInfo
    dtype: str                                  # safetensors dtype of the output
    scale: Optional[TensorInfo] = None
    block: Tuple[int, int] = (128, 128)
    grid: Tuple[int, int] = (1, 1)                # the scale viewed as a 2-D block grid

    @property
    def shape(self):
        return self.source.shape

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][0] // 8


@dataclass
class OutFile:
    name: str
    tensors: List[OutTensor]
    header: bytes = b""
    offsets: Dict[str, Tuple[int, int]] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.header) + sum(t.nbytes for t in self.tensors)


@dataclass
class ConvertReport:
    files_written: List[str] = field(default_factory=list)
    files_resumed: List[str] = field(default_factory=list)
    dequantized: int = 0
    copied: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    nonfinite: Dict[str, Tuple[int, int]] = field(default_factory=dict)  # tensor → (NaN count, Inf count)
    device: str = ""
    backend: str = ""
    read_s: float = 0.0       # summed over workers: reading input chunks
    transform_s: float = 0.0  # summed over workers: to the device, transform, census, back to pinned host memory
    write_s: float = 0.0      # summed over workers: writing output chunks


def _scale_for(weight: str, names) -> Optional[str]:
    base = weight[: -len("weight")] if weight.endswith("weight") else weight + "."
    for cand in (weight + "_scale_inv", weight + "_scale", base + "scale", weight + ".scale", base + "scale_inv"):
        if cand in names:
            return cand
    return None


def _infer_block(shape, scale_shape, preferred: Tuple[int, int], who: str, file) -> Tuple[int, int]:
    """The block shape whose ceil-grid is the scale's shape (the config's block first)."""
    rows = shape[0] if len(shape) >= 1 else 1
    cols = math.prod(shape[1:]) if len(shape) >= 2 else (shape[0] if shape else 1)
    if len(shape) == 1:
        rows, cols = 1, shape[0]
    if math.prod(scale_shape) == 1:
        return max(1, rows), max(1, cols)
    s = tuple(scale_shape)
    if len(s) == 1:
        s = (s[0], 1) if s[0] == rows and rows != 1 else (1, s[0])
    if len(s) != 2:
        raise CheckpointError(file, f"scale of shape {list(scale_shape)} is not a 2-D block grid for weight {list(shape)}", who)
    for bm in dict.fromkeys((preferred[0], 128, 1, 32, 64, 256, rows)):
        for bn in dict.fromkeys((preferred[1], 128, 32, 1, 64, 256, cols)):
            if bm > 0 and bn > 0 and -(-rows // bm) == s[0] and -(-cols // bn) == s[1]:
                return bm, bn
    raise CheckpointError(file, f"scale shape {list(scale_shape)} matches no block shape for weight {list(shape)} "
                                "(blockwise FP8 with 128x128, per-tensor, per-channel or 1x32 scales is supported)", who)


def plan_conversion(ck, config: dict, out_dtype: torch.dtype, max_shard_size: Optional[int]) -> List[OutFile]:
    q = config.get("quantization_config") or {}
    method = q.get("quant_method")
    if method not in (None, "fp8"):
        raise PyloaderInputError(f"quantization_config.quant_method {method!r} is not blockwise FP8: "
                                 "only FP8 weights with block scales are converted")
    preferred = tuple(q.get("weight_block_size") or (128, 128))
    names = set(ck.tensors)
    scales_used = {}
    out: List[OutTensor] = []
    for name, info in ck.tensors.items():
        if info.dtype in FP8:
            s = _scale_for(name, names)
            if s is None:
                raise CheckpointError(info.file, f"{info.dtype} weight has no scale tensor ({name}_scale_inv, "
                                                 f"{name}_scale or .scale): not a blockwise FP8 weight", name)
            sinfo = ck.tensors[s]
            if sinfo.dtype not in ("F32", "BF16", "F16", "F8_E8M0", "U8"):
                raise CheckpointError(sinfo.file, f"scale dtype {sinfo.dtype} is not a supported scale format", s)
            if not info.shape or len(info.shape) > 2:
                raise CheckpointError(info.file, f"{info.dtype} tensor of shape {list(info.shape)}: only 1-D and 2-D "
                                                 "blockwise weights are converted", name)
            block = _infer_block(info.shape, sinfo.shape, preferred, name, info.file)
            rows = info.shape[0] if len(info.shape) == 2 else 1
            cols = info.shape[-1]
            grid = (-(-rows // block[0]), -(-cols // block[1]))
            scales_used[s] = name
            out.append(OutTensor(name, info, _SAFETENSORS_NAME[out_dtype], sinfo, block, grid))
    for name, info in ck.tensors.items():
        if info.dtype in FP8 or name in scales_used:
            continue
        if info.dtype == "F8_E8M0":
            raise CheckpointError(info.file, "an E8M0 tensor that scales no FP8 weight", name)
        out.append(OutTensor(name, info, info.dtype))  # copied byte for byte
    by_name = {t.name: t for t in out}
    files: List[OutFile] = []
    if max_shard_size is None:  # keep the source's file layout
        groups: Dict[str, List[OutTensor]] = {}
        for name, info in ck.tensors.items():
            if name in by_name:
                groups.setdefault(info.file.name, []).append(by_name[name])
        files = [OutFile(f, sorted(ts, key=lambda t: t.source.start)) for f, ts in sorted(groups.items())]
    else:
        ordered = sorted(out, key=lambda t: (str(t.source.file), t.source.start))
        cur: List[OutTensor] = []
        size = 0
        for t in ordered:
            if cur and size + t.nbytes > max_shard_size:
                files.append(OutFile("", cur))
                cur, size = [], 0
            cur.append(t)
            size += t.nbytes
        if cur:
            files.append(OutFile("", cur))
        for i, f in enumerate(files):
            f.name = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
    for f in files:
        f.header, f.offsets = write_safetensors_header([(t.name, t.dtype, t.shape) for t in f.tensors], {"format": "pt"})
    return files


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise PyloaderInputError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N") from None


def _check_paths(src: Path, dst: Path):
    if not src.is_dir():
        raise PyloaderInputError(f"{src}: SRC must be a checkpoint directory")
    s, d = src.resolve(), dst.resolve()
    if d == s or s in d.parents:
        raise PyloaderInputError(f"{dst}: DST must not be SRC or inside it (SRC is never modified)")
    if d in s.parents:
        raise PyloaderInputError(f"{dst}: SRC inside DST is refused (copying other files would recurse)")


def _file_complete(path: Path, f: OutFile) -> bool:
    if not path.is_file() or path.stat().st_size != f.size:
        return False
    try:
        h = read_safetensors_header(path)
    except CheckpointError:
        return False
    return all(n in h.tensors and h.tensors[n].shape == tuple(t.shape) and h.tensors[n].dtype == t.dtype
               for t in f.tensors for n in [t.name]) and len(h.tensors) == len(f.tensors)


def _filesystem(path: Path) -> str:
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


def _writes_for(dst: Path, writes: str) -> str:
    """auto: mapped windows on memory filesystems, where one file's write(2) lock is the limit
    (2.10 vs 1.63 GB/s on tmpfs); write(2) on disks, where it was faster (0.90 vs 0.76 GB/s,
    bench/NOTES.md)."""
    if writes != "auto":
        return writes
    return "mmap" if _filesystem(dst) in ("tmpfs", "ramfs", "hugetlbfs") else "pwrite"


class _Reservation:
    """Allocates an output file ahead of mapped writes, in steps, on its own thread: a mapped
    write that finds the disk full would kill the process (SIGBUS) instead of raising, so no chunk
    is written before its bytes are allocated. Steps let the first chunks go while the rest is
    allocated (tmpfs allocates a page at a time: 4 GB took longer than converting 1 GB)."""

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


class _Converter:
    def __init__(self, device: torch.device, backend: Optional[str], out_dtype: torch.dtype, workers: int, bar,
                 writes: str):
        if writes not in ("mmap", "pwrite"):
            raise PyloaderInputError(f"writes must be 'auto', 'mmap' or 'pwrite', not {writes!r}")
        self.device, self.out_dtype, self.bar = device, out_dtype, bar
        self.writes = writes
        self.backend = resolve_backend(backend, device, "convert")
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="pyloader-convert")
        self.inflight = threading.Semaphore(max(2, workers))  # bounds resident chunks
        self.scales: Dict[str, torch.Tensor] = {}
        self.lock = threading.RLock()  # scale() reads (and opens files) while holding it
        self.fds: Dict[str, int] = {}
        self.local = threading.local()  # a CUDA stream a worker thread: copies of workers overlap
        self.report = ConvertReport(device=str(device), backend=self.backend)

    def _fd(self, path) -> int:
        key = str(path)
        with self.lock:
            if key not in self.fds:
                self.fds[key] = os.open(key, os.O_RDONLY)
            return self.fds[key]

    def close(self):
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def _pinned(self, nbytes: int) -> torch.Tensor:
        # torch's caching host allocator: pinned blocks are reused chunk after chunk
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.device.type == "cuda")

    def read(self, info: TensorInfo, start: int, nbytes: int) -> torch.Tensor:
        buf = self._pinned(nbytes)
        fd = self._fd(info.file)
        mv = memoryview(buf.numpy()).cast("B")
        pos = 0
        while pos < nbytes:
            n = os.preadv(fd, [mv[pos:]], start + pos)
            if n <= 0:
                raise CheckpointError(info.file, f"file ended at byte {start + pos} (truncated?)", info.name)
            pos += n
        return buf

    def stream(self):
        if self.device.type != "cuda":
            return None
        if getattr(self.local, "stream", None) is None:
            self.local.stream = torch.cuda.Stream(self.device)
        return self.local.stream

    def scale(self, info: TensorInfo) -> torch.Tensor:
        with self.lock:
            if info.name not in self.scales:
                raw = self.read(info, info.start, info.nbytes)
                self.scales[info.name] = raw.view(info.torch_dtype).view(info.shape).to(self.device)
            return self.scales[info.name]

    @staticmethod
    def _write(fd: int, file_offset: int, data: torch.Tensor, mapped: bool) -> None:
        """Write ``data`` (uint8, host) at ``file_offset``. Mapped: through a window of the file
        mapped for this chunk alone (its pages leave this process's resident set when it is
        unmapped). Writes to one file through write(2) hold the file's inode lock, so the workers'
        writes to a file run one at a time; copies into a mapping run side by side."""
        src = data.numpy()
        if not mapped:
            mv = memoryview(src).cast("B")
            pos = 0
            while pos < len(mv):
                pos += os.pwrite(fd, mv[pos:], file_offset + pos)
            return
        if src.size == 0:
            return
        start = file_offset - file_offset % mmap.ALLOCATIONGRANULARITY
        lead = file_offset - start
        # faulted in page by page as the copy goes: MAP_POPULATE (one call a window) measured 1.41
        # vs 4.63 GB/s on tmpfs (bench/NOTES.md)
        window = mmap.mmap(fd, lead + src.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                           offset=start)
        try:
            dst = np.frombuffer(window, dtype=np.uint8, count=src.size, offset=lead)
            dst[:] = src  # numpy releases the GIL for the copy
            del dst
        finally:
            window.close()

    def chunk(self, fd: int, t: OutTensor, file_offset: int, r0: int, rows: int, mapped: bool = False):
        """Convert rows r0..r0+rows of tensor t and write them at their offset."""
        try:
            info = t.source
            shape = info.shape
            cols = math.prod(shape[1:]) if len(shape) >= 2 else (shape[0] if shape else 1)
            nrows = shape[0] if len(shape) >= 2 else 1
            in_row = info.nbytes // max(1, nrows)
            t_read = time.perf_counter()
            raw = self.read(info, info.start + r0 * in_row, rows * in_row)
            t_transform = time.perf_counter()
            if t.scale is None:
                out_bytes = raw
                if info.dtype in ("BF16", "F16", "F32") and raw.numel():
                    self._census(t.name, raw.view(info.torch_dtype))
            else:
                grid = self.scale(t.scale).reshape(t.grid)
                stream = self.stream()
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    w = raw.view(info.torch_dtype).view(rows, cols).to(self.device, non_blocking=True)
                    out = torch.empty(rows, cols, dtype=self.out_dtype, device=self.device)
                    bm, bn = t.block
                    run_jobs([TransformJob(w, out, grid[r0 // bm:], (bm, bn), (r0 % bm, 0))], self.backend)
                    self._census(t.name, out)
                    if stream is not None:
                        out_bytes = self._pinned(out.numel() * out.element_size())
                        out_bytes.copy_(out.view(-1).view(torch.uint8), non_blocking=True)
                        stream.synchronize()
                    else:
                        out_bytes = out.view(-1).view(torch.uint8)
            t_write = time.perf_counter()
            self._write(fd, file_offset, out_bytes, mapped)
            t_end = time.perf_counter()
            with self.lock:
                self.report.read_s += t_transform - t_read
                self.report.transform_s += t_write - t_transform
                self.report.write_s += t_end - t_write
            if self.bar is not None:
                self.bar.update(rows * in_row)
        finally:
            self.inflight.release()

    def _census(self, name: str, x: torch.Tensor):
        counts = torch.stack([torch.isnan(x).sum(), torch.isinf(x).sum()]).tolist()  # one sync, not two
        nan, inf = int(counts[0]), int(counts[1])
        if nan or inf:
            with self.lock:
                a, b = self.report.nonfinite.get(name, (0, 0))
                self.report.nonfinite[name] = (a + nan, b + inf)

    def open_file(self, path: Path, f: OutFile) -> "_OpenFile":
        """Create ``NAME.tmp`` with its header; mapped writes start allocating it (see _Reservation)."""
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)  # RDWR: a shared mapping needs it
        h = _OpenFile(path, tmp, f, fd)
        try:
            os.ftruncate(fd, f.size)
            os.pwrite(fd, f.header, 0)
            if self.writes == "mmap":
                free = _free_bytes(tmp)
                if free is not None and free < f.size:
                    raise PyloaderInputError(f"{tmp}: cannot allocate {f.size} bytes for the output: "
                                             f"{free} bytes free on its filesystem")
                h.reservation = _Reservation(fd, f.size, tmp)
        except BaseException:
            h.abort()
            raise
        return h

    def start_file(self, h: "_OpenFile") -> None:
        """Queue every chunk of an opened file (blocking while too many chunks are resident, and,
        mapped, until the chunk's bytes are allocated)."""
        f, fd = h.f, h.fd
        try:
            mapped = h.reservation is not None and h.reservation.supported()
            for t in f.tensors:
                begin, _ = f.offsets[t.name]
                base = len(f.header) + begin
                shape = t.shape
                nrows = shape[0] if len(shape) >= 2 else 1
                out_row = t.nbytes // max(1, nrows)
                step = max(1, CHUNK_BYTES // max(1, out_row))  # any row split is exact: (r0 % bm) offsets the grid
                for r0 in range(0, max(nrows, 1), step):
                    rows = min(step, nrows - r0) if nrows else 0
                    if mapped:
                        h.reservation.wait(base + (r0 + rows) * out_row)
                    self.inflight.acquire()
                    h.futures.append(self.pool.submit(self.chunk, fd, t, base + r0 * out_row, r0, rows, mapped))
                if t.scale is not None:
                    self.report.dequantized += 1
                else:
                    self.report.copied += 1
        except BaseException:
            h.abort()
            raise

    def finish_file(self, h: "_OpenFile") -> None:
        """Wait for the file's chunks, fsync, re-validate and rename it into place."""
        try:
            for fut in h.futures:
                fut.result()
            if h.reservation is not None:
                h.reservation.join()
            os.fsync(h.fd)
        except BaseException:
            h.abort()
            raise
        os.close(h.fd)
        h.fd = -1
        if not _file_complete(h.tmp, h.f):
            h.tmp.unlink(missing_ok=True)
            raise PyloaderInputError(f"{h.tmp}: the written file does not validate (disk full or changed underneath?)")
        os.replace(h.tmp, h.path)

    def write_files(self, items: List[Tuple[Path, OutFile]], done: Callable[[str], None]) -> None:
        """Every file through one pipeline: the next file's chunks are queued while the previous
        one finishes, so the workers never drain at a file boundary (FILES_AHEAD files open)."""
        open_files: deque = deque()
        upcoming: Optional[_OpenFile] = None  # the next file, opened (and allocating) before it starts
        try:
            for i, (path, f) in enumerate(items):
                h, upcoming = upcoming or self.open_file(path, f), None
                open_files.append(h)  # before the next open, which may fail: an error must abort h too
                if i + 1 < len(items):
                    upcoming = self.open_file(*items[i + 1])
                self.start_file(h)
                while len(open_files) > FILES_AHEAD:
                    h = open_files.popleft()
                    self.finish_file(h)
                    done(h.f.name)
            while open_files:
                h = open_files.popleft()
                self.finish_file(h)
                done(h.f.name)
        except BaseException:
            for h in list(open_files) + ([upcoming] if upcoming is not None else []):
                h.abort()
            raise


def _free_bytes(path: Path) -> Optional[int]:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


@dataclass
class _OpenFile:
    path: Path
    tmp: Path
    f: OutFile
    fd: int
    futures: list = field(default_factory=list)
    reservation: Optional[_Reservation] = None

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


def convert(src, dst, device: str = "auto", out_dtype: str = "bfloat16", resume: bool = False,
            max_shard_size: Optional[int] = None, workers: int = 8, backend: Optional[str] = None,
            progress: bool = True, rank: int = 0, world_size: int = 1, writes: str = "auto") -> ConvertReport:
    """Convert the FP8 checkpoint directory ``src`` into ``dst`` (see the module docstring).
    ``writes``: ``"mmap"`` (output preallocated, chunks copied into mapped windows side by side),
    ``"pwrite"`` (write(2), which one file's inode lock serializes) or ``"auto"`` (mmap on tmpfs,
    write(2) elsewhere)."""
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    _check_paths(src, dst)
    if out_dtype not in OUT_DTYPES:
        raise PyloaderInputError(f"--out-dtype {out_dtype!r}: expected one of {', '.join(OUT_DTYPES)}")
    odt = OUT_DTYPES[out_dtype]
    ck = open_checkpoint(src)
    config_path = src / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    files = plan_conversion(ck, config, odt, max_shard_size)
    if dst.exists() and any(dst.iterdir()) and not resume and rank == 0:
        raise PyloaderInputError(f"{dst}: DST exists and is not empty; pass --resume to continue an interrupted run")
    dst.mkdir(parents=True, exist_ok=True)
    dev = _resolve_device(device)
    mine = [f for i, f in enumerate(files) if i % world_size == rank]
    todo, done = [], []
    for f in mine:
        (done if resume and _file_complete(dst / f.name, f) else todo).append(f)
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(t.source.nbytes for f in todo for t in f.tensors), unit="B", unit_scale=True,
                       unit_divisor=1024, desc=f"pyloader convert{f' rank {rank}' if world_size > 1 else ''}")
        except ImportError:
            pass
    conv = _Converter(dev, backend, odt, workers, bar, _writes_for(dst, writes))
    logger.info("pyloader convert: %s writes into %s", conv.writes, dst)
    try:
        conv.write_files([(dst / f.name, f) for f in todo], conv.report.files_written.append)
    finally:
        conv.pool.shutdown(wait=True)
        conv.close()
        if bar is not None:
            bar.close()
    report = conv.report
    report.files_resumed = [f.name for f in done]
    report.bytes_in = sum(t.source.nbytes + (t.scale.nbytes if t.scale else 0) for f in todo for t in f.tensors)
    report.bytes_out = sum(f.size for f in todo)
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()
    if rank == 0:
        _write_index_config_and_copy(src, dst, ck, config, files, out_dtype)
    report.seconds = time.perf_counter() - t0
    return report


def _write_index_config_and_copy(src: Path, dst: Path, ck, config: dict, files: List[OutFile], out_dtype: str):
    weight_map = {t.name: f.name for f in files for t in f.tensors}
    total = sum(t.nbytes for f in files for t in f.tensors)
    meta = dict(ck.index_metadata or {})
    meta["total_size"] = total
    tmp = dst / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps({"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    os.replace(tmp, dst / INDEX_NAME)
    skip = {p.name for p in ck.files} | {INDEX_NAME, "config.json"}
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if path.is_dir() or (len(rel.parts) == 1 and (rel.name in skip or rel.suffix == ".safetensors")):
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    if config:
        c = dict(config)
        c.pop("quantization_config", None)
        if "dtype" in c:
            c["dtype"] = out_dtype
        c["torch_dtype"] = out_dtype
        tmpc = dst / "config.json.tmp"
        tmpc.write_text(json.dumps(c, indent=2) + "\n")
        os.replace(tmpc, dst / "config.json")


def parse_size(text: str) -> int:
    t = text.strip().upper()
    for suffix, mult in (("TB", 10 ** 12), ("GB", 10 ** 9), ("MB", 10 ** 6), ("KB", 10 ** 3), ("B", 1)):
        if t.endswith(suffix):
            try:
                return int(float(t[: -len(suffix)]) * mult)
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise PyloaderInputError(f"--max-shard-size {text!r}: expected a size like 5GB, 500MB or a byte count") from None
