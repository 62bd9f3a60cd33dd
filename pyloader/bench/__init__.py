"""``pyloader bench``: checkpoint → final parameters, measured against the machine's ceilings and
peer loaders in the same run.

With no arguments it writes a synthetic DeepSeek-V3-shaped FP8 checkpoint (real hidden, expert and
attention shapes; fewer experts and layers; several GB on a GPU machine, small on CPU) into a
temporary directory and loads it into preallocated fused BF16 targets. Providers take turns round
by round (the first of each round rotates), the page cache prepared before each load; pyloader's
targets are poisoned before and compared byte for byte with an independent reference (safetensors
and the torch reference) after every load. Rows: ``bench`` = ``e2e``, ``case`` = checkpoint +
warm/cold, ``provider``, ``gbps`` in checkpoint bytes at the median load, ``ceiling_gbps`` =
pinned H2D measured in this run (none on a CPU), with the spread of the loads.
"""

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..format.checkpoint import open_checkpoint
from ..loading.executor import ExecutorConfig
from ..loading.loader import load
from ..ops import reference
from ..routing.plan import build_plan
from ..routing.presets import build_preset, load_config
from ..synthetic import DEEPSEEK_V3_SLICE, allocate_targets, write_checkpoint
from .peers import peer_providers
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




def reference_targets(plan, targets, device) -> Dict[str, torch.Tensor]:
    """What every target must hold, built independently of pyloader's readers and kernels: each
    piece read with the safetensors library and dequantized by the torch reference into its rows
    of a copy of the target (tied targets copied from their source)."""
    from safetensors import safe_open

    expected = {n: torch.zeros_like(t) for n, t in targets.items()}
    handles = {}

    def get(info):
        f = str(info.file)
        if f not in handles:
            handles[f] = safe_open(f, "pt", device=str(device))
        return handles[f].get_tensor(info.name)

    for p in plan.pieces:
        dst = expected[p.target]
        w = get(p.source)
        if p.placement.src_rows is not None and p.placement.src_cols is None and w.dim() >= 1:
            w = w[p.placement.src_rows[0]:p.placement.src_rows[1]]
        if p.placement.src_cols is not None:
            w = w[:, p.placement.src_cols[0]:p.placement.src_cols[1]]
        if p.scale is not None:  # a slice starts inside the whole tensor's block grid
            offset = ((p.placement.src_rows or (0, 0))[0] if p.placement.src_cols is None else 0,
                      (p.placement.src_cols or (0, 0))[0])
            w = reference.dequant_blockwise_torch(w, get(p.scale), torch.empty(w.shape, dtype=dst.dtype, device=device),
                                                  p.block_size, offset)
        else:
            w = w.to(dst.dtype)
        spec = plan.targets[p.target]
        if spec.experts is not None and p.expert_id is None:  # experts stacked in the source: owned slots
            for g, slot in spec.experts.items():
                dst[slot].copy_(w[g])
            continue
        plane = dst[p.slot] if p.slot is not None else dst
        if plane.dim() <= 1:
            plane.reshape(-1)[p.placement.offset:p.placement.offset + w.numel()].copy_(w.reshape(-1))
        else:
            plane[p.placement.offset:p.placement.offset + w.shape[0]].copy_(w.reshape(w.shape[0], *plane.shape[1:]))
    for name, spec in plan.targets.items():
        if spec.fill_from is not None and name in expected:
            expected[name].copy_(expected[spec.fill_from])
    return expected


def mismatches(targets, expected) -> List[str]:
    """Targets whose bytes differ from the expected ones (every byte compared)."""
    return [n for n, t in targets.items() if not torch.equal(t.view(-1).view(torch.uint8),
                                                              expected[n].view(-1).view(torch.uint8))]


def verify(targets, plan, device) -> bool:
    """Every target against the independent reference (:func:`reference_targets`)."""
    return not mismatches(targets, reference_targets(plan, targets, device))


def _poison(targets) -> None:
    for t in targets.values():
        t.view(torch.uint8).fill_(0x5A)


