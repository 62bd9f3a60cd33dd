"""Assembly of a whole layer's shards into fused parameters: pyloader's one-launch multi-tensor
transform beside what engines do today (a ``copy_`` per tensor, ``torch._foreach_copy_``, a
dequant per expert then a copy), as GB/s (bytes read + written) and a fraction of the device copy
rate measured in the same run.

    python bench/bench_assembly.py [--results FILE] [--quick]

Cases: one Qwen3-30B-A3B MoE layer (128 experts, gate/up [768, 2048], down [2048, 768]) in bf16 and
in FP8 with 128x128 bf16 scales (as Qwen3-FP8 ships them); a DeepSeek-V3-like slice (64 experts of
[2048, 7168] FP8, fp32 scales); a Llama-3-70B layer's qkv (q [8192, 8192], k/v [1024, 8192]) and
gate_up ([28672, 8192] x 2) in bf16; a whole DeepSeek-V4-Flash MoE layer of FP4 experts (256 x
w1/w3 [2048, 4096], w2 [4096, 2048], E8M0 per-32 scales) and a whole Kimi-K2.5 layer of INT4
experts (384 x [2048, 7168] / [7168, 2048], bf16 per-32 scales). Packed cases are checked on a
sample of experts (a full oracle would not fit beside them).
"""

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copy_ceiling_gbps, environment, time_gpu_ms, write_rows  # noqa: E402

from pyloader import ops  # noqa: E402
from pyloader.ops import Shard, reference  # noqa: E402


E2M1_VALUES = None


