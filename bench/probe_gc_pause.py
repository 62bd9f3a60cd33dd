"""Probe: reading the headers and building the plan of the largest real checkpoint lists
(DeepSeek-R1, 92K tensors; Qwen3-30B-A3B-FP8, 37K) with Python's cyclic GC running and with it
paused (``pyloader.checkpoint.gc_paused``, what open_checkpoint and build_plan do), interleaved
round by round in one process. The dumps are written as sparse safetensors files (real headers,
data as holes). CPU only.

    python bench/probe_gc_pause.py [--rounds 6] [--json FILE]
"""

import argparse
import contextlib
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import environment, write_rows  # noqa: E402

from checkpoint_lists import config_of, write_sparse_checkpoint  # noqa: E402
import pyloader.checkpoint as checkpoint  # noqa: E402
import pyloader.plan as plan  # noqa: E402
from pyloader.presets import build_preset  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--json")
    args = ap.parse_args()
    env = environment()
    env["gpu"] = "none (cpu)"
    paused = checkpoint.gc_paused
    rows = []
    for folder in ("deepseek-r1", "qwen3-30b-a3b-thinking-2507-fp8"):
        with tempfile.TemporaryDirectory(prefix="pyloader-gc-") as tmp:
            d = write_sparse_checkpoint(folder, Path(tmp))
            times = {"gc running": ([], []), "gc paused": ([], [])}
            for _ in range(args.rounds):
                for label, (headers, plans) in times.items():
                    checkpoint.gc_paused = plan.gc_paused = paused if label == "gc paused" else contextlib.nullcontext
                    gc.collect()
                    t0 = time.perf_counter()
                    ck = checkpoint.open_checkpoint(d)
                    t1 = time.perf_counter()
                    preset = build_preset(config_of(folder))
                    t2 = time.perf_counter()
                    plan.build_plan(ck, preset.targets, preset.rules, block_size=preset.block_size)
                    t3 = time.perf_counter()
                    headers.append(t1 - t0)
                    plans.append(t3 - t2)
                    del ck, preset
            checkpoint.gc_paused = plan.gc_paused = paused
        for label, (headers, plans) in times.items():
            row = dict(env, bench="probe_gc_pause", case=folder, provider=label, rounds=args.rounds,
                       headers_median_s=round(statistics.median(headers), 3), headers_min_s=round(min(headers), 3),
                       plan_median_s=round(statistics.median(plans), 3), plan_min_s=round(min(plans), 3))
            rows.append(row)
            print(f"{folder:34s} {label:11s} headers {row['headers_median_s']:.3f} s (min {row['headers_min_s']:.3f})  "
                  f"plan {row['plan_median_s']:.3f} s (min {row['plan_min_s']:.3f})")
    write_rows(rows, args.json)


if __name__ == "__main__":
    main()
