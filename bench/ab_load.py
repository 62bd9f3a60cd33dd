"""``pyloader.load`` timed the same way for any tree of the project, for A/B runs of two commits
whose ``pyloader bench`` differ in method (best of N against the median of loads in turns).

    PYTHONPATH=/tmp/ab/old python bench/ab_load.py --checkpoint CK [--cold] [--loads 5] --json OUT

Only names both trees have are used (``pyloader.load``, ``pyloader.synthetic.allocate_targets``, the
preset builder and ``ExecutorConfig`` from either layout). Each load runs with the default settings
after the files are made warm (read once) or cold (evicted); the row holds every load's seconds and
GB/s at the median of the loads after the first (which also pays the pinned buffers' first use),
and a checksum of the targets so that the two trees can be checked to load the same bytes.
"""

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import torch

import pyloader
from pyloader.synthetic import allocate_targets

try:  # the layout of the house issue
    from pyloader.loading.executor import ExecutorConfig
    from pyloader.routing.presets import build_preset, load_config
except ImportError:  # the flat layout before it
    from pyloader.executor import ExecutorConfig
    from pyloader.presets import build_preset, load_config


# evict and warm repeat pyloader.bench.results' own: the older tree has no such module
def evict(paths):
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def warm(paths):
    for p in paths:
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--cold", action="store_true")
    ap.add_argument("--loads", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--gate", help="the sanity gate's policy (trees that have one; default: theirs)")
    ap.add_argument("--json", "--results", dest="out", required=True, help="write the row here (JSON lines)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda _: None)
    ck = Path(args.checkpoint)
    files = sorted(str(p) for p in ck.glob("*.safetensors"))
    nbytes = sum(os.path.getsize(p) for p in files)
    targets = allocate_targets(build_preset(load_config(ck / "config.json")).targets, dev)
    gate = {"gate": args.gate} if args.gate else {}
    times = []
    for _ in range(args.loads):
        evict(files) if args.cold else warm(files)
        sync(dev)
        t = time.perf_counter()
        pyloader.load(targets, str(ck), progress=False, executor=ExecutorConfig(), **gate)
        sync(dev)
        times.append(time.perf_counter() - t)
    checksum = 0
    for name in sorted(targets):
        checksum = (checksum * 1000003 + int(targets[name].view(torch.uint8).view(-1).to(torch.int64).sum())) % (1 << 61)
    steady = times[1:] or times
    med = statistics.median(steady)
    row = {"bench": "e2e_ab", "case": f"{ck.name} {'cold' if args.cold else 'warm'}", "provider": "pyloader.load" + (f" (gate={args.gate})" if args.gate else " (defaults)"),
           "gbps": round(nbytes / med / 1e9, 2), "ceiling_gbps": None, "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "none (cpu)",
           "commit": os.environ.get("PYLOADER_COMMIT", "unknown"),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "checkpoint_bytes": nbytes, "seconds": [round(x, 3) for x in times],
           "gbps_range": [round(nbytes / max(steady) / 1e9, 2), round(nbytes / min(steady) / 1e9, 2)],
           "first_load_gbps": round(nbytes / times[0] / 1e9, 2), "targets_checksum": checksum}
    print(f"{row['case']}: {row['gbps']} GB/s median of loads 2..{args.loads} "
          f"({row['gbps_range'][0]}-{row['gbps_range'][1]}), first {row['first_load_gbps']}; checksum {checksum}", flush=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
