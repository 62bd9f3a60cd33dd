"""Where the warm end-to-end time goes: the pread ceiling of the page cache (reader threads into
pinned slots, no GPU), pread + H2D without transforms (a slot at a time, and each reader copying
its own chunks), and pyloader.load over a sweep of executor settings (reader threads, chunk
size, pinned buffers a reader), all on one synthetic DeepSeek-V3-shaped FP8 checkpoint in the
same run.

    python bench/bench_executor.py --size-gb 16 [--quick | --cold] [--results bench/results/results.jsonl]
"""

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_rows  # noqa: E402

import pyloader  # noqa: E402
from pyloader.bench import synthetic_config, verify  # noqa: E402
from pyloader.bench.peers import fastsafetensors_load_raw  # noqa: E402
from pyloader.bench.results import drop_cache, pinned_h2d_gbps, warm  # noqa: E402
from pyloader.format.checkpoint import open_checkpoint  # noqa: E402
from pyloader.routing.plan import build_plan  # noqa: E402
from pyloader.routing.presets import build_preset, load_config  # noqa: E402
from pyloader.synthetic import allocate_targets, write_checkpoint  # noqa: E402


def pread_ceiling(files, threads: int, chunk: int, slots: int, slot_bytes: int, h2d: bool, dev) -> float:
    """Read every file once with ``threads`` readers into a ring of pinned slots (optionally
    copying each filled slot to the device): the host side of the pipeline, no transforms."""
    host = [torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(slots)]
    dst = torch.empty(slot_bytes, dtype=torch.uint8, device=dev) if h2d else None
    work = []  # (path, offset, nbytes) slot-sized pieces
    for f in files:
        size = os.path.getsize(f)
        work += [(f, o, min(slot_bytes, size - o)) for o in range(0, size, slot_bytes)]
    fds = {f: os.open(f, os.O_RDONLY) for f in files}
    pool = ThreadPoolExecutor(threads)
    stream = torch.cuda.Stream(dev)
    events = [None] * slots

    def read(fd, buf, off, n):
        pos = 0
        while pos < n:
            pos += os.preadv(fd, [buf[pos:n]], off + pos)

    def submit(i):
        f, off, n = work[i]
        slot = i % slots
        if events[slot] is not None:
            events[slot].synchronize()
        buf = memoryview(host[slot].numpy()).cast("B")
        return [pool.submit(read, fds[f], buf[c:], off + c, min(chunk, n - c)) for c in range(0, n, chunk)]

    torch.cuda.synchronize(dev)
    t = time.perf_counter()
    pending = [submit(i) for i in range(min(slots, len(work)))]
    for i in range(len(work)):
        for fut in pending[i]:
            fut.result()
        slot = i % slots
        if h2d:
            with torch.cuda.stream(stream):
                dst[:work[i][2]].copy_(host[slot][:work[i][2]], non_blocking=True)
                ev = torch.cuda.Event(blocking=True)
                ev.record()
                events[slot] = ev
        if i + slots < len(work):
            pending.append(submit(i + slots))
    torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t
    pool.shutdown()
    for fd in fds.values():
        os.close(fd)
    return sum(w[2] for w in work) / seconds / 1e9


def threaded_h2d(files, threads: int, chunk: int, depth: int, dev) -> float:
    """Each reader thread runs its own pipeline: pread a chunk into one of ``depth`` small pinned
    buffers it owns, copy it to the device on its own stream, go on; a buffer is reused once its
    copy is done. Small buffers may still be in the CPU cache when the DMA reads them, so the
    host memory sees the page-cache read and little else (the slot pipeline writes every byte
    to DRAM once more and reads it back for the DMA)."""
    work = []
    for f in files:
        size = os.path.getsize(f)
        work += [(f, o, min(chunk, size - o)) for o in range(0, size, chunk)]
    fds = {f: os.open(f, os.O_RDONLY) for f in files}
    dst = torch.empty(64 << 20, dtype=torch.uint8, device=dev)
    slots = max(1, (64 << 20) // chunk)

    def run(t):
        bufs = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(depth)]
        views = [memoryview(b.numpy()).cast("B") for b in bufs]
        events = [None] * depth
        stream = torch.cuda.Stream(dev)
        for k, i in enumerate(range(t, len(work), threads)):
            f, off, n = work[i]
            j = k % depth
            if events[j] is not None:
                events[j].synchronize()
            pos = 0
            while pos < n:
                pos += os.preadv(fds[f], [views[j][pos:n]], off + pos)
            with torch.cuda.stream(stream):
                d = (i % slots) * chunk
                dst[d:d + n].copy_(bufs[j][:n], non_blocking=True)
                ev = torch.cuda.Event(blocking=True)
                ev.record(stream)
                events[j] = ev
        torch.cuda.synchronize(dev)

    torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(run, t) for t in range(threads)]:
            f.result()
    seconds = time.perf_counter() - t0
    for fd in fds.values():
        os.close(fd)
    return sum(w[2] for w in work) / seconds / 1e9


