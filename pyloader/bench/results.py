"""What every benchmark row carries and where it goes: the environment (GPU, commit, date), the
page-cache preparation (warm, or dropped), the pinned host→device ceiling, and the append-only
JSON-lines results log."""

import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import List

import torch


def environment(device: torch.device) -> dict:
    """What every row carries: commit (PYLOADER_COMMIT), torch, date, host CPUs and the GPU."""
    env = {"commit": os.environ.get("PYLOADER_COMMIT", "unknown"), "torch": torch.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "host_cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine()}
    env["gpu"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (cpu)"
    return env


def drop_cache(paths) -> str:
    """Evict the files from the page cache: drop_caches where permitted, else fadvise(DONTNEED)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "posix_fadvise(DONTNEED)"


def warm(paths):
    for p in paths:
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass


def pinned_h2d_gbps(device, nbytes=1 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for _ in range(6):
        torch.cuda.synchronize(device)
        t = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return nbytes / statistics.median(times[1:]) / 1e9


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


ROW_KEYS = ("bench", "case", "provider", "gbps", "ceiling_gbps", "gpu", "commit", "date")


def log_row(row: dict) -> dict:
    """A row as the results log holds it: the keys every row has, then ``config`` with the rest."""
    config = dict(row.get("config") or {})
    config.update({k: v for k, v in row.items() if k not in ROW_KEYS and k != "config"})
    return dict({k: row.get(k) for k in ROW_KEYS}, config=config)


def append_rows(path, rows: List[dict]) -> None:
    """Append result rows to a JSON-lines results log (one object a line, see :func:`log_row`)."""
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(log_row(row), separators=(",", ":")) + "\n")
