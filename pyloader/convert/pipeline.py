"""The conversion pipeline: read chunks, transform them on the device, write them, overlapping across file boundaries."""

import contextlib
import math
import mmap
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..backend import resolve_backend
from ..errors import PyloaderInputError
from ..format.safetensors import CheckpointError, TensorInfo
from ..ops.jobs import TransformJob, run_jobs
from ..gate import Gate, merge_maxima
from .outputs import OpenFile, Reservation, file_complete, free_bytes
from .planning import OutFile, OutTensor


CHUNK_BYTES = 128 << 20  # output bytes a chunk: a tensor larger than this is converted in row chunks


FILES_AHEAD = 1  # files whose chunks are queued while an earlier file finishes
FILES_FINISHING = 2  # files whose fsync, check and rename may still run behind the queueing


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
    # dequantized tensor → (max |value|, max |decoded code|): the sanity gate's evidence
    maxima: Dict[str, Tuple[float, float]] = field(default_factory=dict)
    gate_warnings: List[str] = field(default_factory=list)  # gate="warn": what would have stopped it
    nonexact_blocks: int = 0  # --to fp8-block from FP4: 128x128 blocks the transcode had to round
    device: str = ""
    backend: str = ""
    read_s: float = 0.0       # summed over workers: reading input chunks
    transform_s: float = 0.0  # summed over workers: to the device, transform, census, back to pinned host memory
    write_s: float = 0.0      # summed over workers: writing output chunks
    peak_rss: Optional[int] = None  # bytes: the process's resident peak during the conversion


