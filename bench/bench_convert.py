"""``pyloader convert`` throughput (GB/s of input) against the disk's own read and write rates
measured in the same run, and against the common FP8 → BF16 script's method (per file:
``safe_open(device="cuda")``, a one-program-per-128x128-block Triton dequant per tensor,
``.cpu()``, ``save_file``; ``os.sync()`` at the end).

    python bench/bench_convert.py [--size-gb 4] [--out-dirs /tmp/pyl-out,/dev/shm/pyl-out] [--results FILE]

Input: a synthetic DeepSeek-V3-shaped FP8 checkpoint in the page cache (warm), as every timed
run finds it. Bound = input bytes / (time to only read the warm input + time to only write the
output with fsync): like with like. Resident memory and the CPU path against a per-shard script:
``bench_memory.py``.
"""

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dequant import per_block_triton  # noqa: E402
from common import environment, print_table, write_alone, write_rows  # noqa: E402

from pyloader.bench import synthetic_config  # noqa: E402
from pyloader.bench.results import warm  # noqa: E402
from pyloader.convert import convert  # noqa: E402
from pyloader.synthetic import write_checkpoint  # noqa: E402


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def baseline(src: Path, dst: Path):
    """The common script: whole shard on the GPU, per-tensor Triton dequant, save_file per file."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    dequant = per_block_triton()
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.glob("*.safetensors")):
        out = {}
        with safe_open(str(f), "pt", device="cuda") as h:
            tensors = {k: h.get_tensor(k) for k in h.keys()}
        for k, v in tensors.items():
            if k.endswith("_scale_inv"):
                continue
            if v.dtype == torch.float8_e4m3fn:
                s = tensors[k + "_scale_inv"]
                o = torch.empty(v.shape, dtype=torch.bfloat16, device="cuda")
                dequant(v, s, o)
                out[k] = o.cpu()
            else:
                out[k] = v.cpu()
        save_file(out, str(dst / f.name), metadata={"format": "pt"})
    os.sync()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=4.0)
    ap.add_argument("--out-dirs", default="/tmp/pyloader-convert-out,/dev/shm/pyloader-convert-out")
    ap.add_argument("--work", default="/tmp/pyloader-convert-in")
    ap.add_argument("--cpu", action="store_true", help="also measure the CPU path (torch reference)")
    ap.add_argument("--results", help="append the result rows to this JSON-lines results log")
    args = ap.parse_args()
    env = environment()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = synthetic_config(args.size_gb, dev)
    src = write_checkpoint(Path(args.work) / "src", cfg, shard_bytes=2 << 30)
    files = sorted(str(p) for p in src.glob("*.safetensors"))
    in_bytes = sum(os.path.getsize(p) for p in files)
    warm(files)
    t_read = timed(lambda: warm(files))  # the input as the runs find it: in the page cache
    rows = []
    for out_root in [Path(p) for p in args.out_dirs.split(",") if p]:
        if not out_root.parent.exists():
            continue
        shutil.rmtree(out_root, ignore_errors=True)
        out_bytes = 2 * in_bytes  # BF16 output is about twice the FP8 input
        t_write = write_alone(out_root, out_bytes)
        disk_bound = in_bytes / (t_read + t_write)
        providers = [("pyloader convert (cuda, mapped writes)",
                      lambda d: convert(src, d, device="cuda", progress=False, writes="mmap")),
                     ("pyloader convert (cuda, write(2))",
                      lambda d: convert(src, d, device="cuda", progress=False, writes="pwrite"))] if dev.type == "cuda" else []
        if args.cpu or dev.type != "cuda":
            providers.append(("pyloader convert (cpu)", lambda d: convert(src, d, device="cpu", progress=False)))
        if dev.type == "cuda":
            providers.append(("common script (safe_open cuda + triton per-block + save_file)", lambda d: baseline(src, d)))
        for name, fn in providers:
            d = out_root / "out"
            shutil.rmtree(d, ignore_errors=True)
            warm(files)
            result = {}
            t = timed(lambda: (result.setdefault("r", fn(d)), os.sync()))
            rep = result.get("r")
            stages = {k: round(getattr(rep, k), 2) for k in ("read_s", "transform_s", "write_s")
                      if hasattr(rep, k)}
            gbps = in_bytes / t / 1e9
            rows.append(dict(env, bench="convert", case=f"{in_bytes / 1e9:.1f} GB fp8 -> {out_root}", provider=name,
                             gbps=round(gbps, 3), disk_bound_gbps=round(disk_bound / 1e9, 3),
                             fraction_of_disk_bound=round(gbps / (disk_bound / 1e9), 3), seconds=round(t, 2),
                             read_warm_alone_s=round(t_read, 2), write_alone_s=round(t_write, 2),
                             ceiling_gbps=round(disk_bound / 1e9, 3), **stages))
            shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(out_root, ignore_errors=True)
    base = {r["case"]: r["gbps"] for r in rows if r["provider"].startswith("common")}
    for r in rows:
        if r["case"] in base:
            r["speedup_vs_common_script"] = round(r["gbps"] / base[r["case"]], 2)
    print_table(rows, ["case", "provider", "gbps", "disk_bound_gbps", "fraction_of_disk_bound", "seconds",
                       "speedup_vs_common_script"])
    write_rows(rows, args.results)
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
