"""``pyloader bench``: checkpoint → final parameters, measured against the machine's ceilings and
peer loaders in the same run.

With no arguments it writes a synthetic DeepSeek-V3-shaped FP8 checkpoint (real hidden, expert and
attention shapes; fewer experts and layers; several GB on a GPU machine, small on CPU) into a
temporary directory and loads it into preallocated fused BF16 targets. Rows use the kernel
benchmarks' format: ``bench`` = ``e2e``, ``case`` = checkpoint + warm/cold, ``provider``,
``gbps`` in checkpoint bytes, ``ceiling_gbps`` = pinned H2D measured in this run.
"""

import json
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import torch

from ..format.checkpoint import open_checkpoint
from ..loading.executor import ExecutorConfig
from ..loading.loader import load
from ..ops import reference
from ..routing.plan import build_plan
from ..routing.presets import build_preset, load_config
from ..synthetic import DEEPSEEK_V3_SLICE, allocate_targets, write_checkpoint
from .peers import run_peers
from .results import append_rows, drop_cache, environment, pinned_h2d_gbps, sync, warm


def synthetic_config(size_gb: float, device: torch.device) -> dict:
    """DeepSeek-V3 shapes; expert count and layers scaled to about ``size_gb`` of checkpoint."""
    c = json.loads(json.dumps(DEEPSEEK_V3_SLICE))
    c["vocab_size"] = 16384  # keeps the BF16 embedding/head a small share, as in the real model
    if device.type != "cuda":
        c.update(hidden_size=1024, intermediate_size=2048, moe_intermediate_size=256, n_routed_experts=8,
                 num_attention_heads=8, num_key_value_heads=8, q_lora_rank=384, vocab_size=4096)
    H, I, E = c["hidden_size"], c["moe_intermediate_size"], c["n_routed_experts"]
    moe_layer = (3 * E + 3) * I * H  # FP8 bytes of one MoE layer's experts and shared expert
    attn = 1536 * H + c["num_attention_heads"] * 192 * 1536 + 576 * H + c["num_attention_heads"] * 256 * 512 + \
        H * c["num_attention_heads"] * 128
    layers = max(2, round(size_gb * 1e9 / (moe_layer + attn)))
    c["num_hidden_layers"] = layers
    return c