def run_bench(checkpoint: Optional[str] = None, size_gb: Optional[float] = None, preset: Optional[str] = None,
              device: Optional[str] = None, cold: bool = False, peers: bool = True, repeats: int = 3,
              results_path: Optional[str] = None, keep: Optional[str] = None) -> List[dict]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    env = environment(dev)
    tmp = None
    if checkpoint is None:
        size = size_gb if size_gb is not None else (6.0 if dev.type == "cuda" else 0.25)
        cfg = synthetic_config(size, dev)
        tmp = tempfile.TemporaryDirectory(prefix="pyloader-bench-", dir=keep)
        t = time.perf_counter()
        print(f"writing a synthetic DeepSeek-V3-shaped FP8 checkpoint ({cfg['num_hidden_layers']} layers, "
              f"{cfg['n_routed_experts']} experts, about {size:g} GB) into {tmp.name}", flush=True)
        ck_dir = write_checkpoint(Path(tmp.name) / "deepseek-v3-slice", cfg, shard_bytes=4 << 30, progress=True)
        print(f"  written in {time.perf_counter() - t:.1f} s", flush=True)
        case = f"synthetic deepseek-v3 slice fp8 {cfg['num_hidden_layers']} layers"
    else:
        ck_dir = Path(checkpoint)
        case = ck_dir.name
    ck = open_checkpoint(ck_dir)
    pre = build_preset(load_config(ck.config_path), preset)
    plan = build_plan(ck, pre.targets, pre.rules, block_size=pre.block_size)
    files = [str(f) for f in ck.files]
    nbytes = plan.read_bytes
    out_bytes = sum(s.nbytes for s in pre.targets.values() if s.fill_from is None)
    targets = allocate_targets(pre.targets, dev)
    print("building the reference every load is checked against (safetensors + the torch reference) ...", flush=True)
    expected = reference_targets(plan, targets, dev)
    ceiling = pinned_h2d_gbps(dev) if dev.type == "cuda" else None
    mode = "cold" if cold else "warm"
    print(f"{env['gpu']}: checkpoint {nbytes / 1e9:.2f} GB ({len(ck.tensors)} tensors) → {out_bytes / 1e9:.2f} GB BF16; "
          + (f"pinned H2D ceiling {ceiling:.1f} GB/s" if ceiling else "no GPU: no host→device ceiling to measure")
          + f"; {mode} page cache; {repeats} loads a provider, in turns", flush=True)

    def prepare():
        return drop_cache(files) if cold else (warm(files) or "warm")

    providers = _pyloader_providers(targets, expected, ck_dir, preset, dev, cold)
    if peers and dev.type == "cuda":
        providers += peer_providers(files, plan, targets, expected, dev)
    elif peers:
        print("  peer loaders: not measured on a CPU (they load onto a GPU)")
    else:
        print("  peer loaders: not measured (--no-peers)")
    runs = {label: [] for label, _ in providers}
    extras = {label: [] for label, _ in providers}
    for rnd in range(repeats):
        order = providers[rnd % len(providers):] + providers[:rnd % len(providers)]
        for label, fn in order:
            how = prepare()
            try:
                seconds, extra = fn()
            except Exception as e:  # noqa: BLE001 - a peer that fails is reported and dropped; pyloader's failures raise
                if label.startswith("pyloader"):
                    raise
                print(f"  {label:44s} failed: {type(e).__name__}: {str(e)[:200]}: dropped")
                providers = [pr for pr in providers if pr[0] != label]
                continue
            runs[label].append(seconds)
            extras[label].append(dict(extra, cache=how))
            print(f"  round {rnd + 1}/{repeats}  {label:44s} {nbytes / seconds / 1e9:7.2f} GB/s", flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    rows = []
    for label, _ in providers:
        ts = runs[label]
        med = statistics.median(ts)
        k = min(range(len(ts)), key=lambda i: abs(ts[i] - med))  # the phase times of the median load
        extra = extras[label][k]
        gbps = nbytes / med / 1e9
        row = dict(env, bench="e2e", case=f"{case} {mode}", provider=label, gbps=round(gbps, 2),
                   ceiling_gbps=round(ceiling, 2) if ceiling else None,
                   fraction=round(gbps / ceiling, 3) if ceiling else None, seconds=round(med, 3),
                   seconds_min=round(min(ts), 3), seconds_max=round(max(ts), 3), repeats=[round(x, 3) for x in ts],
                   gbps_range=[round(nbytes / max(ts) / 1e9, 2), round(nbytes / min(ts) / 1e9, 2)],
                   checkpoint_bytes=nbytes, bf16_bytes=out_bytes, **extra)
        rows.append(row)
        frac = f"{row['fraction']:.0%} of H2D" if row["fraction"] is not None else "CPU load"
        print(f"  {label:44s} {gbps:7.2f} GB/s median ({row['gbps_range'][0]:.2f}-{row['gbps_range'][1]:.2f}), "
              f"{frac}; {extra.get('note', '')}")
    if results_path:
        append_rows(results_path, rows)
    if tmp is not None:
        tmp.cleanup()
    return rows


def _pyloader_providers(targets, expected, ck_dir, preset, dev, cold):
    """pyloader with its default settings (and, on a GPU, the Python readers and each way of reading
    cold files): each load timed, then every byte of every target checked."""
    def provider(label, cfg_ex):
        def run():
            _poison(targets)  # an element no load writes fails the check below
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
                base = torch.cuda.memory_allocated(dev)
            t = time.perf_counter()
            report = load(targets, ck_dir, preset=preset, progress=False, executor=cfg_ex)
            sync(dev)
            seconds = time.perf_counter() - t
            bad = mismatches(targets, expected)
            if bad:
                raise SystemExit(f"{label}: {len(bad)} targets differ from the reference ({bad[:3]}): "
                                 "not a valid measurement")
            tm = report.timings
            return seconds, dict(
                note="every byte verified after each load",
                peak_device_staging_bytes=(torch.cuda.max_memory_allocated(dev) - base) if dev.type == "cuda" else None,
                peak_rss=report.peak_rss, pinned_bytes=tm.pinned_bytes, readers=report.readers,
                read_threads=tm.read_threads, read_thread_s=round(tm.read_s, 3), wait_read_s=round(tm.wait_read_s, 3),
                h2d_s=round(tm.h2d_s, 3), transform_s=round(tm.transform_s, 3), backend=report.backend,
                executor_wall_s=round(tm.wall_s, 3), executor_setup_s=round(tm.setup_s, 3),
                executor_setup_parts=tm.setup_parts, prepare_parts=tm.prepare_parts, finish_s=round(tm.finish_s, 4),
                drain_s=round(tm.drain_s, 3), outside_executor_s=round(seconds - tm.wall_s, 3),
                cold_files=tm.cold_files)
        return label, run

    out = [provider("pyloader", ExecutorConfig())]
    if dev.type == "cuda":
        out.append(provider("pyloader (readers=python)", ExecutorConfig(readers="python")))
        if cold:
            out += [provider(f"pyloader (cold_reads={how})", ExecutorConfig(cold_reads=how))
                    for how in ("direct", "buffered")]
    return out
