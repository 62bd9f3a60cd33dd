"""Assembly of a whole layer's shards into fused parameters: pyloader's one-launch multi-tensor
transform beside what engines do today (a ``copy_`` per tensor, ``torch._foreach_copy_``, a
dequant per expert then a copy), as GB/s (bytes read + written) and a fraction of the device copy
rate measured in the same run.

    python bench/bench_assembly.py [--results FILE] [--quick]

Cases: one Qwen3-30B-A3B MoE layer (128 experts, gate/up [768, 2048], down [2048, 768]) in bf16 and
in FP8 with 128x128 bf16 scales (as Qwen3-FP8 ships them); a DeepSeek-V3-like slice (64 experts of
[2048, 7168] FP8, fp32 scales); a Llama-3-70B layer's qkv (q [8192, 8192], k/v [1024, 8192]) and
gate_up ([28672, 8192] x 2) in bf16.
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
        pieces = {"w13": [[(g[e], gs[e]), (u[e], us[e])] for e in range(E)], "w2": [[(d[e], ds[e])] for e in range(E)]}
    else:
        g, u, d = (torch.randn(E, *s, device="cuda", dtype=torch.bfloat16) for s in ((I, H), (I, H), (H, I)))
        pieces = {"w13": [[(g[e], None), (u[e], None)] for e in range(E)], "w2": [[(d[e], None)] for e in range(E)]}
    outs = {"w13": torch.empty(E, 2 * I, H, dtype=torch.bfloat16, device="cuda"),
            "w2": torch.empty(E, H, I, dtype=torch.bfloat16, device="cuda")}
    return pieces, outs


def deepseek_slice():
    E, M, N = 64, 2048, 7168
    w, s = _fp8_experts(E, M, N, torch.float32, "cuda")
    return {"w": [[(w[e], s[e])] for e in range(E)]}, {"w": torch.empty(E, M, N, dtype=torch.bfloat16, device="cuda")}


def llama70b_layer():
    H, KV, I = 8192, 1024, 28672
    q, k, v = (torch.randn(n, H, device="cuda", dtype=torch.bfloat16) for n in (H, KV, KV))
    gate, up = (torch.randn(I, H, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    # 2-D destinations are treated as a single "expert" plane for uniform handling
    outs = {"qkv": torch.empty(1, H + 2 * KV, H, dtype=torch.bfloat16, device="cuda"),
            "gate_up": torch.empty(1, 2 * I, H, dtype=torch.bfloat16, device="cuda")}
    pieces = {"qkv": [[(q, None), (k, None), (v, None)]], "gate_up": [[(gate, None), (up, None)]]}
    return pieces, outs


CASES = {
    "qwen3-30b-a3b moe layer bf16 (384 tensors)": lambda: qwen3_moe_layer(False),
    "qwen3-30b-a3b moe layer fp8->bf16 (384 tensors, 128x128 bf16 scales)": lambda: qwen3_moe_layer(True),
    "deepseek-v3 slice fp8->bf16 (64 x [2048,7168], fp32 scales)": deepseek_slice,
    "llama-3-70b qkv + gate_up bf16 (5 tensors)": llama70b_layer,
}
QUICK = ["qwen3-30b-a3b moe layer fp8->bf16 (384 tensors, 128x128 bf16 scales)", "llama-3-70b qkv + gate_up bf16 (5 tensors)"]


def expected_of(pieces, outs):
    """Oracle: torch reference per piece, concatenated."""
    exp = {}
    for name, per_expert in pieces.items():
        planes = []
        for parts in per_expert:
            cols = []
            for w, s in parts:
                if s is None:
                    cols.append(w.to(torch.bfloat16))
                else:
                    cols.append(reference.dequant_blockwise_torch(w, s, torch.empty(w.shape, dtype=torch.bfloat16,
                                                                                    device="cuda"), (128, 128)))
            planes.append(torch.cat(cols))
        exp[name] = torch.stack(planes)
    return exp


def providers(fp8: bool):
    def pyloader(backend):
        def run(pieces, outs):  # the whole layer in one call, as a loader would
            ops.assemble_layer(experts=[(outs[name], {e: [Shard(w, s) for w, s in parts] for e, parts in enumerate(per_expert)})
                                        for name, per_expert in pieces.items()], backend=backend)
        return run

    def copy_per_tensor(pieces, outs):
        for name, per_expert in pieces.items():
            for e, parts in enumerate(per_expert):
                r = 0
                for w, _ in parts:
                    outs[name][e, r:r + w.shape[0]].copy_(w)
                    r += w.shape[0]

    def foreach_copy(pieces, outs):
        dsts, srcs = [], []
        for name, per_expert in pieces.items():
            for e, parts in enumerate(per_expert):
                r = 0
                for w, _ in parts:
                    dsts.append(outs[name][e, r:r + w.shape[0]])
                    srcs.append(w)
                    r += w.shape[0]
        torch._foreach_copy_(dsts, srcs)

    def dequant_per_expert(dequant):
        def run(pieces, outs):
            for name, per_expert in pieces.items():
                for e, parts in enumerate(per_expert):
                    r = 0
                    for w, s in parts:
                        outs[name][e, r:r + w.shape[0]].copy_(dequant(w, s))
                        r += w.shape[0]
        return run

    p = {"pyloader_cuda": pyloader("cuda"), "pyloader_triton": pyloader("triton")}
    if fp8:
        # vLLM/SGLang-style: a torch dequant with expanded fp32 scales per expert, then a copy
        p["dequant_per_expert_torch_then_copy"] = dequant_per_expert(
            lambda w, s: reference.dequant_expanded_scales_torch(w, s, (128, 128)))
        # pyloader's own dequant, still one launch per tensor: isolates the launch-count effect
        p["dequant_per_expert_pyloader_cuda_then_copy"] = dequant_per_expert(
            lambda w, s: ops.dequant_blockwise(w, s, backend="cuda"))
    else:
        p["copy_per_tensor"] = copy_per_tensor
        p["torch_foreach_copy"] = foreach_copy
    return p


def case_bytes(pieces, outs):
    read = sum(w.numel() * w.element_size() + (s.numel() * s.element_size() if s is not None else 0)
               for per_expert in pieces.values() for parts in per_expert for w, s in parts)
    return read + sum(o.numel() * o.element_size() for o in outs.values())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", help="append the result rows to this JSON-lines results log")
    ap.add_argument("--quick", action="store_true", help="two cases only")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: run on the device machine")
    env = environment()
    ceiling = copy_ceiling_gbps()
    print(f"{env['gpu']}  copy ceiling {ceiling:.0f} GB/s  commit {env['commit']}")
    import triton.testing

    rows = []
    for case in (QUICK if args.quick else CASES):
        pieces, outs = CASES[case]()
        fp8 = any(s is not None for per_expert in pieces.values() for parts in per_expert for _, s in parts)
        nbytes = case_bytes(pieces, outs)
        tensors = sum(len(parts) for per_expert in pieces.values() for parts in per_expert)
        expected = expected_of(pieces, outs)
        for name, fn in providers(fp8).items():
            for o in outs.values():
                o.fill_(float("nan"))
            fn(pieces, outs)
            exact = all(torch.equal(outs[k].view(torch.int16), expected[k].view(torch.int16)) for k in outs)
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