def verify(targets, plan, device) -> bool:
    """A sample of targets against an independent reference (safetensors + torch reference)."""
    from safetensors import safe_open

    names = sorted({p.target for p in plan.pieces})
    sample = names[:: max(1, len(names) // 12)]
    handles = {}
    for t in sample:
        for p in [q for q in plan.pieces if q.target == t][:4]:
            f = str(p.source.file)
            if f not in handles:
                handles[f] = safe_open(f, "pt", device=str(device))
            w = handles[f].get_tensor(p.source.name)
            if p.scale is not None:
                s = safe_open(str(p.scale.file), "pt", device=str(device)).get_tensor(p.scale.name)
                w = reference.dequant_blockwise_torch(w, s, torch.empty(w.shape, dtype=targets[t].dtype, device=device),
                                                      p.block_size)
            else:
                w = w.to(targets[t].dtype)
            plane = targets[t][p.slot] if p.slot is not None else targets[t]
            got = plane[p.placement.offset:p.placement.offset + p.placement.size] if plane.dim() else plane
            if not torch.equal(got.reshape(-1).view(torch.uint8), w.reshape(-1).view(torch.uint8)):
                return False
    return True


def run_bench(checkpoint: Optional[str] = None, size_gb: Optional[float] = None, preset: Optional[str] = None,
              device: Optional[str] = None, cold: bool = False, peers: bool = True, repeats: int = 3,
              results_path: Optional[str] = None, keep: Optional[str] = None) -> List[dict]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    env = environment(dev)
    tmp = None
    if checkpoint is None:
        size = size_gb if size_gb is not None else (6.0 if dev.type == "cuda" else 0.3)
        cfg = synthetic_config(size, dev)
        tmp = tempfile.TemporaryDirectory(prefix="pyloader-bench-", dir=keep)
        t = time.perf_counter()
        ck_dir = write_checkpoint(Path(tmp.name) / "deepseek-v3-slice", cfg, shard_bytes=4 << 30)
        print(f"wrote a synthetic DeepSeek-V3-shaped FP8 checkpoint ({cfg['num_hidden_layers']} layers, "
              f"{cfg['n_routed_experts']} experts) in {time.perf_counter() - t:.1f} s")
        case = f"synthetic deepseek-v3 slice fp8 {cfg['num_hidden_layers']} layers"
    else:
        ck_dir = Path(checkpoint)
        case = ck_dir.name
    ck = open_checkpoint(ck_dir)
    config = load_config(ck.config_path)
    pre = build_preset(config, preset)
    plan = build_plan(ck, pre.targets, pre.rules, block_size=pre.block_size)
    files = [str(f) for f in ck.files]
    nbytes = plan.read_bytes
    out_bytes = sum(s.nbytes for s in pre.targets.values() if s.fill_from is None)
    targets = allocate_targets(pre.targets, dev)
    ceiling = pinned_h2d_gbps(dev) if dev.type == "cuda" else 0.0
    mode = "cold" if cold else "warm"
    print(f"{env['gpu']}  checkpoint {nbytes / 1e9:.2f} GB ({len(ck.tensors)} tensors) → {out_bytes / 1e9:.2f} GB BF16; "
          f"pinned H2D ceiling {ceiling:.1f} GB/s; {mode} page cache")
    rows = []

    def record(provider, seconds, note="", **extra):
        gbps = nbytes / seconds / 1e9
        row = dict(env, bench="e2e", case=f"{case} {mode}", provider=provider, gbps=round(gbps, 2),
                   ceiling_gbps=round(ceiling, 2), fraction=round(gbps / ceiling, 3) if ceiling else None,
                   seconds=round(seconds, 3), checkpoint_bytes=nbytes, bf16_bytes=out_bytes,
                   bf16_gbps=round(out_bytes / seconds / 1e9, 2), note=note, **extra)
        rows.append(row)
        frac = f"{row['fraction']:.0%} of H2D" if row["fraction"] is not None else "no H2D on CPU"
        print(f"  {provider:44s} {gbps:7.2f} GB/s  ({frac})  {seconds:6.2f} s  {note}")

    def prepare():
        if cold:
            return drop_cache(files)
        warm(files)
        return "warm"

    bench_pyloader(repeats, targets, ck_dir, preset, dev, prepare, plan, record)
    if dev.type == "cuda":  # the Python readers, in the same run
        bench_pyloader(repeats, targets, ck_dir, preset, dev, prepare, plan, record, readers="python")
    if cold and dev.type == "cuda":  # each way of reading cold files (auto is one of them)
        for how_cold in ("direct", "buffered"):
            bench_pyloader(repeats, targets, ck_dir, preset, dev, prepare, plan, record, how_cold)
    if peers and dev.type == "cuda":
        run_peers(files, plan, targets, dev, prepare, record, repeats)
    if results_path:
        append_rows(results_path, rows)
    if tmp is not None:
        tmp.cleanup()
    return rows


def bench_pyloader(repeats, targets, ck_dir, preset, dev, prepare, plan, record, cold_reads="auto", readers="auto"):
    times, how = [], ""
    cfg_ex = ExecutorConfig(cold_reads=cold_reads, readers=readers)
    for t in targets.values():  # poison: an unwritten element fails the verification below
        t.view(torch.uint8).fill_(0x5A)
    for _ in range(repeats):
        how = prepare()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        t = time.perf_counter()
        report = load(targets, ck_dir, preset=preset, progress=False, executor=cfg_ex)
        sync(dev)
        times.append(time.perf_counter() - t)
        if times[-1] == min(times):  # the phase times reported are those of the best load
            best = report
    ok = verify(targets, plan, dev)
    peak = (torch.cuda.max_memory_allocated(dev) - base) if dev.type == "cuda" else None
    report, tm = best, best.timings
    opts = [f"cold_reads={cold_reads}"] * (cold_reads != "auto") + [f"readers={readers}"] * (readers != "auto")
    label = "pyloader" + (f" ({', '.join(opts)})" if opts else "")
    record(label, min(times), f"{'verified' if ok else 'MISMATCH'}; {how}",
           repeats=[round(x, 3) for x in times], peak_device_staging_bytes=peak,
           pinned_bytes=report.timings.pinned_bytes, readers=report.readers, read_threads=report.timings.read_threads,
           read_thread_s=round(tm.read_s, 3), wait_read_s=round(tm.wait_read_s, 3), h2d_s=round(tm.h2d_s, 3),
           transform_s=round(tm.transform_s, 3), backend=report.backend,
           executor_wall_s=round(tm.wall_s, 3), executor_setup_s=round(tm.setup_s, 3),
           executor_setup_parts=tm.setup_parts, prepare_parts=tm.prepare_parts, finish_s=round(tm.finish_s, 4),
           drain_s=round(tm.drain_s, 3),
           outside_executor_s=round(min(times) - tm.wall_s, 3), cold_files=tm.cold_files)
    if not ok:
        raise SystemExit("pyloader result differs from the reference: not a valid measurement")


