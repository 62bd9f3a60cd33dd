"""Shared benchmark plumbing: timing (CUDA graphs + events, median), ceilings, result rows (appended\nto the one results log, bench/results/results.jsonl)."""

import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Optional

import torch

from pyloader.bench import results


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def environment() -> dict:
    """pyloader's own row environment (GPU, commit, date, host), the commit taken from git when
    PYLOADER_COMMIT is not set, and the CUDA and Triton versions."""
    env = results.environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if env["commit"] == "unknown":
        env["commit"] = git_commit()
    if torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            pass
    return env


def time_gpu_ms(fns, reps_ms: int = 200) -> tuple:
    """Median ms per call of ``fns`` (closures over rotated input sets), replayed from a CUDA
    graph so host overhead does not count; falls back to eager launches if capture fails."""
    import triton.testing

    for f in fns:
        f()
    torch.cuda.synchronize()
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for f in fns:
                f()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for f in fns:
                f()
        ms = triton.testing.do_bench(graph.replay, warmup=25, rep=reps_ms, return_mode="median")
        return ms / len(fns), "cuda-graph"
    except Exception:  # noqa: BLE001 - a provider that cannot be captured is timed eagerly, and says so
        torch.cuda.synchronize()

        def all_fns():
            for f in fns:
                f()

        ms = triton.testing.do_bench(all_fns, warmup=25, rep=reps_ms, return_mode="median")
        return ms / len(fns), "eager"


def time_cpu_ms(fn, reps: int = 7) -> float:
    fn()
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e3)
    return statistics.median(samples)


_FLUSH = {}


def last_level_cache_bytes() -> int:
    """Size of this CPU's largest cache as the kernel reports it (0 where it does not)."""
    sizes = []
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (d / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=0)


def cpu_evict_bytes() -> int:
    """Bytes to write to evict the caches: 3x the last-level cache, at least 1 GiB."""
    return max(1 << 30, 3 * last_level_cache_bytes())


def interleaved_cpu_samples(fns, rounds: int, flush_bytes: Optional[int] = None, before=None):
    """ms of each call of each function, over rounds that take every function once, each round
    starting one function later. Before each call a write over ``flush_bytes`` (default
    cpu_evict_bytes(); 0: none) evicts the caches, so no call finds what the one before it left
    there (docs/decisions.md#cpu-benchmarks). ``before``: called before each call, untimed (to
    hand it other tensors). The host's drift between seconds hits every function alike."""
    if flush_bytes is None:
        flush_bytes = cpu_evict_bytes()
    if flush_bytes not in _FLUSH:
        _FLUSH[flush_bytes] = torch.empty(flush_bytes, dtype=torch.uint8)
    flush = _FLUSH[flush_bytes]
    samples = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    order = list(fns.items())
    for r in range(rounds):
        for name, fn in order[r % len(order):] + order[:r % len(order)]:
            if before is not None:
                before()
            if flush_bytes:
                flush.fill_(r & 0xFF)
            t = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t) * 1e3)
    return samples


def copy_ceiling_gbps(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy, bytes read + written, from one large copy_ (median of many)."""
    import triton.testing

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=300, return_mode="median")
    return 2 * nbytes / (ms * 1e-3) / 1e9


def rotation(bytes_per_set: int, l2_bytes: int = 64 << 20) -> int:
    """How many input sets make the working set several times the L2 (at least 1)."""
    return max(1, min(16, -(-4 * l2_bytes // max(1, bytes_per_set))))


def write_rows(rows, path):
    """Append ``rows`` to the JSON-lines results log at ``path`` (nothing without a path)."""
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    results.append_rows(path, rows)


def print_table(rows, cols):
    widths = [max(len(c), *(len(f"{r.get(c, '')}") for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(f"{r.get(c, '')}".ljust(w) for c, w in zip(cols, widths)))


def write_alone(directory: Path, nbytes: int) -> float:
    """Seconds to write ``nbytes`` of random data to a new file in ``directory`` and fsync it."""
    directory.mkdir(parents=True, exist_ok=True)
    block = os.urandom(64 << 20)
    path = directory / "write_probe.bin"

    def run():
        with open(path, "wb") as f:
            left = nbytes
            while left > 0:
                n = min(left, len(block))
                f.write(block[:n])
                left -= n
            f.flush()
            os.fsync(f.fileno())

    t = time.perf_counter()
    run()
    t = time.perf_counter() - t
    path.unlink()
    return t
