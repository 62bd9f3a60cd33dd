"""``pyloader bench --nproc N``: N local processes load one checkpoint at tensor parallel N, in turns
with each byte read once over the group (``load(group=…)``) and with every rank reading for itself;
the aggregate rate is the checkpoint's bytes over the slowest rank's time. Each group load is checked
bitwise against the same rank's own load. The exchange runs over NCCL when every rank has a GPU of its
own, over gloo otherwise (CPU processes); on GPUs the peers that read once over a group
(fastsafetensors, InstantTensor) run beside, when installed, as raw loads."""

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
                         raw=not label.startswith("pyloader"),
                         note="aggregate: checkpoint bytes / the slowest rank's load; group loads checked bitwise"))
        reads = rows[-1]["bytes_read_per_rank"]
        print(f"  {label:48s} {gbps:7.3f} GB/s aggregate ({nproc} ranks, {mode})" +
              (f"; bytes read per rank {[round(b / 1e9, 3) for b in reads]} GB" if None not in reads else ""),
              flush=True)
    if results_path:
        append_rows(results_path, rows)
    return rows


def multi_gpu_peers(files: List[str], dev: torch.device, rank: int, world: int) -> list:
    """(label, run) of the installed peers that load over a torch.distributed group: fastsafetensors
    (each rank reads a share of the files; every tensor broadcast to every rank, as a TP rank needs
    it) and InstantTensor's distributed safe_open. ``run()`` returns this rank's bytes read (None:
    the peer does not say)."""
    import importlib.util

    import torch.distributed as dist

    out = []
    if importlib.util.find_spec("fastsafetensors") is not None:
        def fastsafetensors_group():
            from fastsafetensors import SafeTensorsFileLoader

            loader = SafeTensorsFileLoader(dist.group.WORLD, f"cuda:{dev.index}", nogds=True, max_threads=16)
            loader.add_filenames({r: files[r::world] for r in range(world)})
            fb = loader.copy_files_to_device()
            for k in loader.get_keys():
                fb.get_tensor(k)
            sync(dev)
            fb.close()
            loader.close()
            return None

        out.append(("fastsafetensors 0.5 group (nogds, broadcast) raw", fastsafetensors_group))
    if importlib.util.find_spec("instanttensor") is not None:
        def instanttensor_group():
            from instanttensor import safe_open as it_open

            with it_open(files, framework="pt", device=dev.index, process_group=dist.group.WORLD, copy=False) as f:
                for _, t in f.tensors():
                    t.view(-1)[:1].clone()  # touch each tensor while it is valid
            return None

        out.append(("InstantTensor 0.2 group raw", instanttensor_group))
    for label in ("fastsafetensors", "InstantTensor"):
        if not any(name.startswith(label) for name, _ in out) and rank == 0:
            print(f"  {label} not installed: its group row is not measured", flush=True)
    return out


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
        def ours(targets, group):
            return lambda: load(targets, ck_dir, tp=(rank, world), progress=False, group=group).bytes_read

        providers = [("pyloader, every rank reads", ours(alone, None)),
                     ("pyloader group (each byte read once)", ours(shared, dist.group.WORLD))]
        if dev.type == "cuda":  # the loaders that read once over a group too (raw bytes: no dequant, fusion or TP slice)
            providers += multi_gpu_peers(files, dev, rank, world)
        seconds = {label: [] for label, _ in providers}
        read = {}
        for rnd in range(repeats):
            for label, run in providers[rnd % 2:] + providers[:rnd % 2]:
                if rank == 0:
                    drop_cache(files) if cold else warm(files)
                dist.barrier()
                t = time.perf_counter()
                read[label] = run()
                sync(dev)
                seconds[label].append(time.perf_counter() - t)
                dist.barrier()
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
        for name, t in shared.items():  # bit patterns: NaN is equal to itself
            if not torch.equal(t.view(bits[t.element_size()]), alone[name].view(bits[t.element_size()])):
                raise SystemExit(f"rank {rank}: {name} differs between the group load and the rank's own load")
        rows_q.put({"seconds": seconds, "read": read})
    finally:
        dist.destroy_process_group()
