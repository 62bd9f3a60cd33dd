"""The streaming executor: a plan's byte ranges → pinned host buffers → device staging slots →
one batched transform launch per slot, writing every tensor straight into its final place.

    reader thread: a chunk, read and copied a small pinned buffer at a time (readers.py) into
        its place in staging slot k, once slot k's previous transform is done ─► event
    orchestrator: once every chunk of slot k has landed ─► one multi_tensor_transform over every
        tensor in the slot ─► event k frees slot k

Scales (small) are read first, so a weight never waits for its scale. A tensor larger than a slot
is split by rows (batching.py). Memory is ``num_slots x slot_bytes`` on the device and
``read_threads x buffers_per_thread x pinned_buffer_bytes`` pinned, whatever the model size. On
a CPU device the same plan runs with the torch backend, reading straight into host slots. Why each
default is what it is: docs/decisions.md.
"""

import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..backend import resolve_backend
from ..errors import PyloaderInputError
from ..format.checkpoint import gc_paused
from ..ops.jobs import run_jobs
from ..routing.plan import Plan
from .batching import Batch, Part, piece_jobs, split_into_batches, view_source
from .readers import (DIRECT_ALIGN, FileCache, NativeReaders, PinnedPool, direct_read_sizes, file_resident,
                      read_and_copy, read_and_copy_native, read_chunks, read_ranges_native)

logger = logging.getLogger("pyloader")


@dataclass
class ExecutorConfig:
    """Knobs of a load; every default is a measured choice (docs/decisions.md#executor)."""

    slot_bytes: int = 128 << 20
    num_slots: int = 8               # device staging: num_slots x slot_bytes
    read_threads: int = 12           # fewer than the cores: the orchestrator needs one
    read_chunk_bytes: int = 32 << 20  # one preadv (and, with Python readers, one H2D copy) at most this large
    buffers_per_thread: int = 2      # pinned buffers a reader thread
    # native readers' pinned buffer: small enough that all of them stay in the last-level cache
    # between the page-cache copy and the DMA that reads them back
    pinned_buffer_bytes: int = 8 << 20
    # "native": the extension's HostReader; "python": preadv and torch copies; "auto": native
    # where the CUDA extension is built, else python (logged)
    readers: str = "auto"
    # files not in the page cache (mincore samples): "direct" reads them with O_DIRECT,
    # "buffered" through the page cache, "auto" direct where the filesystem allows it (logged)
    cold_reads: str = "auto"
    # O_DIRECT reads: the disk sees one ascending stream of small requests, 16 in flight
    cold_read_threads: int = 16
    cold_request_bytes: int = 512 << 10
    cold_chunk_bytes: int = 4 << 20


@dataclass
class Timings:
    read_s: float = 0.0       # summed over reader threads
    wait_read_s: float = 0.0  # orchestrator waiting for reads (the critical path when I/O bound)
    # device time with at least one host→device copy running (CUDA events; with native readers a
    # chunk's span also covers the read of its first buffer, so this is an upper bound)
    h2d_s: float = 0.0
    transform_s: float = 0.0  # device time of transform launches
    wall_s: float = 0.0       # executor start until the device is done
    setup_s: float = 0.0      # executor start until the first reads are queued (buffers, readers)
    # seconds by step, in order: batches, staging, cold_check, readers, scales_queued, reads_queued
    setup_parts: Dict[str, float] = field(default_factory=dict)
    drain_s: float = 0.0      # last transform enqueued until the device is done
    cold_files: int = 0       # files read as cold (see ExecutorConfig.cold_reads)
    read_threads: int = 0     # reader threads used (ExecutorConfig.cold_read_threads where files are cold)
    pinned_bytes: int = 0     # pinned host buffers of the readers (scales aside)
    # pyloader.load before the executor (seconds): headers (read and checked), preset (rules and
    # target layout), plan (routing, pairing, shape and coverage checks)
    prepare_parts: Dict[str, float] = field(default_factory=dict)
    finish_s: float = 0.0     # pyloader.load after the executor (report, tied targets)


