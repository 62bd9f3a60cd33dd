"""Refit: BF16 buckets of trainer tensors into a rollout model's parameters, BF16 or requantized to
block FP8, as GB/s of BF16 bytes received, beside the device copy ceiling (bytes copied a second,
half the read + write rate) measured in the same run and the per-tensor loop engines run today:
route each name, ``copy_`` it into its slice of the fused parameter (and, for FP8, quantize it with
its own kernel call first, then copy the result and its scales in).

    python bench/bench_refit.py [--case qwen3-30b-a3b|deepseek-v3-slice] [--layers N] [--repeats 7] [--results FILE]

The host probe (``--no-host-probe`` skips it) refits the whole 48-layer Qwen3-30B-A3B tensor list
(every name, layer-bucketed) with small shapes: the same tensors, jobs and kernel calls as the real
model, so its ``host_ms`` is the real model's per-step Python time, measured, without its 61 GB.

Each step is timed whole (wall clock from the call to the device being done, host overhead
included), median of ``--repeats``; ``host_ms`` is the Python time of a step before its final
sync. Sender and receiver share the buckets (what CUDA IPC gives two processes). Every provider's
result is checked against the refitter's (bitwise).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copy_ceiling_gbps, environment, print_table, write_rows  # noqa: E402

from pyloader.ops.quantize import quantize_blockwise  # noqa: E402
from pyloader.refit import BucketLayout, Refitter, Sender  # noqa: E402
from pyloader.refit.refitter import scale_rows  # noqa: E402
from pyloader.routing.presets import build_preset  # noqa: E402
from pyloader.synthetic import allocate_targets, trainer_tensors, with_fp8_weights  # noqa: E402

CASES = {
    "qwen3-30b-a3b": {"model_type": "qwen3_moe", "hidden_size": 2048, "moe_intermediate_size": 768,
                      "intermediate_size": 6144, "num_experts": 128, "num_attention_heads": 32,
                      "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936, "num_hidden_layers": 48,
                      "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
    # 64 of DeepSeek-V3's 256 routed experts: a layer of them fits beside its buckets and oracle
    "deepseek-v3-slice": {"model_type": "deepseek_v3", "hidden_size": 7168, "intermediate_size": 18432,
                          "moe_intermediate_size": 2048, "n_routed_experts": 64, "n_shared_experts": 1,
                          "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536,
                          "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
                          "first_k_dense_replace": 1, "num_hidden_layers": 61, "vocab_size": 129280,
                          "topk_method": "noaux_tc", "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
}


def rollout_params(c, device, fp8):
    params = allocate_targets(build_preset(c).targets, device)
    return with_fp8_weights(params) if fp8 else params


def per_tensor_loop(refitter, trainer, params, fp8):
    """What a ``load_weights`` does with each received tensor: find its destination (the routing
    a model's Python does per name), copy it there; FP8: quantize it alone first."""
    router_pieces = {}
    for p in refitter.plan.pieces:
        router_pieces.setdefault(p.source.name, []).append(p)
    from pyloader.loading.batching import piece_jobs
    from pyloader.loading.sources import source_rows

    def step():
        for name, t in trainer.items():
            for p in router_pieces.get(name, ()):
                spec = refitter.plan.targets[p.target]
                for job in piece_jobs(p, source_rows(p, t), 0, params[p.target], {}, spec.experts):
                    if p.transform == "requant":
                        q, s = quantize_blockwise(job.src)
                        job.dst.copy_(q)
                        scale_rows(params[p.target], params[refitter.scale_of[p.target]], job.dst, refitter.block).copy_(s)
                    else:
                        job.dst.copy_(job.src)
    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=sorted(CASES), action="append")
    ap.add_argument("--layers", type=int, help="decoder layers (default: 8 for qwen3-30b-a3b, 2 for the DeepSeek slice)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--results")
    ap.add_argument("--no-host-probe", dest="host_probe", action="store_false")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment()
    ceiling = copy_ceiling_gbps() / 2 if dev.type == "cuda" else None
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rows = []
    for case in args.case or sorted(CASES):
        c = dict(CASES[case], num_hidden_layers=args.layers or (8 if case == "qwen3-30b-a3b" else 2))
        if dev.type == "cpu":
            c.update(num_hidden_layers=1, vocab_size=1024, num_experts=8, n_routed_experts=8)
        trainer = trainer_tensors(c, dev)
        layout = BucketLayout.of(trainer, per_layer=True)
        sender = Sender(layout, dev)
        sender.pack(trainer, 1)
        nbytes = layout.payload_bytes
        label = f"{case} ({c['num_hidden_layers']} layers, {layout.num_buckets} buckets, {nbytes / 1e9:.2f} GB)"
        print(f"{env.get('gpu')}: {label}; copy ceiling {ceiling or 0:.0f} GB/s", flush=True)
        for fp8 in (False, True):
            params = rollout_params(c, dev, fp8)
            oracle = None
            for verify in (True, False):
                refitter = Refitter(params, layout, sender.buckets, config=c, verify=verify)
                times, host = [], []
                for v in range(args.repeats):
                    t = time.perf_counter()
                    report = refitter.step(1)
                    times.append(time.perf_counter() - t)
                    host.append(report.host_seconds)
                if oracle is None:
                    oracle = {n: x.clone() for n, x in params.items()}
                rows.append(_row(env, label, f"pyloader refit{' (checksums)' if verify else ''}", fp8, nbytes, times,
                                 ceiling, host_ms=round(statistics.median(host) * 1e3, 3),
                                 kernel_calls=refitter.kernel_calls))
            loop = per_tensor_loop(refitter, trainer, params, fp8)
            times = []
            for _ in range(max(2, args.repeats // 2)):
                t = time.perf_counter()
                loop()
                sync()
                times.append(time.perf_counter() - t)
            bad = [n for n in params if not torch.equal(params[n].view(torch.uint8), oracle[n].view(torch.uint8))]
            if bad:
                raise SystemExit(f"{case}: the per-tensor loop and the refit differ on {bad[:3]}")
            rows.append(_row(env, label, "per-tensor loop" + (" + quantize each" if fp8 else ""), fp8, nbytes, times,
                             ceiling))
            del params, oracle
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    if args.host_probe:
        rows += host_probe(env, dev, args.repeats)
    print_table(rows, ["case", "provider", "gbps", "fraction", "ms", "host_ms"])
    write_rows(rows, args.results)


def host_probe(env, dev, repeats):
    """Per-step host time of the whole 48-layer Qwen3-30B-A3B tensor list, small shapes."""
    c = dict(CASES["qwen3-30b-a3b"], hidden_size=256, moe_intermediate_size=128, intermediate_size=512,
             num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=1024)
    trainer = trainer_tensors(c, dev)
    layout = BucketLayout.of(trainer, per_layer=True)
    sender = Sender(layout, dev)
    sender.pack(trainer, 1)
    rows = []
    label = f"qwen3-30b-a3b host probe (48 layers, {len(trainer)} tensors, {layout.num_buckets} buckets, small shapes)"
    for fp8 in (False, True):
        params = rollout_params(c, dev, fp8)
        for verify in (False, True):
            refitter = Refitter(params, layout, sender.buckets, config=c, verify=verify)
            times, host = [], []
            for _ in range(repeats):
                t = time.perf_counter()
                report = refitter.step(1)
                times.append(time.perf_counter() - t)
                host.append(report.host_seconds)
            rows.append(_row(env, label, f"pyloader refit{' (checksums)' if verify else ''}", fp8,
                             layout.payload_bytes, times, None, host_ms=round(statistics.median(host) * 1e3, 3),
                             kernel_calls=refitter.kernel_calls))
    return rows


def _row(env, label, provider, fp8, nbytes, times, ceiling, **extra):
    med = statistics.median(times)
    gbps = nbytes / med / 1e9
    return dict(env, bench="refit", case=f"{label} -> {'fp8' if fp8 else 'bf16'}", provider=provider,
                gbps=round(gbps, 2), ceiling_gbps=round(ceiling, 1) if ceiling else None,
                fraction=round(gbps / ceiling, 3) if ceiling else None, ms=round(med * 1e3, 2),
                ms_range=[round(min(times) * 1e3, 2), round(max(times) * 1e3, 2)], payload_bytes=nbytes, **extra)


if __name__ == "__main__":
    main()
