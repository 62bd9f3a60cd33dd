"""``pyloader convert`` throughput (GB/s of input) against the disk's own read and write rates
measured in the same run, and against the common FP8 → BF16 script's method (per file:
``safe_open(device="cuda")``, a one-program-per-128x128-block Triton dequant per tensor,
``.cpu()``, ``save_file``; ``os.sync()`` at the end).

    python bench/bench_convert.py [--size-gb 4] [--format fp8|fp4|int4] [--out-dirs /tmp/pyl-out,/dev/shm/pyl-out] [--results FILE]

Input: a synthetic DeepSeek-V3-shaped FP8 checkpoint, or (``--format fp4``) DeepSeek-V4-Flash-shaped
FP4 experts with E8M0 per-32 scales, or (``--format int4``) Kimi-K2.5-shaped INT4 pack-quantized
experts, in the page cache (warm), as every timed run finds it. Packed formats are compared with
the same per-file script dequantizing with torch (unpack the nibbles, look the codes up, expand
the scales), on the GPU and, with ``--cpu``, on the CPU (rates per core), and on the CPU with
the compressed-tensors library's own decompression. Bound = input bytes / (time to only read the warm input + time to only write the
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


def per_file(src: Path, dst: Path, device: str, transform) -> None:
    """The common scripts' shape: each shard whole on ``device`` (``safe_open``), ``transform(name,
    tensor, all tensors)`` a tensor (its output name and value, or None to drop it), ``save_file``,
    then an fsync of the file (the guarantee pyloader convert gives each file it writes)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), "pt", device=device) as h:
            tensors = {k: h.get_tensor(k) for k in h.keys()}
        out = dict(o for o in (transform(k, v, tensors) for k, v in tensors.items()) if o is not None)
        save_file({k: v.cpu() for k, v in out.items()}, str(dst / f.name), metadata={"format": "pt"})
        fd = os.open(dst / f.name, os.O_RDONLY)  # durable as pyloader's files are: fsynced each
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def baseline(src: Path, dst: Path):
    """The common script: whole shard on the GPU, per-tensor Triton dequant, save_file per file."""
    dequant = per_block_triton()

    def transform(k, v, tensors):
        if k.endswith("_scale_inv"):
            return None
        if v.dtype != torch.float8_e4m3fn:
            return k, v
        o = torch.empty(v.shape, dtype=torch.bfloat16, device="cuda")
        dequant(v, tensors[k + "_scale_inv"], o)
        return k, o

    per_file(src, dst, "cuda", transform)
    os.sync()


def write_packed_checkpoint(d: Path, size_gb: float, fmt: str) -> Path:
    """Experts only, ~``size_gb`` GB of packed weights: DeepSeek-V4-Flash w1/w2/w3 (I8 [2048, 2048]
    codes = [2048, 4096] values, F8_E8M0 [2048, 128]) or Kimi-K2.5 gate/up/down (I32 [2048, 896] =
    [2048, 7168], BF16 [2048, 224], weight_shape), 3 GB a file."""
    import json

    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    per_tensor = 2048 * 2048 if fmt == "fp4" else 2048 * 896 * 4
    count = max(3, int(size_gb * 1e9 // per_tensor) // 3 * 3)
    files, cur, cur_bytes, weight_map = [], {}, 0, {}
    for i in range(count):
        layer, expert, which = i // 768, (i // 3) % 256, i % 3
        if fmt == "fp4":
            base = f"layers.{layer}.ffn.experts.{expert}.w{which + 1}."
            cur[base + "weight"] = torch.randint(-128, 128, (2048, 2048), dtype=torch.int8, generator=gen)
            cur[base + "scale"] = torch.randint(110, 135, (2048, 128), dtype=torch.uint8,
                                                generator=gen).view(torch.float8_e8m0fnu)
        else:
            base = f"model.layers.{layer}.mlp.experts.{expert}.{('gate', 'up', 'down')[which]}_proj."
            cur[base + "weight_packed"] = torch.randint(-2 ** 31, 2 ** 31 - 1, (2048, 896), dtype=torch.int32,
                                                        generator=gen)
            cur[base + "weight_scale"] = (torch.rand(2048, 224, generator=gen) * 1e-2 + 1e-4).to(torch.bfloat16)
            cur[base + "weight_shape"] = torch.tensor([2048, 7168], dtype=torch.int32)
        cur_bytes += per_tensor
        if cur_bytes >= 3e9 or i == count - 1:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(cur, str(d / name))
            weight_map.update({k: name for k in cur})
            files.append(name)
            cur, cur_bytes = {}, 0
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = ({"model_type": "deepseek_v4", "expert_dtype": "fp4"} if fmt == "fp4" else
              {"model_type": "kimi_k25", "quantization_config": {
                  "quant_method": "compressed-tensors", "format": "pack-quantized",
                  "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int", "group_size": 32}}}}})
    (d / "config.json").write_text(json.dumps(config))
    return d


def packed_script(src: Path, dst: Path, device: str):
    """The per-file script for packed experts: whole shard on the device, a torch dequant per
    tensor (bench_assembly's torch_packed_dequant), save_file per file."""
    from bench_assembly import torch_packed_dequant

    def transform(k, v, tensors):
        if k.endswith(("scale", "weight_shape")):
            return None
        if k.endswith("weight_packed"):
            base = k[: -len("weight_packed")]
            return base + "weight", torch_packed_dequant(v, tensors[base + "weight_scale"], "int4")
        if v.dtype == torch.int8:
            return k, torch_packed_dequant(v, tensors[k[: -len("weight")] + "scale"], "e2m1")
        return k, v

    per_file(src, dst, device, transform)


