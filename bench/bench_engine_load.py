"""A model of several GB (a real architecture, synthetic weights) loaded into an engine: pyloader
(``pyloader.from_pretrained``, FP8 or BF16 checkpoint) beside the engine's own loader on the same
BF16 files (transformers' ``from_pretrained(..., device_map=device)``), warm page cache, in the same
run as the pinned host→device ceiling; seconds and GB/s of checkpoint bytes.

    python bench/bench_engine_load.py [--layers 8] [--repeats 3] [--dir /tmp/engine-bench] [--results FILE]

The model is Qwen3-30B-A3B's shape (hidden 2048, 128 experts of 768) with ``--layers`` decoder
layers, written once by transformers' ``save_pretrained`` (BF16) and as block FP8 by pyloader's
quantizer (linear weights; embeddings, norms, router and head kept). Each load is checked: the
FP8 load against the dequantized values, the BF16 loads against each other, bitwise.
"""

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "engines"))
from common import environment, print_table, write_rows  # noqa: E402
from models import write_fp8_pair  # noqa: E402

import pyloader  # noqa: E402
from pyloader.bench.results import pinned_h2d_gbps, warm  # noqa: E402


def write_bf16(out: Path, layers: int, device) -> Path:
    import transformers

    if (out / "config.json").is_file():
        return out
    config = transformers.Qwen3MoeConfig(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                         num_experts=128, num_experts_per_tok=8, num_attention_heads=32,
                                         num_key_value_heads=4, head_dim=128, num_hidden_layers=layers,
                                         vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=False)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        from transformers.modeling_utils import no_init_weights
    with no_init_weights(), torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1 if "norm" in name else 0.02, generator=g)
    model.save_pretrained(out, max_shard_size="4GB")
    del model
    return out


def sizes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/engine-bench")
    ap.add_argument("--results")
    args = ap.parse_args()
    import transformers

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    root = Path(args.dir)
    bf16 = write_bf16(root / "bf16", args.layers, dev)
    fp8, ref = root / "fp8", root / "ref"
    if not (fp8 / "config.json").is_file():
        write_fp8_pair(bf16, fp8, ref, device=dev)
    env = dict(environment(), transformers=transformers.__version__)
    ceiling = pinned_h2d_gbps(dev) if dev.type == "cuda" else None
    label = f"Qwen3-30B-A3B shape, {args.layers} layers"
    print(f"{env.get('gpu')}: {label}; BF16 {sizes(bf16) / 1e9:.2f} GB, FP8 {sizes(fp8) / 1e9:.2f} GB; "
          f"pinned H2D {ceiling or 0:.1f} GB/s; transformers {transformers.__version__}", flush=True)

    import importlib.util

    direct = dev.type == "cpu" or importlib.util.find_spec("accelerate") is not None
    how = "" if dev.type == "cpu" else (f", device_map={dev.type}" if direct else ", on the CPU then .to(): no accelerate")

    def hf(d):
        if direct and dev.type != "cpu":
            return transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16, device_map=str(dev))
        return transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).to(dev)

    def ours(d):
        return pyloader.from_pretrained(d, dtype=torch.bfloat16, device=dev, progress=False)

    tf, tf_ref = f"transformers from_pretrained{how}", f"transformers from_pretrained{how} (dequantized BF16)"
    cases = [(tf, bf16, hf), ("pyloader.from_pretrained", bf16, ours),
             ("pyloader.from_pretrained (FP8 → BF16)", fp8, ours), (tf_ref, ref, hf)]
    times = {c[0]: [] for c in cases}
    states = {}
    for _ in range(args.repeats):  # interleaved, page cache warm for each
        for name, d, fn in cases:
            warm(sorted(d.glob("*.safetensors")))
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            model = fn(d)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
            if name not in states:
                states[name] = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()
                                if "layers.0." in k or "embed" in k or "lm_head" in k}
            del model
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    pairs = [(tf, "pyloader.from_pretrained"), (tf_ref, "pyloader.from_pretrained (FP8 → BF16)")]
    for a, b in pairs:
        bad = [k for k in states[a] if not torch.equal(states[a][k], states[b][k])]
        if bad:
            raise SystemExit(f"{b} differs from {a} on {bad[:3]}")
    rows = []
    for name, d, _ in cases:
        med = statistics.median(times[name])
        rows.append(dict(env, bench="engine-load", case=f"{label} ({d.name} checkpoint, {sizes(d) / 1e9:.2f} GB)",
                         provider=name, gbps=round(sizes(d) / med / 1e9, 2), ceiling_gbps=round(ceiling, 1) if ceiling else None,
                         seconds=round(med, 2), seconds_range=[round(min(times[name]), 2), round(max(times[name]), 2)],
                         checkpoint_bytes=sizes(d), page_cache="warm", checked="bitwise (layer 0, embeddings, head)"))
    print_table(rows, ["case", "provider", "seconds", "gbps"])
    write_rows(rows, args.results)


if __name__ == "__main__":
    main()
