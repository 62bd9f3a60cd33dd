"""``pyloader convert`` throughput (GB/s of input) against the disk's own read and write rates
measured in the same run, and against the common FP8 → BF16 script's method (per file:
``safe_open(device="cuda")``, a one-program-per-128x128-block Triton dequant per tensor,
``.cpu()``, ``save_file``; ``os.sync()`` at the end).

    python bench/bench_convert.py [--size-gb 4] [--out-dirs /tmp/pyl-out,/dev/shm/pyl-out] [--results FILE]

Input: a synthetic DeepSeek-V3-shaped FP8 checkpoint in the page cache (warm). Disk-bound rate
= input bytes / (time to only read the input cold + time to only write the output with fsync).
"""

import argparse
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dequant import per_block_triton  # noqa: E402
from common import environment, print_table, write_rows  # noqa: E402

from pyloader.bench import synthetic_config  # noqa: E402
from pyloader.bench.results import drop_cache, warm  # noqa: E402
from pyloader.convert import convert  # noqa: E402
from pyloader.synthetic import write_checkpoint  # noqa: E402


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def write_alone(directory: Path, nbytes: int) -> float:
    directory.mkdir(parents=True, exist_ok=True)
    block = os.urandom(64 << 20)
    path = directory / "write_probe.bin"

    def run():
        with open(path, "wb") as f:
            left = nbytes
            while left > 0:
                n = min(left, len(block))
                f.write(block[:n])
                left -= n
            f.flush()
            os.fsync(f.fileno())

    t = timed(run)
    path.unlink()
    return t


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


def resident_memory(size_gb: float, work: Path, env: dict, dev) -> dict:
    """Peak resident memory of ``python -m pyloader convert`` (a child process, so the benchmark's
    own buffers do not count) on a synthetic checkpoint of about ``size_gb``: it should not grow
    with the model."""
    import subprocess

    cfg = synthetic_config(size_gb, dev)
    src = write_checkpoint(work / "src", cfg, shard_bytes=2 << 30)
    in_bytes = sum(os.path.getsize(p) for p in src.glob("*.safetensors"))
    # The child reports its own VmHWM: ru_maxrss would carry this (large) process's peak across fork/exec.
    code = ("import os, sys; from pyloader.cli import main; rc = main(sys.argv[1:]); "
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]; "
            "open(os.environ['HWM_FILE'], 'w').write(hwm); sys.exit(rc)")
    dst = work / "dst"
    cmd = [sys.executable, "-c", code, "convert", str(src), str(dst), "--device", dev.type, "--no-progress"]
    t = time.perf_counter()
    hwm_file = work / "hwm.txt"
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HWM_FILE=str(hwm_file)))
    seconds = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr[-2000:]}")
    hwm = int(hwm_file.read_text())
    shutil.rmtree(work, ignore_errors=True)
    return dict(env, bench="convert-rss", case=f"{in_bytes / 1e9:.1f} GB fp8 -> {work.parent}",
                provider=f"pyloader convert ({dev.type}), child process", checkpoint_bytes=in_bytes,
                max_rss_kb=hwm, seconds=round(seconds, 2))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=4.0)
    ap.add_argument("--out-dirs", default="/tmp/pyloader-convert-out,/dev/shm/pyloader-convert-out")
    ap.add_argument("--work", default="/tmp/pyloader-convert-in")
    ap.add_argument("--cpu", action="store_true", help="also measure the CPU path (torch reference)")
    ap.add_argument("--results", help="append the result rows to this JSON-lines results log")
    ap.add_argument("--rss-sizes", default="2,6", help="checkpoint sizes (GB) whose conversion's resident memory "
                    "is measured in a child process")
    args = ap.parse_args()
    env = environment()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = synthetic_config(args.size_gb, dev)
    src = write_checkpoint(Path(args.work) / "src", cfg, shard_bytes=2 << 30)
    files = sorted(str(p) for p in src.glob("*.safetensors"))
    in_bytes = sum(os.path.getsize(p) for p in files)
    how = drop_cache(files)
    t_read = timed(lambda: warm(files))  # cold read of the input, alone
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
            rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            result = {}
            t = timed(lambda: (result.setdefault("r", fn(d)), os.sync()))
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            rep = result.get("r")
            stages = {k: round(getattr(rep, k), 2) for k in ("read_s", "transform_s", "write_s")
                      if hasattr(rep, k)}
            gbps = in_bytes / t / 1e9
            rows.append(dict(env, bench="convert", case=f"{in_bytes / 1e9:.1f} GB fp8 -> {out_root}", provider=name,
                             gbps=round(gbps, 3), disk_bound_gbps=round(disk_bound / 1e9, 3),
                             fraction_of_disk_bound=round(gbps / (disk_bound / 1e9), 3), seconds=round(t, 2),
                             read_alone_s=round(t_read, 2), write_alone_s=round(t_write, 2), cache_drop=how,
                             max_rss_kb=rss, max_rss_growth_kb=rss - rss0, **stages))
            shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(out_root, ignore_errors=True)
    base = {r["case"]: r["gbps"] for r in rows if r["provider"].startswith("common")}
    for r in rows:
        if r["case"] in base:
            r["speedup_vs_common_script"] = round(r["gbps"] / base[r["case"]], 2)
    for size in [float(x) for x in args.rss_sizes.split(",") if x]:
        rows.append(resident_memory(size, Path(args.work) / f"rss-{size:g}", env, dev))
    print_table(rows, ["case", "provider", "gbps", "disk_bound_gbps", "fraction_of_disk_bound", "seconds",
                       "speedup_vs_common_script", "max_rss_kb"])
    write_rows(rows, args.results)
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
