"""Probe: where the CPU reference's time goes on this host, and the cast path's chunk size.

Single ops over a whole [576, 7168] tensor (torch's FP8 -> float32 and -> bfloat16 casts, which
ATen vectorizes only in its AVX512 build; the float32 scale multiply broadcast over blocks; the
float32 -> bfloat16 rounding; a uint8 -> int16 widening, the decode path's first pass), then the
decode and cast methods with float32 chunks of 64K-512K elements a thread, in interleaved rounds
with the expanded-scale baseline. Medians of the rounds; the bench of record is bench_dequant.py --cpu.

    python bench/probe_cpu_dequant.py [--json FILE] [--rounds N]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_rows  # noqa: E402

from pyloader import ops, reference  # noqa: E402


def interleaved_ms(fns, rounds):
    """Median ms of each function, timed in rounds of one call each (A, B, C, A, B, C, ...)."""
    samples = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t) * 1e3)
    return {name: statistics.median(v) for name, v in samples.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--rounds", type=int, default=11)
    args = ap.parse_args()
    env = dict(environment(), threads=torch.get_num_threads(), cpu_capability=torch.backends.cpu.get_cpu_capability())
    rows = []

    M, N = 576, 7168
    x = torch.randn(M, N, dtype=torch.bfloat16)
    w, s = ops.quantize_blockwise(x, backend="torch")
    f32 = torch.empty(M, N)
    bf16 = torch.empty(M, N, dtype=torch.bfloat16)
    i16 = torch.empty(M, N, dtype=torch.int16)
    srows = s.repeat_interleave(128, 0)[:M, :, None].contiguous()  # [M, 56, 1]
    ops_ms = interleaved_ms({
        "fp8_to_float32_copy": lambda: f32.copy_(w),
        "fp8_to_bfloat16_copy": lambda: bf16.copy_(w),
        "float32_mul_block_scales": lambda: f32.view(M, N // 128, 128).mul_(srows),
        "float32_to_bfloat16_copy": lambda: bf16.copy_(f32),
        "uint8_to_int16_copy": lambda: i16.copy_(w.view(torch.uint8)),
    }, args.rounds)
    for name, ms in ops_ms.items():
        rows.append(dict(env, bench="probe_cpu_dequant_op", case=f"{M}x{N}", provider=name, ms=round(ms, 4),
                         ns_per_element_thread=round(ms * 1e6 * torch.get_num_threads() / (M * N), 3)))
        print(f"  {name:28s} {ms:8.3f} ms")

    saved_method, saved_chunk = reference._CPU_FP8_METHOD, reference._CPU_CHUNK_ELEMS_PER_THREAD
    for shape in [(576, 7168), (2048, 7168), (24576, 1536)]:
        x = torch.randn(shape, dtype=torch.bfloat16)
        w, s = ops.quantize_blockwise(x, backend="torch")
        out = torch.empty(shape, dtype=torch.bfloat16)

        def method_with_chunk(method, per_thread):
            def run():
                reference._CPU_FP8_METHOD, reference._CPU_CHUNK_ELEMS_PER_THREAD = method, per_thread
                try:
                    reference.dequant_blockwise_torch(w, s, out, (128, 128))
                finally:
                    reference._CPU_FP8_METHOD, reference._CPU_CHUNK_ELEMS_PER_THREAD = saved_method, saved_chunk
            return run

        fns = {"torch_expanded_scales": lambda: reference.dequant_expanded_scales_torch(w, s, (128, 128), out=out)}
        for method in ("decode", "cast"):
            for k in (64, 128, 256, 512):
                fns[f"{method}_{k}k_per_thread"] = method_with_chunk(method, k << 10)
        res = interleaved_ms(fns, args.rounds)
        base = res["torch_expanded_scales"]
        for name, ms in res.items():
            rows.append(dict(env, bench="probe_cpu_dequant_chunk", case="x".join(map(str, shape)), provider=name,
                             ms=round(ms, 4), speedup_vs_expanded=round(base / ms, 2), rounds=args.rounds))
            print(f"  {shape!s:14s} {name:24s} {ms:8.3f} ms  {base / ms:5.2f}x")
    # Where one decode call's time goes ([576, 7168], after a baseline call as in the bench's rounds),
    # and the same call with fewer of torch's threads (each op's fork and join costs more with more threads).
    M, N = 576, 7168
    x = torch.randn(M, N, dtype=torch.bfloat16)
    w, s = ops.quantize_blockwise(x, backend="torch")
    out = torch.empty(M, N, dtype=torch.bfloat16)
    threads = torch.get_num_threads()

    def decode_with_threads(n):
        def run():
            torch.set_num_threads(n)
            try:
                reference.dequant_blockwise_torch(w, s, out, (128, 128))
            finally:
                torch.set_num_threads(threads)
        return run

    fns = {"torch_expanded_scales": lambda: reference.dequant_expanded_scales_torch(w, s, (128, 128), out=out)}
    for n in sorted({threads, max(1, threads // 2), max(1, threads // 4)}):
        fns[f"decode_{n}_threads"] = decode_with_threads(n)
    res = interleaved_ms(fns, args.rounds)
    for name, ms in res.items():
        rows.append(dict(env, bench="probe_cpu_dequant_threads", case=f"{M}x{N}", provider=name, ms=round(ms, 4),
                         speedup_vs_expanded=round(res["torch_expanded_scales"] / ms, 2), rounds=args.rounds))
        print(f"  {name:24s} {ms:8.3f} ms")
    from torch.profiler import ProfilerActivity, profile
    for _ in range(4):  # the last of a few profiled calls, each after a baseline call outside the profile
        fns["torch_expanded_scales"]()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            reference.dequant_blockwise_torch(w, s, out, (128, 128))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    write_rows(rows, args.json)


if __name__ == "__main__":
    main()