def compressed_tensors_script(src: Path, dst: Path):
    """The compressed-tensors library's own CPU decompression (``pack-quantized`` for INT4,
    ``mxfp4-pack-quantized`` for FP4 codes with E8M0 exponents a 32), module by module, per file
    like the script above (pyloader's output and its agree bit for bit: tests/ops/test_writer_library.py)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    def scheme(**kw):
        return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
            num_bits=4, strategy="group", group_size=32, symmetric=True, **kw))

    int4, int4_scheme = BaseCompressor.load_from_registry("pack-quantized"), scheme(type="int")
    fp4, fp4_scheme = (BaseCompressor.load_from_registry("mxfp4-pack-quantized"),
                       scheme(type="float", scale_dtype=torch.uint8, zp_dtype=torch.uint8))

    def transform(k, v, tensors):
        if k.endswith("weight_packed"):
            base = k[: -len("weight_packed")]
            parts = {"weight_packed": v, "weight_scale": tensors[base + "weight_scale"],
                     "weight_shape": tensors[base + "weight_shape"]}
            return base + "weight", int4.decompress(parts, int4_scheme)["weight"]
        if v.dtype == torch.int8:
            parts = {"weight_packed": v.view(torch.uint8),
                     "weight_scale": tensors[k[: -len("weight")] + "scale"].view(torch.uint8)}
            return k, fp4.decompress(parts, fp4_scheme)["weight"].to(torch.bfloat16)
        return None if k.endswith(("scale", "weight_shape")) else (k, v)

    per_file(src, dst, "cpu", transform)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=4.0)
    ap.add_argument("--out-dirs", default="/tmp/pyloader-convert-out,/dev/shm/pyloader-convert-out")
    ap.add_argument("--work", default="/tmp/pyloader-convert-in")
    ap.add_argument("--cpu", action="store_true", help="also measure the CPU path (torch reference)")
    ap.add_argument("--format", default="fp8", choices=["fp8", "fp4", "int4"], help="what the checkpoint holds")
    ap.add_argument("--results", help="append the result rows to this JSON-lines results log")
    args = ap.parse_args()
    env = environment()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.format == "fp8":
        src = write_checkpoint(Path(args.work) / "src", synthetic_config(args.size_gb, dev), shard_bytes=2 << 30)
    else:
        src = write_packed_checkpoint(Path(args.work) / "src", args.size_gb, args.format)
    files = sorted(str(p) for p in src.glob("*.safetensors"))
    in_bytes = sum(os.path.getsize(p) for p in files)
    warm(files)
    t_read = timed(lambda: warm(files))  # the input as the runs find it: in the page cache
    rows = []
    for out_root in [Path(p) for p in args.out_dirs.split(",") if p]:
        if not out_root.parent.exists():
            continue
        shutil.rmtree(out_root, ignore_errors=True)
        out_bytes = {"fp8": 2, "fp4": 4, "int4": 4}[args.format] * in_bytes  # BF16 output against the input
        t_write = write_alone(out_root, out_bytes)
        disk_bound = in_bytes / (t_read + t_write)
        providers = [("pyloader convert (cuda, mapped writes)",
                      lambda d: convert(src, d, device="cuda", progress=False, writes="mmap")),
                     ("pyloader convert (cuda, write(2))",
                      lambda d: convert(src, d, device="cuda", progress=False, writes="pwrite"))] if dev.type == "cuda" else []
        if args.cpu or dev.type != "cuda":
            providers.append(("pyloader convert (cpu)", lambda d: convert(src, d, device="cpu", progress=False)))
        if dev.type == "cuda" and args.format == "fp8":
            providers.append(("common script (safe_open cuda + triton per-block + save_file)", lambda d: baseline(src, d)))
        if args.format != "fp8":
            if dev.type == "cuda":
                providers.append(("common script (safe_open cuda + torch unpack/lookup/expand + save_file)",
                                  lambda d: packed_script(src, d, "cuda")))
            if args.cpu or dev.type != "cuda":
                providers.append(("common script (safe_open cpu + torch unpack/lookup/expand + save_file)",
                                  lambda d: packed_script(src, d, "cpu")))
                try:
                    import compressed_tensors  # noqa: F401
                    providers.append(("compressed-tensors decompress (safe_open cpu + per module + save_file)",
                                      lambda d: compressed_tensors_script(src, d)))
                except ImportError:
                    print("compressed-tensors is not installed: its row is left out", file=sys.stderr)
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
            rows.append(dict(env, bench="convert", case=f"{in_bytes / 1e9:.1f} GB {args.format} -> {out_root}", provider=name,
                             gbps=round(gbps, 3), disk_bound_gbps=round(disk_bound / 1e9, 3),
                             fraction_of_disk_bound=round(gbps / (disk_bound / 1e9), 3), seconds=round(t, 2),
                             read_warm_alone_s=round(t_read, 2), write_alone_s=round(t_write, 2),
                             ceiling_gbps=round(disk_bound / 1e9, 3), threads=torch.get_num_threads(),
                             gbps_per_core=round(gbps / max(1, torch.get_num_threads()), 4) if "cpu" in name else None,
                             **stages))
            shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(out_root, ignore_errors=True)
    base = {r["case"]: r["gbps"] for r in rows if r["provider"].startswith("common") and "cuda" in r["provider"]}
    for r in rows:
        if r["case"] in base:
            r["speedup_vs_common_script"] = round(r["gbps"] / base[r["case"]], 2)
    print_table(rows, ["case", "provider", "gbps", "disk_bound_gbps", "fraction_of_disk_bound", "seconds",
                       "speedup_vs_common_script"])
    write_rows(rows, args.results)
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
