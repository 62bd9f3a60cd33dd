"""Routing and planning time over real checkpoint tensor lists (tests/data/checkpoints), CPU only.

    python bench/bench_router.py [--results FILE]

Reports, per checkpoint: names, time to read and check every safetensors header (the dump written
as sparse files: real headers, data as holes; median of 3), router build time, time to route every
name (median of 5), and time to build the whole plan (routing, pairing, shape checks, coverage,
byte ranges).
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import environment, print_table, write_rows  # noqa: E402

from checkpoint_lists import DUMPS, config_of, header_only_checkpoint, write_sparse_checkpoint  # noqa: E402
from pyloader.format.checkpoint import open_checkpoint  # noqa: E402
from pyloader.routing.plan import build_plan  # noqa: E402
from pyloader.routing.presets import build_preset  # noqa: E402
from pyloader.routing.router import Router  # noqa: E402


def median_s(fn, reps=5):
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", help="append the result rows to this JSON-lines results log")
    args = ap.parse_args()
    env = environment()
    env["gpu"] = "none (cpu)"
    rows = []
    for folder in DUMPS:
        ck = header_only_checkpoint(folder)
        preset = build_preset(config_of(folder))
        names = list(ck.tensors)
        build = median_s(lambda: Router(preset.rules, preset.targets))
        route = median_s(lambda: Router(preset.rules, preset.targets).route_all(names))
        plan = median_s(lambda: build_plan(ck, preset.targets, preset.rules, block_size=preset.block_size), reps=3)
        with tempfile.TemporaryDirectory(prefix="pyloader-headers-") as tmp:
            d = write_sparse_checkpoint(folder, Path(tmp))
            files = len(list(d.glob("*.safetensors")))
            headers = median_s(lambda: open_checkpoint(d), reps=3)
        rows.append(dict(env, bench="router", case=folder, provider="pyloader", gbps=None, ceiling_gbps=None,
                         preset=preset.name, names=len(names), files=files,
                         headers_s=round(headers, 3), router_build_ms=round(build * 1e3, 2), route_all_s=round(route, 3),
                         us_per_name=round(route / len(names) * 1e6, 2), plan_s=round(plan, 3)))
    print_table(rows, ["case", "preset", "names", "files", "headers_s", "router_build_ms", "route_all_s", "us_per_name",
                       "plan_s"])
    write_rows(rows, args.results)


if __name__ == "__main__":
    main()