class Converter:
    def __init__(self, device: torch.device, backend: Optional[str], out_dtype: torch.dtype, workers: int, bar,
                 writes: str, gate: Optional[Gate] = None):
        if writes not in ("mmap", "pwrite"):
            raise PyloaderInputError(f"writes must be 'auto', 'mmap' or 'pwrite', not {writes!r}")
        self.device, self.out_dtype, self.bar = device, out_dtype, bar
        self.gate = gate or Gate()
        self.ue8m0 = False  # --to fp8-block: power-of-two scales
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
        # faulted in page by page as the copy goes, not with MAP_POPULATE (docs/decisions.md#convert-writes)
        window = mmap.mmap(fd, lead + src.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                           offset=start)
        try:
            dst = np.frombuffer(window, dtype=np.uint8, count=src.size, offset=lead)
            dst[:] = src  # numpy releases the GIL for the copy
            del dst
        finally:
            window.close()

    def chunk(self, fd: int, t: OutTensor, file_offset: int, r0: int, rows: int, mapped: bool = False,
              scale_offset: int = -1):
        """Convert rows r0..r0+rows of tensor t and write them at their offset (a requantized
        tensor: its block scales for those rows too, at ``scale_offset``)."""
        try:
            if t.nbytes == 0:
                return
            info = t.source
            nrows = t.rows
            cols = t.cols
            in_row = info.nbytes // max(1, nrows)
            t_read = time.perf_counter()
            raw = self.read(info, info.start + r0 * in_row, rows * in_row)
            t_transform = time.perf_counter()
            if t.requant:
                out_bytes, scale_bytes = self._requant(t, raw, r0, rows, in_row)
                self._write(fd, scale_offset + (r0 // t.row_group) * t.scale_out.cols * 4, scale_bytes, mapped)
            elif t.quant is None:
                out_bytes = raw
                if info.dtype in ("BF16", "F16", "F32") and raw.numel():
                    self._census(t.name, raw.view(info.torch_dtype))
            else:
                q = t.quant
                grid = self.scale(q.scale).reshape(t.grid)
                g = self.scale(q.global_scale).reshape(1) if q.global_scale is not None else None
                stream = self.stream()
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    if q.packing is not None:  # packed codes travel as their bytes
                        w = raw.view(rows, in_row).to(self.device, non_blocking=True)
                    else:
                        w = raw.view(info.torch_dtype).view(rows, cols).to(self.device, non_blocking=True)
                    out = torch.empty(rows, cols, dtype=self.out_dtype, device=self.device)
                    slot = torch.zeros(2, device=self.device) if self.gate.on else None
                    bm, bn = q.block
                    run_jobs([TransformJob(w, out, grid[r0 // bm:], (bm, bn), (r0 % bm, 0), q.packing, g,
                                           q.global_mode, slot)], self.backend)
                    self._census(t.name, out)
                    if q.transpose:  # whole planes (row_group): each written as its transpose
                        n = q.shape[-2]
                        out = out.view(rows // n, n, cols).transpose(1, 2).contiguous()
                    if stream is not None:
                        out_bytes = self._pinned(out.numel() * out.element_size())
                        out_bytes.copy_(out.view(-1).view(torch.uint8), non_blocking=True)
                        stream.synchronize()
                    else:
                        out_bytes = out.view(-1).view(torch.uint8)
                    if slot is not None:
                        seen = slot.tolist()
                        with self.lock:
                            self.report.maxima[t.name] = merge_maxima(self.report.maxima.get(t.name), seen)
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

    def _values(self, t: OutTensor, raw: torch.Tensor, r0: int, rows: int, in_row: int, scale: bool = True):
        """Rows r0.. of t's values as float32 on the device (dequantized; ``scale=False``: the
        packed codes' values alone)."""
        info, q = t.source, t.quant
        if q is None:
            return raw.view(info.torch_dtype).view(rows, t.cols).to(self.device, non_blocking=True).float()
        w = raw.view(rows, in_row) if q.packing is not None else raw.view(info.torch_dtype).view(rows, t.cols)
        w = w.to(self.device, non_blocking=True)
        out = torch.empty(rows, t.cols, dtype=torch.float32, device=self.device)
        if not scale:
            run_jobs([TransformJob(w, out, packing=q.packing)], self.backend)
            return out
        grid = self.scale(q.scale).reshape(t.grid)
        g = self.scale(q.global_scale).reshape(1) if q.global_scale is not None else None
        bm, bn = q.block
        run_jobs([TransformJob(w, out, grid[r0 // bm:], (bm, bn), (r0 % bm, 0), q.packing, g, q.global_mode)],
                 self.backend)
        return out

    def _requant(self, t: OutTensor, raw: torch.Tensor, r0: int, rows: int, in_row: int):
        """(e4m3 bytes, float32 block-scale bytes) of rows r0.. (whole 128-row blocks) of t."""
        from ..ops.quantize import quantize_blockwise, transcode_fp4_e8m0_to_fp8_block

        q = t.quant
        stream = self.stream()
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            if q is not None and q.scheme in ("fp4-e8m0", "mxfp4"):  # the lossless transcode
                codes = self._values(t, raw, r0, rows, in_row, scale=False)
                exps = self.scale(q.scale).reshape(t.grid)[r0:r0 + rows].to(self.device)
                w8, s, nonexact = transcode_fp4_e8m0_to_fp8_block(codes, exps)
                with self.lock:
                    self.report.nonexact_blocks += nonexact
            else:
                x = self._values(t, raw, r0, rows, in_row)
                w8, s = quantize_blockwise(x, (128, 128), backend=self.backend,
                                           scale_fmt="ue8m0" if self.ue8m0 else "float")
            pair = []
            for tensor in (w8.view(torch.uint8).reshape(-1), s.reshape(-1).view(torch.uint8)):
                if stream is not None:
                    host = self._pinned(tensor.numel())
                    host.copy_(tensor, non_blocking=True)
                    pair.append(host)
                else:
                    pair.append(tensor.contiguous())
            if stream is not None:
                stream.synchronize()
        return pair[0], pair[1]

    def _census(self, name: str, x: torch.Tensor):
        # One reduction: a NaN or an infinity makes the sum non-finite (so may an overflowing sum of
        # finite values, and then the exact counts below find nothing); isfinite over a whole bf16
        # tensor is slow on CPUs (docs/decisions.md#convert-cpu).
        if x.numel() == 0 or bool(torch.isfinite(x.sum())):
            return
        counts = torch.stack([torch.isnan(x).sum(), torch.isinf(x).sum()]).tolist()  # one sync, not two
        nan, inf = int(counts[0]), int(counts[1])
        if nan or inf:
            with self.lock:
                a, b = self.report.nonfinite.get(name, (0, 0))
                self.report.nonfinite[name] = (a + nan, b + inf)

    def open_file(self, path: Path, f: OutFile) -> "OpenFile":
        """Create ``NAME.tmp`` with its header; mapped writes start allocating it (see Reservation)."""
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)  # RDWR: a shared mapping needs it
        h = OpenFile(path, tmp, f, fd)
        try:
            os.ftruncate(fd, f.size)
            os.pwrite(fd, f.header, 0)
            if self.writes == "mmap":
                free = free_bytes(tmp)
                if free is not None and free < f.size:
                    raise PyloaderInputError(f"{tmp}: cannot allocate {f.size} bytes for the output: "
                                             f"{free} bytes free on its filesystem")
                h.reservation = Reservation(fd, f.size, tmp)
        except BaseException:
            h.abort()
            raise
        return h

    def start_file(self, h: "OpenFile") -> None:
        """Queue every chunk of an opened file (blocking while too many chunks are resident, and,
        mapped, until the chunk's bytes are allocated)."""
        f, fd = h.f, h.fd
        try:
            mapped = h.reservation is not None and h.reservation.supported()
            for t in f.tensors:
                if t.scale_of is not None:
                    continue  # written by its weight's chunks
                begin, _ = f.offsets[t.name]
                base = len(f.header) + begin
                scale_base = len(f.header) + f.offsets[t.scale_out.name][0] if t.scale_out is not None else -1
                nrows = t.rows
                if t.nbytes == 0:  # nothing to write: its rows, however many, are never walked
                    nrows = 0
                out_row = t.nbytes // max(1, nrows)
                group = t.row_group
                step = max(1, CHUNK_BYTES // max(1, out_row))  # any row split is exact: (r0 % bm) offsets the grid
                step = max(group, step // group * group)
                for r0 in range(0, max(nrows, 1), step):
                    rows = min(step, nrows - r0) if nrows else 0
                    if mapped:
                        end = base + (r0 + rows) * out_row
                        if t.scale_out is not None:  # its scales lie after it in the file
                            end = max(end, scale_base + -(-(r0 + rows) // group) * t.scale_out.cols * 4)
                        h.reservation.wait(end)
                    self.inflight.acquire()
                    extra = {"scale_offset": scale_base} if t.scale_out is not None else {}
                    h.futures.append(self.pool.submit(self.chunk, fd, t, base + r0 * out_row, r0, rows, mapped, **extra))
                if t.quant is not None or t.requant:
                    self.report.dequantized += 1
                else:
                    self.report.copied += 1
        except BaseException:
            h.abort()
            raise

    def finish_file(self, h: "OpenFile") -> None:
        """Wait for the file's chunks, fsync, re-validate and rename it into place."""
        try:
            for fut in h.futures:
                fut.result()
            for t in h.f.tensors:  # before the file can look complete: a tensor the gate stops leaves no file
                if t.quant is not None and t.name in self.report.maxima:
                    warning = self.gate.check(t.name, t.source, self.report.maxima[t.name])
                    if warning:
                        with self.lock:
                            self.report.gate_warnings.append(warning)
            if h.reservation is not None:
                h.reservation.join()
            os.fsync(h.fd)
        except BaseException:
            h.abort()
            raise
        os.close(h.fd)
        h.fd = -1
        if not file_complete(h.tmp, h.f):
            h.tmp.unlink(missing_ok=True)
            raise PyloaderInputError(f"{h.tmp}: the written file does not validate (disk full or changed underneath?)")
        os.replace(h.tmp, h.path)

    def write_files(self, items: List[Tuple[Path, OutFile]], done: Callable[[str], None]) -> None:
        """Every file through one pipeline: the next file's chunks are queued while the previous
        one finishes, so the workers never drain at a file boundary (FILES_AHEAD files open), and a
        file's finish (its last chunks, fsync, check, rename) runs on a thread of its own, so the
        fsync overlaps the next file's conversion instead of holding up its queue."""
        open_files: deque = deque()
        finishing: deque = deque()  # (file, future) in file order, at most FILES_FINISHING
        upcoming: Optional[OpenFile] = None  # the next file, opened (and allocating) before it starts
        finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pyloader-finish")

        failed: List[bool] = []

        def finish(h: OpenFile) -> None:
            if failed:  # an earlier file failed: no later one is renamed into place
                h.abort()
                return
            try:
                self.finish_file(h)
            except BaseException:
                failed.append(True)
                raise
            done(h.f.name)

        try:
            for i, (path, f) in enumerate(items):
                h, upcoming = upcoming or self.open_file(path, f), None
                open_files.append(h)  # before the next open, which may fail: an error must abort h too
                if i + 1 < len(items):
                    upcoming = self.open_file(*items[i + 1])
                self.start_file(h)
                while len(open_files) > FILES_AHEAD:
                    h = open_files.popleft()
                    finishing.append((h, finisher.submit(finish, h)))
                while len(finishing) > FILES_FINISHING:
                    finishing.popleft()[1].result()
            while open_files:
                h = open_files.popleft()
                finishing.append((h, finisher.submit(finish, h)))
            while finishing:
                finishing.popleft()[1].result()
        except BaseException:
            for h in list(open_files) + ([upcoming] if upcoming is not None else []):
                h.abort()
            for _, fut in finishing:  # each finish aborts its own file if it fails
                try:
                    fut.result()
                except BaseException:  # noqa: BLE001 - the first error is the one raised
                    pass
            raise
        finally:
            finisher.shutdown(wait=True)
