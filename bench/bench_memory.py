"""Resident memory and speed of the CPU paths, as a user meets them: whole processes, one per run.

    python bench/bench_memory.py [--sizes 0.25,1] [--rounds 3] [--results FILE]

For each checkpoint size (synthetic DeepSeek-V3-shaped FP8, CPU shapes; the sizes should be at
least 4x apart), in interleaved rounds:
- ``pyloader convert --device cpu`` against the per-shard script people write (a shard read with
  the safetensors library, each weight dequantized with expanded scales, ``save_file``, and a sync
  at the end: both outputs on disk when timed, as pyloader fsyncs every file), each in its own
  process, which reports its own peak resident memory (VmHWM) when it ends. The bound is the input
  read warm (as the runs find it) plus the output written alone with fsync.
- ``pyloader.load`` of the checkpoint into preallocated CPU targets: the load's peak resident
  memory above what the process held before it (the targets themselves), from the load's report.
Memory that grows with the model beyond the targets is the failure this guards against.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, print_table, write_alone, write_rows  # noqa: E402

from pyloader.bench import synthetic_config  # noqa: E402
from pyloader.bench.results import warm  # noqa: E402
from pyloader.synthetic import write_checkpoint  # noqa: E402

HWM = "__import__('pyloader.rss', fromlist=['peak_rss']).peak_rss()"  # the whole process's high-water mark

SCRIPT = f"""
import json, os, sys, time, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
t = time.perf_counter()
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(parents=True, exist_ok=True)
for f in sorted(src.glob("*.safetensors")):
    tensors = load_file(str(f))
    out = {{}}
    for k, v in tensors.items():
        if k.endswith("_scale_inv"):
            continue
        if v.dtype == torch.float8_e4m3fn:
            s = tensors[k + "_scale_inv"]
            m, n = v.shape
            out[k] = (v.to(torch.float32) * s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:m, :n]).to(torch.bfloat16)
        else:
            out[k] = v
    save_file(out, str(dst / f.name), metadata={{"format": "pt"}})
    del tensors, out
os.sync()  # on disk, as pyloader's output is when it returns (it fsyncs every file)
print(json.dumps({{"seconds": time.perf_counter() - t, "peak_rss": {HWM}}}))
"""

PYLOADER = f"""
import json, sys, time
from pyloader.convert import convert
t = time.perf_counter()
convert(sys.argv[1], sys.argv[2], device="cpu", progress=False)
print(json.dumps({{"seconds": time.perf_counter() - t, "peak_rss": {HWM}}}))
"""

LOAD = """
import json, sys, time, torch
from pathlib import Path
import pyloader
from pyloader.routing.presets import build_preset, load_config
from pyloader.rss import peak_rss
from pyloader.synthetic import allocate_targets
config = load_config(Path(sys.argv[1]) / "config.json")
targets = allocate_targets(build_preset(config).targets, "cpu")
for t in targets.values():
    t.fill_(0)  # resident before the load
before = [l for l in open('/proc/self/status') if l.startswith('VmRSS:')][0].split()[1]
t = time.perf_counter()
report = pyloader.load(targets, sys.argv[1], backend="torch", progress=False)
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss": report.peak_rss, "rss_before": int(before) * 1024,
                  "bytes": report.bytes_read}))
"""


def child(code, *args) -> dict:
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"child failed: {done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]), wall=wall)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.25,1", help="checkpoint sizes in GB (at least 4x apart)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds a size")
    ap.add_argument("--work", default=None, help="where checkpoints and outputs go (default: a temp dir)")
    ap.add_argument("--results", help="append the result rows to this JSON-lines results log")
    args = ap.parse_args()
    env = environment()
    env["threads"] = torch.get_num_threads()
    rows = []
    with tempfile.TemporaryDirectory(prefix="pyloader-memory-", dir=args.work) as tmp:
        work = Path(tmp)
        for size in [float(x) for x in args.sizes.split(",") if x]:
            src = write_checkpoint(work / f"src-{size:g}", synthetic_config(size, torch.device("cpu")),
                                   shard_bytes=256 << 20)
            files = sorted(str(p) for p in src.glob("*.safetensors"))
            in_bytes = sum(os.path.getsize(p) for p in files)
            os.sync()  # the checkpoint's own write-back must not slow the write measured next
            warm(files)
            t0 = time.perf_counter()
            warm(files)
            bound = in_bytes / (time.perf_counter() - t0 + write_alone(work, 2 * in_bytes))
            runs = {"pyloader convert --device cpu": [], "per-shard script (safetensors, expanded scales, save_file)": [],
                    "pyloader.load into CPU targets": []}
            for rnd in range(args.rounds):
                order = list(runs) if rnd % 2 == 0 else list(runs)[::-1]
                for name in order:
                    dst = work / "dst"
                    shutil.rmtree(dst, ignore_errors=True)
                    warm(files)
                    if name.startswith("pyloader convert"):
                        r = child(PYLOADER, src, dst)
                    elif name.startswith("per-shard"):
                        r = child(SCRIPT, src, dst)
                    else:
                        r = child(LOAD, src)
                    runs[name].append(r)
            for name, rs in runs.items():
                sec = statistics.median(r["seconds"] for r in rs)
                peak = statistics.median(r["peak_rss"] for r in rs)
                row = dict(env, bench="memory", case=f"{in_bytes / 1e9:.2f} GB fp8 checkpoint, cpu", provider=name,
                           gbps=round(in_bytes / sec / 1e9, 3), ceiling_gbps=round(bound / 1e9, 3),
                           seconds=round(sec, 2), seconds_all=[round(r["seconds"], 2) for r in rs],
                           process_seconds=[round(r["wall"], 2) for r in rs], checkpoint_bytes=in_bytes,
                           peak_rss=int(peak), peak_rss_all=[r["peak_rss"] for r in rs], rounds=args.rounds)
                if "rss_before" in rs[0]:
                    row["peak_rss_above_targets"] = int(statistics.median(r["peak_rss"] - r["rss_before"] for r in rs))
                    row["ceiling_gbps"] = None  # a load has no write: the bound above is a conversion's
                rows.append(row)
            shutil.rmtree(src, ignore_errors=True)
    for r in rows:
        r["peak_rss_gib"] = round(r["peak_rss"] / 2 ** 30, 2)
    print_table(rows, ["case", "provider", "gbps", "ceiling_gbps", "seconds", "peak_rss_gib", "peak_rss_above_targets"])
    write_rows(rows, args.results)


if __name__ == "__main__":
    main()
