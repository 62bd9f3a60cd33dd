"""How fast can bytes in the page cache reach the GPU without a CPU copy? Measures, on warm files
in one run: cudaHostRegister(ReadOnly) of a read-only file mapping (one thread, several threads,
window sizes) and its cudaHostUnregister; copies from registered windows; registration pipelined
with the copies; and a hybrid where reader threads (preadv into pinned buffers) and registrar
threads (register a window, copy from it, unregister behind its event) take windows from one
queue. The question it answers: does registration overlap the copies and the readers, or does
the driver serialize them?

    python bench/probe_register.py --size-gb 8 --json bench/results/register_<gpu>_<commit>.json
"""

import argparse
import json
import mmap
import os
import queue
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment  # noqa: E402

from pyloader.bench import pinned_h2d_gbps  # noqa: E402

READ_ONLY = 0x08
MiB = 1 << 20


def cudart():
    return torch.cuda.cudart()


def register(ptr: int, n: int) -> None:
    err = int(cudart().cudaHostRegister(ptr, n, READ_ONLY))
    if err:
        raise RuntimeError(f"cudaHostRegister failed: {err}")


def unregister(ptr: int) -> None:
    cudart().cudaHostUnregister(ptr)


def write_files(d: Path, count: int, size: int):
    block = torch.randint(0, 256, (64 * MiB,), dtype=torch.uint8).numpy().tobytes()
    paths = []
    for k in range(count):
        p = d / f"f{k}.bin"
        with open(p, "wb") as f:
            for _ in range(size // len(block)):
                f.write(block)
        paths.append(p)
    return paths


class Mapped:
    def __init__(self, paths):
        self.maps, self.tensors = [], []
        for p in paths:
            with open(p, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.tensors.append(torch.frombuffer(mm, dtype=torch.uint8))
            self.maps.append(mm)

    def windows(self, win: int):
        """(file index, offset, bytes) of every window, in file order."""
        return [(i, o, min(win, t.numel() - o)) for i, t in enumerate(self.tensors) for o in range(0, t.numel(), win)]

    def ptr(self, i, off):
        return self.tensors[i].data_ptr() + off


def register_rate(m: Mapped, win: int, threads: int):
    ws = m.windows(win)
    total = sum(w[2] for w in ws)
    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda w: register(m.ptr(w[0], w[1]), w[2]), ws))
    reg = time.perf_counter() - t
    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda w: unregister(m.ptr(w[0], w[1])), ws))
    unreg = time.perf_counter() - t
    return total / reg / 1e9, total / unreg / 1e9


def copy_registered(m: Mapped, dst: torch.Tensor, win: int):
    """Register everything first, then time only the copies (the PCIe side of the path)."""
    ws = m.windows(win)
    for i, o, n in ws:
        register(m.ptr(i, o), n)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for i, o, n in ws:
        dst[:n].copy_(m.tensors[i][o:o + n], non_blocking=True)
    torch.cuda.synchronize()
    s = time.perf_counter() - t
    for i, o, n in ws:
        unregister(m.ptr(i, o))
    return sum(w[2] for w in ws) / s / 1e9


