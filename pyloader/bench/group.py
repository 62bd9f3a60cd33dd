"""``pyloader bench --nproc N``: N local processes load one checkpoint at tensor parallel N, in turns
with each byte read once over the group (``load(group=…)``) and with every rank reading for itself;
the aggregate rate is the checkpoint's bytes over the slowest rank's time. Each group load is checked
bitwise against the same rank's own load. The exchange runs over NCCL when every rank has a GPU of its
own, over gloo otherwise (CPU processes)."""

import statistics
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import torch

from ..format.checkpoint import open_checkpoint
from ..loading.loader import load
from ..parallel import Parallel
from ..routing.presets import build_preset, load_config
from ..synthetic import allocate_targets, write_checkpoint
from .results import append_rows, drop_cache, environment, sync, warm


def run_group_bench(nproc: int, size_gb: Optional[float] = None, checkpoint: Optional[str] = None,
                    cold: bool = False, repeats: int = 3, results_path: Optional[str] = None,
                    keep: Optional[str] = None) -> List[dict]:
    import torch.multiprocessing as mp

    from . import synthetic_config

    if nproc < 2:
        raise SystemExit("--nproc needs at least 2 processes")
    gpus = torch.cuda.device_count()
    dev = torch.device("cuda" if gpus >= nproc else "cpu")
    with tempfile.TemporaryDirectory(prefix="pyloader-group-bench-", dir=keep) as tmp:
        if checkpoint is None:
            size = size_gb if size_gb is not None else (6.0 if dev.type == "cuda" else 0.25)
            cfg = synthetic_config(size, dev)
            print(f"writing a synthetic DeepSeek-V3-shaped FP8 checkpoint (about {size:g} GB) into {tmp}", flush=True)
            ck_dir = write_checkpoint(Path(tmp) / "deepseek-v3-slice", cfg, shard_bytes=1 << 30)
            case = f"synthetic deepseek-v3 slice fp8 {cfg['num_hidden_layers']} layers"
        else:
            ck_dir, case = Path(checkpoint), Path(checkpoint).name
        ctx = mp.get_context("spawn")
        rows_q = ctx.SimpleQueue()
        mp.start_processes(_rank, args=(nproc, str(Path(tmp) / "store"), str(ck_dir), cold, repeats, rows_q),
                           nprocs=nproc, join=True, start_method="spawn")
        per_rank = [rows_q.get() for _ in range(nproc)]
        nbytes = open_checkpoint(ck_dir).total_bytes()
    env = environment(dev)
    mode = "cold" if cold else "warm"
    rows = []
    for label in per_rank[0]["seconds"]:
        times = [max(r["seconds"][label][i] for r in per_rank) for i in range(repeats)]  # the slowest rank
        med = statistics.median(times)
        gbps = nbytes / med / 1e9
        rows.append(dict(env, bench="e2e-group", case=f"{case} tp {nproc} {mode}", provider=label,
                         gbps=round(gbps, 3), ceiling_gbps=None, seconds=round(med, 3),
                         repeats=[round(t, 3) for t in times], checkpoint_bytes=nbytes, nproc=nproc,
                         device=dev.type, bytes_read_per_rank=[r["read"][label] for r in per_rank],
                         note="aggregate: checkpoint bytes / the slowest rank's load; group loads checked bitwise"))
        print(f"  {label:48s} {gbps:7.3f} GB/s aggregate ({nproc} ranks, {mode}); bytes read per rank "
              f"{[round(b / 1e9, 3) for b in rows[-1]['bytes_read_per_rank']]} GB", flush=True)
    if results_path:
        append_rows(results_path, rows)
    return rows


def _rank(rank: int, world: int, store: str, ck_dir: str, cold: bool, repeats: int, rows_q) -> None:
    import torch.distributed as dist

    gpus = torch.cuda.device_count()
    dev = torch.device(f"cuda:{rank}" if gpus >= world else "cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    # a GPU a rank: the exchange runs over NVLink (NCCL); CPU processes use gloo
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world)
    try:
        ck = open_checkpoint(ck_dir)
        files = [str(f) for f in ck.files]
        specs = build_preset(load_config(ck.config_path), parallel=Parallel(rank, world)).targets
        alone, shared = allocate_targets(specs, dev), allocate_targets(specs, dev)
        providers = [("pyloader, every rank reads", alone, None),
                     ("pyloader group (each byte read once)", shared, dist.group.WORLD)]
        seconds = {label: [] for label, _, _ in providers}
        read = {}
        for rnd in range(repeats):
            for label, targets, group in providers[rnd % 2:] + providers[:rnd % 2]:
                if rank == 0:
                    drop_cache(files) if cold else warm(files)
                dist.barrier()
                t = time.perf_counter()
                report = load(targets, ck_dir, tp=(rank, world), progress=False, group=group)
                sync(dev)
                seconds[label].append(time.perf_counter() - t)
                read[label] = report.bytes_read
                dist.barrier()
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
        for name, t in shared.items():  # bit patterns: NaN is equal to itself
            if not torch.equal(t.view(bits[t.element_size()]), alone[name].view(bits[t.element_size()])):
                raise SystemExit(f"rank {rank}: {name} differs between the group load and the rank's own load")
        rows_q.put({"seconds": seconds, "read": read})
    finally:
        dist.destroy_process_group()
