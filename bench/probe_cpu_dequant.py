"""Probe: where the CPU reference's decode path spends its time on this host.

- Single ops over a whole [576, 7168] tensor: torch's FP8 -> float32 and -> bfloat16 casts, each
  pass of the decode (widening, shift, and, fp16 -> float32, the scale multiply two ways, the
  rounding to bfloat16), the NaN-byte check.
- The decode method with float32 chunks of 64K-512K elements a thread, against the
  expanded-scale baseline.
- One [576, 7168] call beside variants (other thread counts, scales as broadcast views of the
  grid, the int16 decode), its profile, and the same on every byte value equally often.

Interleaved rounds, caches flushed before each call (common.interleaved_cpu_samples), medians.
The bench of record is bench_dequant.py --cpu.

    python bench/probe_cpu_dequant.py [--json FILE] [--rounds N]
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, interleaved_cpu_samples, with_attr, write_rows  # noqa: E402

from pyloader import ops, reference  # noqa: E402


def interleaved_ms(fns, rounds):
    """Median ms of each function over interleaved rounds, caches flushed before each call."""
    return {name: statistics.median(v) for name, v in interleaved_cpu_samples(fns, rounds).items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--rounds", type=int, default=12)
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
        "float32_mul_block_views_4d": lambda: (f32[:512].view(4, 128, N // 128, 128).mul_(s[:4, None, :, None]),
                                               f32[512:].view(1, 64, N // 128, 128).mul_(s[4:, None, :, None])),
        "uint8_to_int16_copy": lambda: i16.copy_(w.view(torch.uint8)),
        "int8_to_int16_copy": lambda: i16.copy_(w.view(torch.int8)),
        "int16_shift_left_7": lambda: i16.bitwise_left_shift_(7),
        "int16_mul_128": lambda: i16.mul_(128),
        "int16_and": lambda: i16.bitwise_and_(0xBF80 - 0x10000),
        "float16_to_float32_copy": lambda: f32.copy_(i16.view(torch.float16)),
        "nan_bytes_two_max": lambda: (int(w.view(torch.uint8).max()), int(w.view(torch.int8).max())),
    }, args.rounds)
    for name, ms in ops_ms.items():
        rows.append(dict(env, bench="probe_cpu_dequant_op", case=f"{M}x{N}", provider=name, ms=round(ms, 4),
                         ns_per_element_thread=round(ms * 1e6 * torch.get_num_threads() / (M * N), 3)))
        print(f"  {name:28s} {ms:8.3f} ms")

    for shape in [(576, 7168), (2048, 7168), (24576, 1536)]:
        x = torch.randn(shape, dtype=torch.bfloat16)
        w, s = ops.quantize_blockwise(x, backend="torch")
        out = torch.empty(shape, dtype=torch.bfloat16)

        fns = {"torch_expanded_scales": lambda: reference.dequant_expanded_scales_torch(w, s, (128, 128), out=out)}
        for k in (64, 128, 256, 512):  # the decode path (the default method) at each chunk size
            fns[f"decode_{k}k_per_thread"] = with_attr(reference, "_CPU_CHUNK_ELEMS_PER_THREAD", k << 10,
                                                       lambda: reference.dequant_blockwise_torch(w, s, out, (128, 128)))
        res = interleaved_ms(fns, args.rounds)
        base = res["torch_expanded_scales"]
        for name, ms in res.items():
            rows.append(dict(env, bench="probe_cpu_dequant_chunk", case="x".join(map(str, shape)), provider=name,
                             ms=round(ms, 4), speedup_vs_expanded=round(base / ms, 2), rounds=args.rounds))
            print(f"  {shape!s:14s} {name:24s} {ms:8.3f} ms  {base / ms:5.2f}x")
    # Where one decode call's time goes ([576, 7168], after a baseline call as in the bench's rounds);
    # the shipped call beside variants: fewer of torch's threads (each op's fork and join costs
    # more with more threads), the scales through broadcast views of the grid instead of per-row
    # scales (the shipped way at d719f0e), the int16 decode (the default until session 9).
    M, N = 576, 7168
    x = torch.randn(M, N, dtype=torch.bfloat16)
    w, s = ops.quantize_blockwise(x, backend="torch")
    out = torch.empty(M, N, dtype=torch.bfloat16)
    threads = torch.get_num_threads()

    def shipped():
        reference.dequant_blockwise_torch(w, s, out, (128, 128))

    def with_threads(n):
        def run():
            torch.set_num_threads(n)
            try:
                shipped()
            finally:
                torch.set_num_threads(threads)
        return run

    def mul_block_views(wf, s, g0, bm, bn, runs):  # a run of whole block rows and each partial one an op
        n, cols = wf.shape
        a = 0
        while a < n:
            sr, inner = divmod(g0 + a, bm)
            k = (n - a) // bm if inner == 0 else 0
            if k:
                seg, srows, b = wf[a:a + k * bm].view(k, bm, cols), s[sr:sr + k, None], a + k * bm
            else:
                b = min(n, a + bm - inner)
                seg, srows = wf[a:b].view(1, b - a, cols), s[sr:sr + 1, None]
            for start, stop, sc, nblocks in runs:
                if nblocks:
                    seg[:, :, start:stop].unflatten(2, (nblocks, bn)).mul_(srows[:, :, sc:sc + nblocks, None])
                else:
                    seg[:, :, start:stop].mul_(srows[:, :, sc:sc + 1])
            a = b

    fns = {"torch_expanded_scales": lambda: reference.dequant_expanded_scales_torch(w, s, (128, 128), out=out),
           "decode_shipped": shipped,
           "decode_block_views": with_attr(reference, "_mul_block_scales", mul_block_views, shipped),
           "decode_int16": with_attr(reference, "_CPU_FP8_METHOD", "decode", shipped)}
    for n in sorted({threads, max(1, threads // 2), max(1, threads // 4)}):
        fns[f"decode_set_{n}_threads"] = with_threads(n)
    res = interleaved_ms(fns, args.rounds)
    want = out.clone()
    for name, fn in fns.items():  # every variant writes the same bytes
        fn()
        assert name == "torch_expanded_scales" or torch.equal(out.view(torch.int16), want.view(torch.int16)), name
        shipped()
    for name, ms in res.items():
        rows.append(dict(env, bench="probe_cpu_dequant_threads", case=f"{M}x{N}", provider=name, ms=round(ms, 4),
                         speedup_vs_expanded=round(res["torch_expanded_scales"] / ms, 2), rounds=args.rounds))
        print(f"  {name:24s} {ms:8.3f} ms")
    from torch.profiler import ProfilerActivity, profile
    for _ in range(4):  # the last of a few profiled calls, each after a baseline call outside the profile
        fns["torch_expanded_scales"]()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            shipped()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    # Every byte value equally often: 14 of 256 are float32 subnormals in the int32 decode (a
    # multiply with one costs extra cycles) and the NaN bytes take the masked fill: the worst case.
    w = torch.randint(0, 256, (M, N), dtype=torch.uint8).view(torch.float8_e4m3fn)  # the closures read w
    res = interleaved_ms({k: fns[k] for k in ("torch_expanded_scales", "decode_shipped", "decode_int16")}, args.rounds)
    for name, ms in res.items():
        rows.append(dict(env, bench="probe_cpu_dequant_all_bytes", case=f"{M}x{N}", provider=name, ms=round(ms, 4),
                         speedup_vs_expanded=round(res["torch_expanded_scales"] / ms, 2), rounds=args.rounds))
        print(f"  all bytes {name:24s} {ms:8.3f} ms")
    write_rows(rows, args.json)


if __name__ == "__main__":
    main()