def interleaved(args, targets, ck_dir, files, nbytes, dev, record) -> None:
    """pyloader.load under a few settings and InstantTensor's buffered reader, one load each per
    round, so machine drift hits every provider alike; the best round of each is reported."""
    cfg = pyloader.ExecutorConfig
    # the default last: its result is the one verified at the end
    configs = {"native 10 x 2 x 8 MiB": cfg(read_threads=10),
               "native 14 x 2 x 8 MiB": cfg(read_threads=14),
               "default (native 12 x 2 x 8 MiB)": cfg()}
    reports = {}

    def load_with(key, ex):
        reports.setdefault(key, []).append(pyloader.load(targets, ck_dir, progress=False, executor=ex))

    providers = {f"pyloader.load {k}": (lambda k=k, ex=ex: load_with(k, ex)) for k, ex in configs.items()}
    try:
        from instanttensor import BackendPolicy, safe_open as it_open

        dst = {}

        def instanttensor():
            with it_open(files, framework="pt", device=dev.index or 0, copy=False, backend=BackendPolicy.BUFFERED) as f:
                for name, t in f.tensors():
                    d = dst.get(name)
                    if d is None:
                        d = dst[name] = torch.empty(t.shape, dtype=t.dtype, device=dev)
                    d.copy_(t)

        providers["InstantTensor 0.2.2 buffered raw"] = instanttensor
    except ImportError:
        print("  InstantTensor not installed: not measured")
    times = {k: [] for k in providers}
    for _ in range(args.repeats + 1):
        for k, fn in providers.items():
            torch.cuda.synchronize(dev)
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize(dev)
            times[k].append(time.perf_counter() - t)
    for k, ts in times.items():
        extra = {}
        key = k[len("pyloader.load "):]
        if key in reports:  # where the best load's time went
            best = min(range(1, len(ts)), key=ts.__getitem__)
            tm = reports[key][best].timings
            extra = dict(wall_s=round(tm.wall_s, 4), setup_s=round(tm.setup_s, 4), h2d_s=round(tm.h2d_s, 4),
                         drain_s=round(tm.drain_s, 4), setup_parts=tm.setup_parts, prepare_parts=tm.prepare_parts,
                         outside_executor_s=round(ts[best] - tm.wall_s, 4))
        record(k, nbytes / min(ts[1:]) / 1e9, seconds=[round(x, 3) for x in ts], interleaved=True, **extra)


def _block_units(files, block: int):
    """The files' sizes and a queue of their (file index, offset, bytes) pieces of ``block`` bytes, in file order."""
    import queue

    sizes = [os.path.getsize(f) for f in files]
    units: "queue.Queue" = queue.Queue()
    for i, size in enumerate(sizes):
        for o in range(0, size, block):
            units.put((i, o, min(block, size - o)))
    return sizes, units


def _chunks_of(units, chunk: int):
    """(file index, offset, bytes) reads of at most ``chunk`` bytes, a unit at a time from the
    shared queue until it is empty (each reader reads its unit front to back)."""
    import queue

    while True:
        try:
            i, o, n = units.get_nowait()
        except queue.Empty:
            return
        for c in range(0, n, chunk):
            yield i, o + c, min(chunk, n - c)


