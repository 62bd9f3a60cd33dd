"""``pyloader bench``: checkpoint → final parameters, measured against the machine's ceilings and
peer loaders in the same run.

With no arguments it writes a synthetic DeepSeek-V3-shaped FP8 checkpoint (real hidden, expert and
attention shapes; fewer experts and layers; several GB on a GPU machine, small on CPU) into a
temporary directory and loads it into preallocated fused BF16 targets. Rows use the kernel
benchmarks' format: ``bench`` = ``e2e``, ``case`` = checkpoint + warm/cold, ``provider``,
``gbps`` in checkpoint bytes, ``ceiling_gbps`` = pinned H2D measured in this run.
"""

import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from . import reference
from .checkpoint import open_checkpoint
from .executor import ExecutorConfig, piece_jobs
from .plan import build_plan
from .presets import build_preset, load_config
from .synthetic import DEEPSEEK_V3_SLICE, allocate_targets, write_checkpoint


def _environment(device: torch.device) -> dict:
    env = {"commit": os.environ.get("PYLOADER_COMMIT", "unknown"), "torch": torch.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "host_cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine()}
    env["gpu"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (cpu)"
    return env


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


def _drop_cache(paths) -> str:
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


def _warm(paths):
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


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _verify(targets, plan, device) -> bool:
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
              json_path: Optional[str] = None, keep: Optional[str] = None) -> List[dict]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    env = _environment(dev)
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
            return _drop_cache(files)
        _warm(files)
        return "warm"

    _bench_pyloader("auto", repeats, targets, ck_dir, preset, dev, prepare, plan, record)
    if dev.type == "cuda":  # the other ways of reading, in the same run
        _bench_pyloader("mmap", repeats, targets, ck_dir, preset, dev, prepare, plan, record)
        _bench_pyloader("pread", repeats, targets, ck_dir, preset, dev, prepare, plan, record, readers="python")
    if cold and dev.type == "cuda":  # each way of reading cold files (auto is one of them)
        for how_cold in ("direct", "buffered"):
            _bench_pyloader("pread", repeats, targets, ck_dir, preset, dev, prepare, plan, record, how_cold)
    if peers and dev.type == "cuda":
        _peers(files, plan, targets, dev, prepare, record, repeats)
    if json_path:
        p = Path(json_path)
        existing = json.loads(p.read_text()) if p.exists() else []
        p.write_text(json.dumps(existing + rows, indent=1) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return rows


def _bench_pyloader(io, repeats, targets, ck_dir, preset, dev, prepare, plan, record, cold_reads="auto",
                    readers="auto"):
    from .loader import load

    times, how = [], ""
    cfg_ex = ExecutorConfig(io=io, cold_reads=cold_reads, readers=readers)
    for t in targets.values():  # poison: an unwritten element fails the verification below
        t.view(torch.uint8).fill_(0x5A)
    for _ in range(repeats):
        how = prepare()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        t = time.perf_counter()
        report = load(targets, ck_dir, preset=preset, progress=False, executor=cfg_ex)
        _sync(dev)
        times.append(time.perf_counter() - t)
        if times[-1] == min(times):  # the phase times reported are those of the best load
            best = report
    ok = _verify(targets, plan, dev)
    peak = (torch.cuda.max_memory_allocated(dev) - base) if dev.type == "cuda" else None
    report, tm = best, best.timings
    label = f"pyloader (io={io}" + (f", cold_reads={cold_reads}" if cold_reads != "auto" else "") \
        + (f", readers={readers}" if readers != "auto" else "") + ")"
    record(label, min(times), f"{'verified' if ok else 'MISMATCH'}; {how}",
           repeats=[round(x, 3) for x in times], peak_device_staging_bytes=peak,
           pinned_bytes=report.timings.pinned_bytes, readers=report.readers, read_threads=report.timings.read_threads,
           read_thread_s=round(tm.read_s, 3), wait_read_s=round(tm.wait_read_s, 3), h2d_s=round(tm.h2d_s, 3),
           transform_s=round(tm.transform_s, 3), backend=report.backend, io_used=report.io,
           executor_wall_s=round(tm.wall_s, 3), executor_setup_s=round(tm.setup_s, 3),
           executor_setup_parts=tm.setup_parts, prepare_parts=tm.prepare_parts, finish_s=round(tm.finish_s, 4),
           drain_s=round(tm.drain_s, 3),
           outside_executor_s=round(min(times) - tm.wall_s, 3), cold_files=tm.cold_files)
    if not ok:
        raise SystemExit("pyloader result differs from the reference: not a valid measurement")


def fastsafetensors_load_raw(files, dev) -> None:
    """fastsafetensors 0.5 without GDS (16 threads): every file to the device, every tensor made."""
    from fastsafetensors import SafeTensorsFileLoader

    loader = SafeTensorsFileLoader(None, f"cuda:{dev.index or 0}", nogds=True, max_threads=16)
    loader.add_filenames({0: files})
    fb = loader.copy_files_to_device()
    for k in loader.get_keys():
        fb.get_tensor(k)
    _sync(dev)
    fb.close()
    loader.close()


def _peers(files, plan, targets, dev, prepare, record, repeats: int = 1):
    """Each peer as often as pyloader (best of ``repeats``, the page cache prepared before each)."""
    from safetensors import safe_open

    def best(label, fn):
        times, how = [], ""
        for _ in range(max(1, repeats)):
            how = prepare()
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        record(label, min(times), how, repeats=[round(x, 3) for x in times])

    def safetensors_raw():
        out = []
        for f in files:
            with safe_open(f, "pt", device=str(dev)) as h:
                for k in h.keys():
                    out.append(h.get_tensor(k))
        _sync(dev)
        return out

    best("safetensors safe_open(device=cuda) raw", safetensors_raw)

    def safetensors_engine_style():
        # What engines do today: raw tensors, then a torch dequant (expanded fp32 scales) and a copy_ per tensor.
        handles = {f: safe_open(f, "pt", device=str(dev)) for f in files}
        for p in plan.pieces:
            w = handles[str(p.source.file)].get_tensor(p.source.name)
            s = handles[str(p.scale.file)].get_tensor(p.scale.name) if p.scale is not None else None
            jobs = piece_jobs(p, w, 0, targets[p.target], {p.scale.name: s} if s is not None else {},
                              plan.targets[p.target].experts)
            for j in jobs:
                if j.scale is not None:
                    j.dst.copy_(reference.dequant_expanded_scales_torch(j.src, j.scale, j.block_size))
                else:
                    j.dst.copy_(j.src)
        _sync(dev)

    best("safetensors + per-tensor torch dequant + copy_", safetensors_engine_style)
    dst: Dict[str, torch.Tensor] = {}

    def into_preallocated(name, t):
        d = dst.get(name)
        if d is None:
            d = dst[name] = torch.empty(t.shape, dtype=t.dtype, device=dev)
        d.copy_(t)  # the peer may reuse its buffer: copy before advancing

    def fastsafetensors_raw():
        fastsafetensors_load_raw(files, dev)

    def runai_raw():
        from runai_model_streamer import SafetensorsStreamer

        with SafetensorsStreamer() as s:
            s.stream_files(files)
            for name, t in s.get_tensors():
                into_preallocated(name, t)
        _sync(dev)

    def instanttensor_raw(buffered):
        from instanttensor import BackendPolicy, safe_open as it_open

        kw = {"backend": BackendPolicy.BUFFERED} if buffered else {}
        with it_open(files, framework="pt", device=dev.index or 0, copy=False, **kw) as f:
            for name, t in f.tensors():
                into_preallocated(name, t)
        _sync(dev)

    for label, module, fn in (("fastsafetensors 0.5 (nogds) raw", "fastsafetensors", fastsafetensors_raw),
                              ("run:ai streamer raw (copy to preallocated)", "runai_model_streamer", runai_raw),
                              ("InstantTensor buffered raw", "instanttensor", lambda: instanttensor_raw(True)),
                              ("InstantTensor default raw", "instanttensor", lambda: instanttensor_raw(False))):
        try:
            __import__(module)
        except ImportError:
            print(f"  {label:44s} not installed: not measured")
            continue
        try:
            best(label, fn)  # the peer's destination tensors are allocated in its first run, reused after
        except Exception as e:  # noqa: BLE001 - a peer that fails is reported, the others still run
            print(f"  {label:44s} failed: {type(e).__name__}: {str(e)[:200]}")
        dst.clear()
        torch.cuda.empty_cache()