def hybrid(m: Mapped, paths, dst: torch.Tensor, win: int, readers: int, registrars: int, chunk: int = 32 * MiB,
           buffers: int = 2):
    """Windows from one queue, in file order; a reader preads a window in ``chunk`` pieces into its
    two pinned buffers and copies each; a registrar registers a window, copies it on its own stream
    and hands (event, pointer) to an unregister thread. Returns (GB/s, share of bytes registered)."""
    ws = m.windows(win)
    total = sum(w[2] for w in ws)
    work: "queue.Queue" = queue.Queue()
    for w in ws:
        work.put(w)
    fds = [os.open(p, os.O_RDONLY) for p in paths]
    to_unregister: "queue.Queue" = queue.Queue()
    moved = {"reg": 0}
    lock = threading.Lock()
    slots = dst.numel() // win  # destination windows, reused round robin (content is not checked)
    counter = [0]

    def place(n):
        with lock:
            k = counter[0] % slots
            counter[0] += 1
        return dst[k * win:k * win + n]

    pinned = [[torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(buffers)] for _ in range(readers)]
    streams = [torch.cuda.Stream() for _ in range(readers + registrars)]

    def reader(r):
        bufs = pinned[r]
        views = [memoryview(b.numpy()).cast("B") for b in bufs]
        events = [None] * buffers
        stream = streams[r]
        k = 0
        while True:
            try:
                i, o, n = work.get_nowait()
            except queue.Empty:
                break
            out = place(n)
            for c in range(0, n, chunk):
                size = min(chunk, n - c)
                if events[k] is not None:
                    events[k].synchronize()
                pos = 0
                while pos < size:
                    pos += os.preadv(fds[i], [views[k][pos:size]], o + c + pos)
                with torch.cuda.stream(stream):
                    out[c:c + size].copy_(bufs[k][:size], non_blocking=True)
                    ev = torch.cuda.Event(blocking=True)
                    ev.record()
                events[k] = ev
                k = (k + 1) % buffers
        stream.synchronize()

    def registrar(r):
        stream = streams[readers + r]
        while True:
            try:
                i, o, n = work.get_nowait()
            except queue.Empty:
                break
            ptr = m.ptr(i, o)
            register(ptr, n)
            with torch.cuda.stream(stream):
                place(n).copy_(m.tensors[i][o:o + n], non_blocking=True)
                ev = torch.cuda.Event(blocking=True)
                ev.record()
            to_unregister.put((ev, ptr))
            with lock:
                moved["reg"] += n
        stream.synchronize()

    def unregisterer():
        while True:
            item = to_unregister.get()
            if item is None:
                return
            ev, ptr = item
            ev.synchronize()
            unregister(ptr)

    torch.cuda.synchronize()
    t = time.perf_counter()
    un = threading.Thread(target=unregisterer)
    un.start()
    threads = [threading.Thread(target=reader, args=(r,)) for r in range(readers)]
    threads += [threading.Thread(target=registrar, args=(r,)) for r in range(registrars)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    torch.cuda.synchronize()
    to_unregister.put(None)
    un.join()
    s = time.perf_counter() - t
    for fd in fds:
        os.close(fd)
    return total / s / 1e9, moved["reg"] / total


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=8.0)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    env = environment()
    rows = []

    def row(case, gbps, **extra):
        r = {"bench": "register", "case": case, "provider": "probe", "gbps": round(gbps, 2),
             "ceiling_gbps": round(h2d, 2), **env, **extra}
        rows.append(r)
        print(f"{case:60s} {gbps:7.2f} GB/s  {extra if extra else ''}", flush=True)

    with tempfile.TemporaryDirectory(dir=os.environ.get("PYLOADER_BENCH_DIR")) as d:
        size = int(args.size_gb * 1e9 / args.files) // (64 * MiB) * 64 * MiB
        paths = write_files(Path(d), args.files, size)
        for p in paths:  # warm: read once
            with open(p, "rb") as f:
                while f.read(256 * MiB):
                    pass
        h2d = pinned_h2d_gbps(dev)
        print(f"pinned H2D ceiling {h2d:.1f} GB/s; {args.files} files of {size / 1e9:.2f} GB, warm", flush=True)
        m = Mapped(paths)
        dst = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
        for win, threads in [(1 << 30, 1), (256 * MiB, 1), (64 * MiB, 1), (16 * MiB, 1), (64 * MiB, 2),
                             (64 * MiB, 4), (64 * MiB, 8), (1 << 30, 4)]:
            reg, unreg = register_rate(m, win, threads)
            row(f"register window {win // MiB} MiB, {threads} threads", reg, unregister_gbps=round(unreg, 2))
        row("copies from registered 64 MiB windows (registration untimed)", copy_registered(m, dst, 64 * MiB))
        for win, readers, registrars in [(64 * MiB, 0, 1), (64 * MiB, 0, 2), (64 * MiB, 12, 0), (64 * MiB, 11, 1),
                                         (64 * MiB, 12, 1), (64 * MiB, 10, 2), (64 * MiB, 8, 2), (256 * MiB, 11, 1),
                                         (16 * MiB, 11, 1), (64 * MiB, 12, 0), (64 * MiB, 11, 1)]:
            gbps, share = hybrid(m, paths, dst, win, readers, registrars)
            row(f"hybrid window {win // MiB} MiB, {readers} readers + {registrars} registrars", gbps,
                registered_share=round(share, 3))
        # Readers only: does a small chunk, copied while it is still in the last-level cache, cost
        # less memory bandwidth than 32 MiB ones (page cache -> pinned -> DMA reads each byte back)?
        for rnd in range(2):
            for chunk, buffers, readers in [(32 * MiB, 2, 12), (16 * MiB, 2, 12), (8 * MiB, 2, 12), (4 * MiB, 2, 12),
                                            (2 * MiB, 2, 12), (1 * MiB, 4, 12), (4 * MiB, 4, 12), (8 * MiB, 2, 16),
                                            (4 * MiB, 2, 16), (2 * MiB, 4, 16), (4 * MiB, 2, 8), (8 * MiB, 2, 8)]:
                gbps, _ = hybrid(m, paths, dst, 64 * MiB, readers, 0, chunk, buffers)
                row(f"readers {readers} x {buffers} x {chunk // MiB} MiB (round {rnd})", gbps)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