def busy_seconds(spans: List[Tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (copies on many streams overlap)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def choose_readers(mode: str) -> str:
    """``native`` or ``python`` for ``ExecutorConfig.readers``; auto without the extension is logged."""
    from .. import _C

    built = getattr(_C, "cuda_built", False) and hasattr(_C, "HostReader")
    if mode == "native" and not built:
        raise PyloaderInputError("readers='native' needs the CUDA extension (pyloader._C), which is not built")
    if mode == "auto" and not built:
        logger.info("pyloader: the CUDA extension is not built: reading through Python readers (slower)")
    return "native" if (mode == "native" or (mode == "auto" and built)) else "python"


def mark_cold_files(files: FileCache, file_names: List[str], mode: str) -> int:
    """Mark the files not in the page cache for O_DIRECT reads; returns how many are cold."""
    if mode == "buffered":
        return 0
    cold = [f for f in file_names if file_resident(f) < 0.5]
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
    return len(cold)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="pyloader load", leave=False)


class StreamingExecutor:
    """Runs a :class:`~pyloader.routing.plan.Plan` into ``tensors`` (target name → tensor on ``device``)::

        timings = StreamingExecutor(tensors, device).run(plan)
    """

    def __init__(self, tensors: Dict[str, torch.Tensor], device: torch.device,
                 backend: Optional[str] = None, config: Optional[ExecutorConfig] = None,
                 progress: bool = True, hooks: Optional[Callable[[Optional[int]], None]] = None, slots=None):
        config = config or ExecutorConfig()
        for what, value, allowed in (("readers", config.readers, ("auto", "native", "python")),
                                     ("cold_reads", config.cold_reads, ("auto", "direct", "buffered"))):
            if value not in allowed:
                raise PyloaderInputError(f"{what} must be {', '.join(map(repr, allowed))}, not {value!r}")
        self.plan: Optional[Plan] = None
        self.tensors, self.device = tensors, torch.device(device)
        self.cfg = config
        self.backend = resolve_backend(backend, self.device, "load")
        self.progress = progress
        self.hooks = hooks
        self.slots = slots  # gate slots (pyloader.gate.GateSlots) of the dequantized pieces, or None
        self.timings = Timings()
        self.bytes_read = 0
        self.readers_used = ""  # "native" or "python" (GPU pinned-buffer path), see ExecutorConfig.readers
        self._read_step = config.read_chunk_bytes  # bytes a read (smaller with O_DIRECT reads, see _open)
        self._t_start = 0.0
        self._marks: List[Tuple[str, float]] = []
        self.files = self.pool = self.native = self.pinned = None
        self.staging: List[torch.Tensor] = []
        self.nslots = 0
        self.threads = config.read_threads

    def _chunks(self, parts: List[Part]):
        """A batch's reads as (file, file offset, slot offset, bytes) pieces of at most read_chunk_bytes."""
        out, step = [], self._read_step
        for part in parts:
            for off in range(0, part.nbytes, step):
                out.append((part.piece.source.file, part.file_offset + off, part.slot_offset + off,
                            min(step, part.nbytes - off)))
        return out

    def _start_scales(self):
        """Queue the reads of every scale tensor (small) ahead of the first batches' reads: they
        overlap those reads instead of delaying them. Native readers read them straight into one
        device buffer, a contiguous group of scales a thread in one call (a Python read each would
        hold the GIL the orchestrator needs); otherwise into one pinned buffer, moved in one copy
        by _finish_scales."""
        infos = list({s.name: s for s in self.plan.scales}.values())
        if not infos:
            return None
        offsets, pos = [], 0
        for info in infos:
            offsets.append(pos)
            pos += -(-info.nbytes // 16) * 16
        if self.native is not None:
            dev = torch.empty(max(pos, 1), dtype=torch.uint8, device=self.device)
            per = -(-len(infos) // self.threads)
            groups = [range(k, min(len(infos), k + per)) for k in range(0, len(infos), per)]
            return infos, offsets, dev, [self.pool.submit(self._read_scales_native, infos, offsets, g, dev)
                                         for g in groups]
        host = torch.empty(pos, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        chunks = [(info.file, info.start, off, info.nbytes) for info, off in zip(infos, offsets)]
        groups = [chunks[k::self.threads] for k in range(min(self.threads, len(chunks)))]
        return infos, offsets, host, [self.pool.submit(read_chunks, self.files, g, host) for g in groups]

    def _read_scales_native(self, infos, offsets, group: range, dev: torch.Tensor):
        reader, stream = self.native.get()
        read_ranges_native(self.files, reader, stream,
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

    def _open(self, file_names: List[str], nslots: int) -> None:
        """What a load needs before its first read: staging slots, descriptors, the cold check, the
        readers and their pool."""
        cfg, dev = self.cfg, self.device
        self.files = FileCache()
        cuda = dev.type == "cuda"
        self.nslots = nslots
        self.staging = [torch.empty(cfg.slot_bytes, dtype=torch.uint8, device=dev if cuda else "cpu")
                        for _ in range(nslots)]
        self._marks.append(("staging", time.perf_counter()))
        if cuda:
            self.timings.cold_files = mark_cold_files(self.files, file_names, cfg.cold_reads)
            self._marks.append(("cold_check", time.perf_counter()))
            self.readers_used = choose_readers(cfg.readers)
            buffer_bytes = cfg.pinned_buffer_bytes
            if self.files.direct and self.readers_used == "native":
                self.threads = max(1, cfg.cold_read_threads)
                # a buffer a request: the reader widens an O_DIRECT read by up to 3 blocks
                buffer_bytes = max(cfg.cold_request_bytes, DIRECT_ALIGN) + 3 * DIRECT_ALIGN
                self._read_step = max(cfg.cold_chunk_bytes, DIRECT_ALIGN)
            if self.readers_used == "native":  # chunks of any size: the reader splits them into its buffers
                self.native = NativeReaders(dev, self.threads, cfg.buffers_per_thread, buffer_bytes)
            else:
                buffer_bytes = cfg.read_chunk_bytes
                if self.files.direct:
                    self._read_step, buffer_bytes = direct_read_sizes(cfg.read_chunk_bytes)
                self.pinned = PinnedPool(self.threads * cfg.buffers_per_thread, buffer_bytes)
        self.pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="pyloader-read")
        self._marks.append(("readers", time.perf_counter()))
        self.timings.read_threads = self.threads
        held = self.native.buffers if self.native is not None else (self.pinned.buffers if self.pinned is not None else [])
        self.timings.pinned_bytes = sum(b.numel() for b in held)

    def run(self, plan: Plan) -> Timings:
        cfg = self.cfg
        self.plan = plan
        self._t_start = time.perf_counter()
        self._marks = [("start", self._t_start)]
        try:
            with gc_paused():  # a part a piece (45K for DeepSeek-R1): see format.checkpoint.gc_paused
                pieces = [p for _, group in plan.by_layer() for p in group]
                batches = split_into_batches(pieces, cfg.slot_bytes)
                if self.slots is not None:
                    self.slots.reserve(p.source.name for p in pieces if p.transform == "dequant")
            self._marks.append(("batches", time.perf_counter()))
            self._open(list(dict.fromkeys(str(p.source.file) for p in pieces)), max(1, min(cfg.num_slots, len(batches))))
            return self._run(batches)
        finally:
            self.close()

    def _submit(self, batch: Batch, slot: int, done: list) -> list:
        """Queue the reads of ``batch`` into staging slot ``slot`` (after the slot's previous transform)."""
        chunks = self._chunks(batch.parts)
        files, pool, staging = self.files, self.pool, self.staging[slot]
        if self.native is not None:  # a task a chunk: read it, wait for the slot, copy it
            return [pool.submit(read_and_copy_native, files, c, staging, done[slot], self.native) for c in chunks]
        if self.device.type == "cuda":
            return [pool.submit(read_and_copy, files, c, staging, done[slot], self.pinned) for c in chunks]
        # CPU: the readers wait for the slot to be free, so this thread keeps going
        groups = [chunks[k::self.threads] for k in range(min(self.threads, len(chunks)))]
        return [pool.submit(read_chunks, files, g, staging, done[slot]) for g in groups]

    def _run(self, batches: List[Batch]) -> Timings:
        cuda = self.device.type == "cuda"
        nslots, staging = self.nslots, self.staging
        compute = torch.cuda.current_stream(self.device) if cuda else None
        done = [None] * nslots
        timing_events = []  # (transform start, end) on the compute stream
        copy_spans = []     # (start, end) events of every H2D copy, on whichever stream it ran
        used = [sum(part.nbytes for part in b.parts) for b in batches]
        bar = _progress(sum(used), self.progress)
        try:
            scales_started = self._start_scales()
            self._marks.append(("scales_queued", time.perf_counter()))
            last_batch_of_layer = {}
            for i, b in enumerate(batches):
                for layer in b.layers:
                    last_batch_of_layer[layer] = i
            pending = deque(self._submit(batches[j], j, done) for j in range(min(nslots, len(batches))))
            self._marks.append(("reads_queued", time.perf_counter()))
            self.timings.setup_s = self._marks[-1][1] - self._t_start
            self.timings.setup_parts = {label: round(t - self._marks[k][1], 6)
                                        for k, (label, t) in enumerate(self._marks[1:])}
            scales = self._finish_scales(scales_started)
            for i, batch in enumerate(batches):
                slot = i % nslots
                t = time.perf_counter()
                results = [f.result() for f in pending.popleft()]
                self.timings.wait_read_s += time.perf_counter() - t
                if cuda:
                    for e0, e1, read_s in results:
                        compute.wait_event(e1)
                        copy_spans.append((e0, e1))
                        self.timings.read_s += read_s
                else:
                    self.timings.read_s += sum(results)
                jobs = []
                for part in batch.parts:
                    p = part.piece
                    raw = staging[slot][part.slot_offset:part.slot_offset + part.nbytes]
                    src = view_source(raw, p.source, part.rows if p.source.shape else 1, p.quant is not None)
                    spec = self.plan.targets[p.target]
                    jobs += piece_jobs(p, src, part.row0, self.tensors[p.target], scales, spec.experts, self.slots)
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
                    pending.append(self._submit(batches[i + nslots], slot, done))
            t_drain = time.perf_counter()
            if cuda:
                torch.cuda.synchronize(self.device)
                self.timings.drain_s = time.perf_counter() - t_drain
                for t0, t1 in timing_events:
                    self.timings.transform_s += t0.elapsed_time(t1) / 1e3
                if copy_spans:  # device time with at least one copy running
                    ref = copy_spans[0][0]
                    self.timings.h2d_s = busy_seconds([(ref.elapsed_time(a) / 1e3, ref.elapsed_time(b) / 1e3)
                                                       for a, b in copy_spans])
        finally:
            if bar is not None:
                bar.close()
        self.timings.wall_s = time.perf_counter() - self._t_start
        return self.timings

    def close(self) -> None:
        """Wait for every read in flight and release the readers and descriptors (run does this itself)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        if self.native is not None:
            self.native.close()  # no copy may still read a pinned buffer when torch reuses it
            self.native = None
        if self.files is not None:
            self.files.close()