def _rate_of_readers(threads: int, run, fds, nbytes: int) -> float:
    """GB/s of ``threads`` threads each running ``run`` until the queue is empty; closes ``fds``."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(run) for _ in range(threads)]:
            f.result()
    seconds = time.perf_counter() - t0
    for fd in fds:
        os.close(fd)
    return nbytes / seconds / 1e9


def cold_block_reads(files, threads: int, chunk: int, block: int, direct: bool) -> float:
    """Readers take ``block``-sized pieces of the files in file order from one queue and read each
    front to back in ``chunk`` preads through one descriptor a file (buffered or O_DIRECT): with
    block = a whole file and a reader a file, a few long sequential streams; with block = chunk,
    many readers interleaved in file order, one ascending stream (fastsafetensors 0.5.0's nogds
    shape with chunk = 512 KiB, see cold())."""
    sizes, units = _block_units(files, block)
    fds = [os.open(f, os.O_RDONLY | (os.O_DIRECT if direct else 0)) for f in files]

    def run():
        buf = torch.empty(chunk + 8192, dtype=torch.uint8, pin_memory=True)
        view = memoryview(buf.numpy()).cast("B")
        lead = (-buf.data_ptr()) % 4096
        for i, o, m in _chunks_of(units, chunk):
            m = -(-m // 4096) * 4096 if direct else m
            os.preadv(fds[i], [view[lead:lead + m]], o)

    return _rate_of_readers(threads, run, fds, sum(sizes))


def cold(args, targets, ck_dir, files, nbytes, dev, record) -> None:
    """Cold page cache (dropped before each load): pyloader.load and fastsafetensors (the best cold
    peer) alternated round by round, with the disk's raw O_DIRECT rate before and after: on a
    virtual disk the host may cache what the guest dropped, so a fixed order would favour whoever
    runs last."""
    def raw(label):
        how = drop_cache(files)
        # 64 MiB blocks of 64 MiB reads: the readers take the chunks in file order from one queue
        record(f"reads only: direct ({label})", cold_block_reads(files, 16, 64 << 20, 64 << 20, True), threads=16,
               chunk_mib=64, cache=how)

    def pyloader_cold():
        report = pyloader.load(targets, ck_dir, progress=False, executor=pyloader.ExecutorConfig())
        return dict(cold_files=report.timings.cold_files, pinned_bytes=report.timings.pinned_bytes,
                    read_threads=report.timings.read_threads)

    providers = {"pyloader.load cold (default)": pyloader_cold}

    def fastsafetensors_cold():
        fastsafetensors_load_raw(files, dev)
        return {}

    if importlib.util.find_spec("fastsafetensors") is not None:
        providers["fastsafetensors 0.5 nogds raw"] = fastsafetensors_cold
    else:
        print("  fastsafetensors not installed: not measured")
    raw("first")
    # the disk's rate for the shape pyloader's cold reads take (docs/decisions.md#cold-reads)
    how = drop_cache(files)
    record("reads only: direct, interleaved", cold_block_reads(files, 16, 512 << 10, 512 << 10, True), threads=16,
           request_kib=512, cache=how)

    for rnd in range(args.repeats):
        order = list(providers.items())
        if rnd % 2:
            order.reverse()  # ABBA: neither always runs right after the other
        for label, fn in order:
            how = drop_cache(files)
            torch.cuda.synchronize(dev)
            t = time.perf_counter()
            extra = fn()
            torch.cuda.synchronize(dev)
            record(label, nbytes / (time.perf_counter() - t) / 1e9, round=rnd, cache=how, **extra)
    raw("last")
    if "pyloader.load cold (default)" in providers:  # the targets end with a pyloader load: verified by the caller
        pyloader_cold()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gb", type=float, default=16.0)
    ap.add_argument("--dir", default=None, help="where to write the synthetic checkpoint (default: a temp dir)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--results", help="append the result rows to this JSON-lines results log")
    ap.add_argument("--quick", action="store_true",
                    help="no host-side probes; the default against other reader settings and InstantTensor (buffered), "
                         "interleaved load by load (an A/B on one machine)")
    ap.add_argument("--cold", action="store_true",
                    help="cold page cache: raw read rates by read shape (whole-file and 256 MiB streams, "
                         "interleaved O_DIRECT), then pyloader and fastsafetensors alternated")
    args = ap.parse_args()
    dev = torch.device("cuda")
    env = environment()
    tmp = tempfile.TemporaryDirectory(prefix="pyloader-exec-", dir=args.dir)
    cfg = synthetic_config(args.size_gb, dev)
    ck_dir = write_checkpoint(Path(tmp.name) / "ds", cfg, shard_bytes=4 << 30)
    ck = open_checkpoint(ck_dir)
    pre = build_preset(load_config(ck.config_path))
    plan = build_plan(ck, pre.targets, pre.rules, block_size=pre.block_size)
    files = [str(f) for f in ck.files]
    nbytes = plan.read_bytes
    targets = allocate_targets(pre.targets, dev)
    ceiling = pinned_h2d_gbps(dev)
    print(f"{env['gpu']}: {nbytes / 1e9:.2f} GB, pinned H2D {ceiling:.1f} GB/s")
    rows = []

    def record(kind, gbps, **cfg_):
        row = dict(env, bench="executor", case=f"deepseek-v3 slice {nbytes / 1e9:.1f} GB {'cold' if args.cold else 'warm'}",
                   provider=kind,
                   gbps=round(gbps, 2), ceiling_gbps=round(ceiling, 2), fraction=round(gbps / ceiling, 3), **cfg_)
        rows.append(row)
        print(f"  {kind:28s} {gbps:6.2f} GB/s ({gbps / ceiling:.0%})  {cfg_}")

    if not args.cold:
        warm(files)
    if args.cold or args.quick:  # the experiments: verified by the targets' last pyloader load
        (cold if args.cold else interleaved)(args, targets, ck_dir, files, nbytes, dev, record)
        ok = verify(targets, plan, dev)
        print("verified" if ok else "MISMATCH")
        write_rows([dict(r, verified=ok) for r in rows], args.results)
        tmp.cleanup()
        return
    for threads in (8, 16):
        for h2d in (False, True):
            best = max(pread_ceiling(files, threads, 16 << 20, 16, 64 << 20, h2d, dev) for _ in range(2))
            record("pread + H2D" if h2d else "pread only", best, threads=threads, chunk_mib=16, slots=16, slot_mib=64)
    for threads, chunk_mib, depth in ((8, 4, 3), (16, 8, 2), (16, 16, 2), (12, 16, 3)):
        best = max(threaded_h2d(files, threads, chunk_mib << 20, depth, dev) for _ in range(2))
        record("threaded pread + H2D", best, threads=threads, chunk_mib=chunk_mib, depth=depth)
    sweep = [dict(slot_bytes=128 << 20, num_slots=8, read_threads=12, read_chunk_bytes=16 << 20, buffers_per_thread=3),
             dict(slot_bytes=128 << 20, num_slots=8, read_threads=12, read_chunk_bytes=32 << 20, buffers_per_thread=2),
             dict(slot_bytes=128 << 20, num_slots=8, read_threads=14, read_chunk_bytes=32 << 20, buffers_per_thread=2),
             dict(slot_bytes=128 << 20, num_slots=8, read_threads=16, read_chunk_bytes=32 << 20, buffers_per_thread=2),
             dict(slot_bytes=128 << 20, num_slots=8, read_threads=12, read_chunk_bytes=64 << 20, buffers_per_thread=1)]
    for s in sweep:
        ex = pyloader.ExecutorConfig(**s)
        times = []
        for _ in range(args.repeats + 1):
            torch.cuda.synchronize(dev)
            t = time.perf_counter()
            report = pyloader.load(targets, ck_dir, progress=False, executor=ex)
            torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t)
        tm = report.timings
        record("pyloader.load", nbytes / min(times[1:]) / 1e9, seconds=[round(x, 3) for x in times],
               slot_mib=s["slot_bytes"] >> 20, slots=s["num_slots"], threads=s["read_threads"],
               chunk_mib=s["read_chunk_bytes"] >> 20, buffers_per_thread=s.get("buffers_per_thread", 2), read_thread_s=round(tm.read_s, 3),
               wait_read_s=round(tm.wait_read_s, 3), h2d_s=round(tm.h2d_s, 3), wall_s=round(tm.wall_s, 3),
               setup_s=round(tm.setup_s, 3), drain_s=round(tm.drain_s, 3),
               outside_executor_s=round(times[-1] - tm.wall_s, 3))
    ok = verify(targets, plan, dev)
    print("verified" if ok else "MISMATCH")
    write_rows([dict(r, verified=ok) for r in rows], args.results)
    tmp.cleanup()


if __name__ == "__main__":
    main()
