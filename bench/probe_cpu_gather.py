"""Probe: the CPU reference's gather on a many-core host. torch's index_select (int32 index) runs
on one thread; take (int64) splits over threads at ~3x the cost an element. Variants, all
producing the same bytes: take over the whole chunk (the shipped path), index_select split over
Python threads (each part one op that releases the GIL), a worker a row range doing both the
index add and the gather on parts small enough that torch does not split them again, and gather
over [rows, cols] from the table expanded to every row (stride 0), which TensorIterator splits by
rows and which takes int32 indices (half the index bytes of take's int64; session 7, 2 threads:
gather [rows, cols] int64 5.8 ms vs take 8.5 ms, an int32 index add 2.0 ms vs 5.4 ms int64).

    python bench/probe_cpu_gather.py [--json FILE]
"""

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, time_cpu_ms  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    threads = torch.get_num_threads()
    env = environment()
    pool = ThreadPoolExecutor(threads)
    rows = []
    for M, N in [(576, 7168), (2048, 7168), (24576, 1536)]:
        gen = torch.Generator().manual_seed(0)
        wu = torch.randint(0, 256, (M, N), dtype=torch.uint8, generator=gen)
        ncols = -(-N // 128)
        table = torch.randn(ncols * 256, generator=gen).bfloat16()  # one scale row's tables
        col64 = (torch.arange(N) // 128 * 256).to(torch.int64)
        col32 = col64.int()
        out = torch.empty(M, N, dtype=torch.bfloat16)
        want = table[(wu.to(torch.int64) + col64)]
        idx64 = torch.empty(M, N, dtype=torch.int64)
        idx32 = torch.empty(M, N, dtype=torch.int32)

        def take_whole():
            torch.add(wu, col64, out=idx64)
            torch.take(table, idx64.view(-1), out=out.view(-1))

        def add_main_gather_split(parts):
            def run():
                torch.add(wu, col32, out=idx32)
                flat_i, flat_o = idx32.view(-1), out.view(-1)
                step = -(-flat_i.numel() // parts)
                fut = [pool.submit(torch.index_select, table, 0, flat_i[a:a + step], out=flat_o[a:a + step])
                       for a in range(0, flat_i.numel(), step)]
                for f in fut:
                    f.result()
            return run

        def worker_rows(elems):
            rows_per = max(1, elems // N)

            def part(r0, r1):
                for a in range(r0, r1, rows_per):
                    b = min(r1, a + rows_per)
                    i = idx32[a:b]
                    torch.add(wu[a:b], col32, out=i)
                    torch.index_select(table, 0, i.view(-1), out=out[a:b].view(-1))

            def run():
                per = -(-M // threads)
                fut = [pool.submit(part, r, min(M, r + per)) for r in range(0, M, per)]
                for f in fut:
                    f.result()
            return run

        def gather_rows(index, col):
            def run():
                torch.add(wu, col, out=index)
                torch.gather(table.expand(M, table.numel()), 1, index, out=out)
            return run

        variants = {"take_whole": take_whole, "gather_rows_int64": gather_rows(idx64, col64),
                    "gather_rows_int32": gather_rows(idx32, col32)}
        for parts in (threads, 4 * threads):
            variants[f"add_main_index_select_split_{parts}"] = add_main_gather_split(parts)
        for elems in (16384, 30000, 131072):
            variants[f"worker_rows_{elems}"] = worker_rows(elems)
        for name, fn in variants.items():
            out.fill_(0)
            fn()
            ok = torch.equal(out.view(torch.int16), want.view(torch.int16))
            ms = time_cpu_ms(fn, reps=15)
            rows.append(dict(env, bench="probe_cpu_gather", case=f"{M}x{N}", provider=name, ms=round(ms, 3),
                             threads=threads, exact=ok))
            print(f"{M}x{N:<6} {name:40s} {ms:8.3f} ms  {'ok' if ok else 'MISMATCH'}")
    if args.json:
        p = Path(args.json)
        old = json.loads(p.read_text()) if p.exists() else []
        p.write_text(json.dumps(old + rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
