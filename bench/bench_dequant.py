"""Blockwise FP8 -> BF16 dequant: GB/s (1 byte read + 2 written per element, plus scales) of
pyloader's backends beside the usual torch paths and a one-program-per-128x128-block Triton
kernel in the DeepSeek style, as a fraction of the device copy rate measured in the same run.

    python bench/bench_dequant.py [--results FILE] [--quick]      # GPU
    python bench/bench_dequant.py --cpu [--results FILE]          # CPU reference vs expanded scales
"""

import argparse
import itertools
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (copy_ceiling_gbps, cpu_evict_bytes, environment, interleaved_cpu_samples,  # noqa: E402
                    last_level_cache_bytes, print_table, rotation, time_cpu_ms, time_gpu_ms, write_rows)

from pyloader import ops  # noqa: E402
from pyloader.ops import reference  # noqa: E402

SHAPES = [(24576, 1536), (2048, 7168), (576, 7168), (129280, 7168), (16384, 16384), (64, 4096, 7168)]
QUICK_SHAPES = [(2048, 7168), (576, 7168), (64, 4096, 7168)]


def case_name(shape):
    return "x".join(map(str, shape)) + (" (64 experts, one launch)" if len(shape) == 3 else "")


def make_inputs(shape, device):
    x = torch.randn(shape, device=device, dtype=torch.bfloat16)
    return ops.quantize_blockwise(x, backend="torch" if device == "cpu" else None)


def per_block_triton():
    """DeepSeek-style baseline: one program per 128x128 block, contiguous 2-D, fp32 scales."""
    import triton
    import triton.language as tl

    @triton.jit
    def _per_block_kernel(x_ptr, s_ptr, y_ptr, M, N, BLOCK: tl.constexpr):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
        offs_n = pid_n * BLOCK + tl.arange(0, BLOCK)
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
        s = tl.load(s_ptr + pid_m * tl.cdiv(N, BLOCK) + pid_n)
        tl.store(y_ptr + offs, (x * s).to(y_ptr.dtype.element_ty), mask=mask)

    def run(w, s, out):
        w2, s2, o2 = w.reshape(-1, w.shape[-1]), s.reshape(-1, s.shape[-1]), out.view(-1, out.shape[-1])
        M, N = w2.shape
        _per_block_kernel[(triton.cdiv(M, 128), triton.cdiv(N, 128))](w2, s2, o2, M, N, BLOCK=128)
        return out

    return run