def _packed_experts(E, M, N, packing, device):
    gen = torch.Generator(device=device).manual_seed(E * M + N)
    if packing == "e2m1":
        w = torch.randint(0, 256, (E, M, N // 2), dtype=torch.uint8, device=device, generator=gen)
        s = torch.randint(115, 135, (E, M, N // 32), dtype=torch.uint8, device=device, generator=gen)
    else:
        w = torch.randint(-2 ** 31, 2 ** 31 - 1, (E, M, N // 8), dtype=torch.int32, device=device, generator=gen)
        s = (torch.rand(E, M, N // 32, device=device, generator=gen) * 1e-2 + 1e-4).to(torch.bfloat16)
    return w, s


def packed_moe_layer(E, I, H, packing):
    """Per-expert w1/w3 [I, H] and w2 [H, I] as packed shards, fused into w13 [E, 2I, H] / w2 [E, H, I]."""
    g, gs = _packed_experts(E, I, H, packing, "cuda")
    u, us = _packed_experts(E, I, H, packing, "cuda")
    d, ds = _packed_experts(E, H, I, packing, "cuda")
    pieces = {"w13": [[(g[e], gs[e], packing), (u[e], us[e], packing)] for e in range(E)],
              "w2": [[(d[e], ds[e], packing)] for e in range(E)]}
    outs = {"w13": torch.empty(E, 2 * I, H, dtype=torch.bfloat16, device="cuda"),
            "w2": torch.empty(E, H, I, dtype=torch.bfloat16, device="cuda")}
    return pieces, outs


def torch_packed_dequant(w, s, packing):
    """What a loader writes by hand: unpack the nibbles, look the codes up, expand the group
    scales to full size, multiply, cast."""
    global E2M1_VALUES
    if E2M1_VALUES is None:
        from pyloader import dtypes

        E2M1_VALUES = torch.tensor(dtypes.E2M1_VALUES, dtype=torch.float32, device=w.device)
    b = w.view(torch.uint8)
    codes = torch.stack([b & 15, b >> 4], dim=-1).flatten(-2).long()
    vals = E2M1_VALUES[codes] if packing == "e2m1" else (codes - 8).to(torch.float32)
    sf = reference.scale_to_float32(s).repeat_interleave(32, dim=-1)
    return (vals * sf).to(torch.bfloat16)


def _fp8_experts(E, M, N, scale_dtype, device):
    w = (torch.randn(E, M, N, device=device) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
    s = (torch.rand(E, -(-M // 128), -(-N // 128), device=device) * 1e-2 + 1e-4).to(scale_dtype)
    return w, s


def qwen3_moe_layer(fp8: bool):
    """Per-expert checkpoint tensors of one layer and the fused w13 [128, 1536, 2048] / w2 [128, 2048, 768]."""
    E, I, H = 128, 768, 2048
    if fp8:
        g, gs = _fp8_experts(E, I, H, torch.bfloat16, "cuda")
        u, us = _fp8_experts(E, I, H, torch.bfloat16, "cuda")
        d, ds = _fp8_experts(E, H, I, torch.bfloat16, "cuda")
        pieces = {"w13": [[(g[e], gs[e], None), (u[e], us[e], None)] for e in range(E)],
                  "w2": [[(d[e], ds[e], None)] for e in range(E)]}
    else:
        g, u, d = (torch.randn(E, *s, device="cuda", dtype=torch.bfloat16) for s in ((I, H), (I, H), (H, I)))
        pieces = {"w13": [[(g[e], None, None), (u[e], None, None)] for e in range(E)],
                  "w2": [[(d[e], None, None)] for e in range(E)]}
    outs = {"w13": torch.empty(E, 2 * I, H, dtype=torch.bfloat16, device="cuda"),
            "w2": torch.empty(E, H, I, dtype=torch.bfloat16, device="cuda")}
    return pieces, outs


def deepseek_slice():
    E, M, N = 64, 2048, 7168
    w, s = _fp8_experts(E, M, N, torch.float32, "cuda")
    return {"w": [[(w[e], s[e], None)] for e in range(E)]}, {"w": torch.empty(E, M, N, dtype=torch.bfloat16, device="cuda")}


def llama70b_layer():
    H, KV, I = 8192, 1024, 28672
    q, k, v = (torch.randn(n, H, device="cuda", dtype=torch.bfloat16) for n in (H, KV, KV))
    gate, up = (torch.randn(I, H, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    # 2-D destinations are treated as a single "expert" plane for uniform handling
    outs = {"qkv": torch.empty(1, H + 2 * KV, H, dtype=torch.bfloat16, device="cuda"),
            "gate_up": torch.empty(1, 2 * I, H, dtype=torch.bfloat16, device="cuda")}
    pieces = {"qkv": [[(q, None, None), (k, None, None), (v, None, None)]],
              "gate_up": [[(gate, None, None), (up, None, None)]]}
    return pieces, outs


CASES = {
    "qwen3-30b-a3b moe layer bf16 (384 tensors)": lambda: qwen3_moe_layer(False),
    "qwen3-30b-a3b moe layer fp8->bf16 (384 tensors, 128x128 bf16 scales)": lambda: qwen3_moe_layer(True),
    "deepseek-v3 slice fp8->bf16 (64 x [2048,7168], fp32 scales)": deepseek_slice,
    "llama-3-70b qkv + gate_up bf16 (5 tensors)": llama70b_layer,
    "deepseek-v4-flash moe layer fp4->bf16 (768 tensors, e8m0 per-32 scales)":
        lambda: packed_moe_layer(256, 2048, 4096, "e2m1"),
    "kimi-k2.5 moe layer int4->bf16 (1152 tensors, bf16 per-32 scales)":
        lambda: packed_moe_layer(384, 2048, 7168, "int4"),
}
QUICK = ["qwen3-30b-a3b moe layer fp8->bf16 (384 tensors, 128x128 bf16 scales)", "llama-3-70b qkv + gate_up bf16 (5 tensors)"]
SAMPLED_EXPERTS = (0, 1, 77, -1)  # packed cases: the experts checked


def _reference_piece(w, s, fmt):
    if fmt is not None:
        return ops.dequant_packed(w, s, fmt, block_size=(1, 32), backend="torch")
    if s is None:
        return w.to(torch.bfloat16)
    return reference.dequant_blockwise_torch(w, s, torch.empty(w.shape, dtype=torch.bfloat16, device="cuda"), (128, 128))


def expected_of(pieces, outs):
    """Oracle: torch reference per piece, concatenated ({name: {expert: plane}}; packed cases: sampled experts)."""
    exp = {}
    for name, per_expert in pieces.items():
        packed = any(fmt is not None for parts in per_expert for _, _, fmt in parts)
        which = sorted({e % len(per_expert) for e in SAMPLED_EXPERTS}) if packed else range(len(per_expert))
        exp[name] = {e: torch.cat([_reference_piece(*piece) for piece in per_expert[e]]) for e in which}
    return exp


def matches(outs, expected) -> bool:
    return all(torch.equal(outs[k][e].view(torch.int16), plane.view(torch.int16))
               for k, planes in expected.items() for e, plane in planes.items())


def _shard(w, s, fmt, amax=None):
    if fmt is None:
        return Shard(w, s, amax=amax)
    return Shard(w, s, (1, 32), packing=fmt, amax=amax)


def providers(kind: str):
    def pyloader(backend, gated=False):
        slots = {}

        def run(pieces, outs):  # the whole layer in one call, as a loader would
            n = sum(len(parts) for per_expert in pieces.values() for parts in per_expert)
            if gated and n not in slots:  # a sanity-gate slot per checkpoint tensor, as the loader keeps them
                slots[n] = torch.zeros(n, 2, device="cuda")
            it = iter(slots[n]) if gated else None
            ops.assemble_layer(experts=[(outs[name], {e: [_shard(*piece, amax=next(it) if gated else None)
                                                          for piece in parts]
                                                      for e, parts in enumerate(per_expert)})
                                        for name, per_expert in pieces.items()], backend=backend)
        return run

    def copy_per_tensor(pieces, outs):
        for name, per_expert in pieces.items():
            for e, parts in enumerate(per_expert):
                r = 0
                for w, _, _ in parts:
                    outs[name][e, r:r + w.shape[0]].copy_(w)
                    r += w.shape[0]

    def foreach_copy(pieces, outs):
        dsts, srcs = [], []
        for name, per_expert in pieces.items():
            for e, parts in enumerate(per_expert):
                r = 0
                for w, _, _ in parts:
                    dsts.append(outs[name][e, r:r + w.shape[0]])
                    srcs.append(w)
                    r += w.shape[0]
        torch._foreach_copy_(dsts, srcs)

    def dequant_per_expert(dequant):
        def run(pieces, outs):
            for name, per_expert in pieces.items():
                for e, parts in enumerate(per_expert):
                    r = 0
                    for w, s, fmt in parts:
                        outs[name][e, r:r + w.shape[0]].copy_(dequant(w, s, fmt))
                        r += w.shape[0]
        return run

    p = {"pyloader_cuda": pyloader("cuda"), "pyloader_triton": pyloader("triton")}
    if kind != "bf16":  # the sanity gate's maxima computed in the same launch
        p["pyloader_cuda_gated"] = pyloader("cuda", gated=True)
    if kind == "packed":
        # what loaders write by hand for FP4/INT4 experts, one expert at a time, then a copy
        p["dequant_per_expert_torch_then_copy"] = dequant_per_expert(torch_packed_dequant)
        p["dequant_per_expert_pyloader_cuda_then_copy"] = dequant_per_expert(
            lambda w, s, fmt: ops.dequant_packed(w, s, fmt, block_size=(1, 32), backend="cuda"))
    elif kind == "fp8":
        # vLLM/SGLang-style: a torch dequant with expanded fp32 scales per expert, then a copy
        p["dequant_per_expert_torch_then_copy"] = dequant_per_expert(
            lambda w, s, fmt: reference.dequant_expanded_scales_torch(w, s, (128, 128)))
        # pyloader's own dequant, still one launch per tensor: isolates the launch-count effect
        p["dequant_per_expert_pyloader_cuda_then_copy"] = dequant_per_expert(
            lambda w, s, fmt: ops.dequant_blockwise(w, s, backend="cuda"))
    else:
        p["copy_per_tensor"] = copy_per_tensor
        p["torch_foreach_copy"] = foreach_copy
    return p


def case_bytes(pieces, outs):
    read = sum(w.numel() * w.element_size() + (s.numel() * s.element_size() if s is not None else 0)
               for per_expert in pieces.values() for parts in per_expert for w, s, _ in parts)
    return read + sum(o.numel() * o.element_size() for o in outs.values())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", help="append the result rows to this JSON-lines results log")
    ap.add_argument("--quick", action="store_true", help="two cases only")
    ap.add_argument("--only", help="the cases whose names contain this text")
    ap.add_argument("--providers", help="the providers whose names start with one of these (comma-separated)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: run on the device machine")
    env = environment()
    ceiling = copy_ceiling_gbps()
    print(f"{env['gpu']}  copy ceiling {ceiling:.0f} GB/s  commit {env['commit']}")
    import triton.testing

    rows = []
    cases = [c for c in (QUICK if args.quick else CASES) if args.only is None or args.only in c]
    for case in cases:
        pieces, outs = CASES[case]()
        pieces_flat = [piece for per_expert in pieces.values() for parts in per_expert for piece in parts]
        kind = ("packed" if any(fmt for _, _, fmt in pieces_flat) else
                "fp8" if any(s is not None for _, s, _ in pieces_flat) else "bf16")
        nbytes = case_bytes(pieces, outs)
        tensors = sum(len(parts) for per_expert in pieces.values() for parts in per_expert)
        expected = expected_of(pieces, outs)
        wanted = tuple(args.providers.split(",")) if args.providers else ("",)
        for name, fn in ((n, f) for n, f in providers(kind).items() if n.startswith(wanted)):
            for o in outs.values():
                o.fill_(float("nan"))
            fn(pieces, outs)
            exact = matches(outs, expected)
            if name.startswith("pyloader") and not exact:
                raise SystemExit(f"{name} differs from the reference on {case}: refusing to time it")
            call = functools.partial(fn, pieces, outs)  # bound now: the loop rebinds pieces and outs
            ms, timing = time_gpu_ms([call])
            # Also end to end from Python (job-table packing and launch overhead included).
            ms_eager = triton.testing.do_bench(call, warmup=5, rep=200, return_mode="median")
            gbps, gbps_eager = nbytes / (ms * 1e-3) / 1e9, nbytes / (ms_eager * 1e-3) / 1e9
            rows.append(dict(env, bench="assembly", case=case, provider=name, gbps=round(gbps, 1),
                             ceiling_gbps=round(ceiling, 1), fraction=round(gbps / ceiling, 3), ms=round(ms, 4),
                             gbps_eager=round(gbps_eager, 1), ms_eager=round(ms_eager, 4), bytes=nbytes,
                             tensors=tensors, bitwise_equal_to_reference=exact, timing=timing))
            print(f"  {case[:44]:44s} {name:44s} {gbps:8.1f} GB/s {gbps / ceiling:6.1%}  eager {gbps_eager:8.1f} GB/s"
                  f"  ({timing})")
        loop = [r for r in rows if r["case"] == case and r["provider"].startswith(("dequant_per_expert_torch",
                                                                                  "copy_per_tensor"))]
        for r in rows:
            if r["case"] == case and loop:  # eager: each called from Python as a loader would; graph: device time only
                r["speedup_vs_per_tensor_loop"] = round(loop[0]["ms_eager"] / r["ms_eager"], 2)
                r["speedup_vs_per_tensor_loop_graph"] = round(loop[0]["ms"] / r["ms"], 2)
        del pieces, outs, expected
        torch.cuda.empty_cache()
    write_rows(rows, args.results)


if __name__ == "__main__":
    main()