def gpu_providers():
    per_block = per_block_triton()

    def view_broadcast(w, s, out):
        M, N = w.shape[-2:]
        if M % 128 or N % 128:
            raise NotImplementedError("view-broadcast needs shapes divisible by 128")
        lead = w.shape[:-2]
        v = w.float().view(*lead, M // 128, 128, N // 128, 128) * s[..., :, None, :, None]
        out.copy_(v.view(out.shape))
        return out

    compiled = torch.compile(lambda w, s: reference.dequant_expanded_scales_torch(w, s, (128, 128)))

    def expanded(w, s, out):
        if w.dim() == 3:
            for e in range(w.shape[0]):
                reference.dequant_expanded_scales_torch(w[e], s[e], (128, 128), out=out[e])
        else:
            reference.dequant_expanded_scales_torch(w, s, (128, 128), out=out)
        return out

    def torch_compile(w, s, out):
        if w.dim() == 3:
            raise NotImplementedError("2-D only")
        out.copy_(compiled(w, s))
        return out

    def widen_u8_to_i16(w, s, out):
        # Not a dequant: the same traffic (1 byte read, 2 written an element) through torch's cast
        # kernel, as a reference for what a 1:2 read/write mix reaches beside the 1:1 copy ceiling.
        out.view(torch.int16).copy_(w.view(torch.uint8))
        return out

    return {
        "traffic_reference_u8_to_i16_cast": widen_u8_to_i16,
        "torch_expanded_scales": expanded,
        "torch_view_broadcast": view_broadcast,
        "torch_compile": torch_compile,
        "triton_per_block_deepseek_style": per_block,
        "pyloader_triton": lambda w, s, out: ops.dequant_blockwise(w, s, out=out, backend="triton"),
        "pyloader_cuda": lambda w, s, out: ops.dequant_blockwise(w, s, out=out, backend="cuda"),
    }


def bench_gpu(shapes, results_path):
    env = environment()
    ceiling = copy_ceiling_gbps()
    print(f"{env['gpu']}  copy ceiling {ceiling:.0f} GB/s  commit {env['commit']}")
    rows = []
    for shape in shapes:
        w, s = make_inputs(shape, "cuda")
        nbytes = w.numel() * 3 + s.numel() * 4
        sets = [(w, s)] + [(w.clone(), s.clone()) for _ in range(rotation(nbytes) - 1)]
        outs = [torch.empty(shape, dtype=torch.bfloat16, device="cuda") for _ in sets]
        expected = reference.dequant_blockwise_torch(w, s, torch.empty_like(outs[0]), (128, 128))
        for name, fn in gpu_providers().items():
            try:
                got = fn(w, s, outs[0].fill_(float("nan")))
            except NotImplementedError as e:
                print(f"  skip {name} on {shape}: {e}")
                continue
            exact = torch.equal(got.view(torch.int16), expected.view(torch.int16)) if not name.startswith("traffic") else None
            if name.startswith("pyloader") and not exact:
                raise SystemExit(f"{name} differs from the reference on {shape}: refusing to time it")
            ms, timing = time_gpu_ms([lambda a=a, o=o: fn(a[0], a[1], o) for a, o in zip(sets, outs)])
            gbps = nbytes / (ms * 1e-3) / 1e9
            rows.append(dict(env, bench="dequant", case=case_name(shape), provider=name, gbps=round(gbps, 1),
                             ceiling_gbps=round(ceiling, 1), fraction=round(gbps / ceiling, 3), ms=round(ms, 5),
                             bytes=nbytes, bitwise_equal_to_reference=exact, timing=timing, rotated_sets=len(sets)))
            print(f"  {case_name(shape):32s} {name:34s} {gbps:8.1f} GB/s  {gbps / ceiling:6.1%}  ({timing})")
        del sets, outs, expected
        torch.cuda.empty_cache()
    write_rows(rows, results_path)
    return rows


def bench_cpu(results_path, rounds: int = 25):
    env = environment()
    env["threads"] = torch.get_num_threads()
    env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    env["last_level_cache_bytes"] = last_level_cache_bytes()
    env["evict_bytes"] = evict = cpu_evict_bytes()
    rows = []
    src = torch.empty(1 << 28, dtype=torch.uint8).random_()
    dst = torch.empty_like(src)
    ms = time_cpu_ms(lambda: dst.copy_(src))
    ceiling = 2 * src.numel() / (ms * 1e-3) / 1e9
    for shape in [(576, 7168), (2048, 7168), (24576, 1536)]:
        w, s = make_inputs(shape, "cpu")
        out = torch.empty(shape, dtype=torch.bfloat16)
        cur = [w, s, out]  # the inputs and output the next call takes
        nbytes = w.numel() * 3 + s.numel() * 4
        fns = {"pyloader_torch_reference": lambda: reference.dequant_blockwise_torch(*cur, (128, 128)),
               "torch_expanded_scales": lambda: reference.dequant_expanded_scales_torch(cur[0], cur[1], (128, 128),
                                                                                        out=cur[2])}
        results = {}
        for name, fn in fns.items():
            fn()
            results[name] = out.clone()
        exact = {name: torch.equal(r.view(torch.int16), results["pyloader_torch_reference"].view(torch.int16))
                 for name, r in results.items()}
        # cold_data: every call on other tensors (copies of these, cpu_evict_bytes() in all, taken in
        # turn): new data in memory, code and the reference's reused buffers as a loop of loads finds them
        turn = itertools.cycle([(w.clone(), s.clone(), torch.empty_like(out)) for _ in range(-(-evict // nbytes))])

        def take_next_copy():
            cur[:] = next(turn)

        # Interleaved rounds: the host's speed drifts by tens of percent between seconds (other
        # tenants, frequency), which sequential medians turned into ratio noise. Caches flushed
        # before each call by a write of cpu_evict_bytes() (the record: a call's time depended on
        # what ran just before it; code and buffers are evicted too), cold data (above), and warm
        # (each call after the one before it in the round, on the same tensors).
        for caches, flush_bytes, before in (("flushed", evict, None),
                                            ("cold_data", 0, take_next_copy),
                                            ("warm", 0, None)):
            rows += cpu_rows(fns, rounds, flush_bytes, before, dict(env, caches=caches), shape, nbytes, ceiling, exact)
            cur[:] = [w, s, out]
        turn = None  # free the copies before the next shape's
    for caches in ("flushed", "cold_data", "warm"):
        print(f"caches {caches}:")
        print_table([r for r in rows if r["caches"] == caches],
                    ["case", "provider", "gbps", "ms", "speedup_vs_expanded", "round_ratio_median", "threads"])
    write_rows(rows, results_path)
    return rows


def cpu_rows(fns, rounds, flush_bytes, before, env, shape, nbytes, ceiling, exact):
    """Rows of one shape's interleaved CPU rounds: each provider's median and its per-round ratio to
    the expanded-scale path."""
    rows = []
    samples = interleaved_cpu_samples(fns, rounds, flush_bytes, before=before)
    t_exp = statistics.median(samples["torch_expanded_scales"])
    for name in fns:
        t = statistics.median(samples[name])
        gbps = nbytes / (t * 1e-3) / 1e9
        row = dict(env, bench="dequant_cpu", case="x".join(map(str, shape)), provider=name,
                   gbps=round(gbps, 2), ceiling_gbps=round(ceiling, 1), fraction=round(gbps / ceiling, 3),
                   ms=round(t, 3), bytes=nbytes, speedup_vs_expanded=round(t_exp / t, 2), rounds=rounds)
        if name != "torch_expanded_scales":  # the ratio of each round (same seconds), its spread
            ratios = sorted(e / r for r, e in zip(samples[name], samples["torch_expanded_scales"]))
            row.update(round_ratio_median=round(statistics.median(ratios), 2),
                       round_ratio_p10_p90=[round(ratios[len(ratios) // 10], 2), round(ratios[-1 - len(ratios) // 10], 2)])
            row["bitwise_equal_to_reference"] = exact[name]
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", help="append the result rows to this JSON-lines results log")
    ap.add_argument("--cpu", action="store_true", help="CPU reference against the expanded-scale torch path")
    ap.add_argument("--quick", action="store_true", help="three shapes only")
    args = ap.parse_args()
    if args.cpu:
        bench_cpu(args.results)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU: run with --cpu, or on the device machine")
        bench_gpu(QUICK_SHAPES if args.quick else SHAPES, args.results)


if __name__ == "__main__":
    main()
