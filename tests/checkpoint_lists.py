"""Real checkpoint tensor lists (``data/checkpoints/*/header_dump.rows.json``, copied from published
header dumps) as header-only Checkpoints: names expanded (a name component ``a-b`` is every integer
a..b), shapes and dtypes as published, byte offsets laid out contiguously per file."""

import itertools
import json
import math
import re
from pathlib import Path

from pyloader.format.checkpoint import Checkpoint
from pyloader.format.safetensors import TensorInfo

SHARED = Path(__file__).resolve().parent / "data" / "checkpoints"

# header dump folder → config.json folder (the same architecture where the dump's own is absent)
DUMPS = {
    "deepseek-r1": "deepseek-r1",
    "glm-5.1": "glm-5.1",
    "qwen3-30b-a3b-thinking-2507-fp8": "qwen3-30b-a3b-fp8",
    "qwen3-32b": "qwen3-32b",
    "qwen2.5-72b-instruct": "qwen2.5-72b-instruct",
    "meta-llama-3-8b-instruct": "meta-llama-3.1-8b",
    "gpt-oss-20b": "gpt-oss-20b",
}
_DT = {"torch.bfloat16": "BF16", "torch.float32": "F32", "torch.float8_e4m3fn": "F8_E4M3", "torch.uint8": "U8",
       "torch.float16": "F16"}
_BITS = {"BF16": 16, "F32": 32, "F8_E4M3": 8, "U8": 8, "F16": 16}


def expand(pattern: str):
    parts = []
    for comp in pattern.split("."):
        m = re.fullmatch(r"(\d+)-(\d+)", comp)
        parts.append([str(i) for i in range(int(m.group(1)), int(m.group(2)) + 1)] if m else [comp])
    return [".".join(p) for p in itertools.product(*parts)]


def dump_rows(folder: str):
    data = json.loads((SHARED / folder / "header_dump.rows.json").read_text())
    for row in data["rows"]:
        for name in expand(row["name_pattern"]):
            yield name, tuple(row["shape"]), _DT[row["dtype"]]


def header_only_checkpoint(folder: str) -> Checkpoint:
    tensors, pos = {}, {}
    for name, shape, dtype in dump_rows(folder):
        f = Path("/nonexistent") / folder / ("model-%05d.safetensors" % (hash(name.split(".layers.")[-1].split(".")[0]) % 7))
        n = math.prod(shape) * _BITS[dtype] // 8
        start = pos.get(f, 8)
        tensors[name] = TensorInfo(name, dtype, shape, f, start, start + n)
        pos[f] = start + n
    return Checkpoint(SHARED / folder, sorted(pos), tensors)


def config_of(folder: str) -> dict:
    return json.loads((SHARED / DUMPS[folder] / "config.json").read_text())


def write_sparse_checkpoint(folder: str, directory: Path, shard_bytes: int = 5 * 10**9) -> Path:
    """The dump as real safetensors files whose data are holes (headers and sizes exact, nothing
    stored): what ``open_checkpoint`` reads and checks, for timing header parsing at full scale.
    Tensors in dump order, a new file past ``shard_bytes``, an index naming them."""
    from pyloader.format.safetensors import write_safetensors_header

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    groups, size = [[]], 0
    for name, shape, dtype in dump_rows(folder):
        n = math.prod(shape) * _BITS[dtype] // 8
        if size + n > shard_bytes and groups[-1]:
            groups.append([])
            size = 0
        groups[-1].append((name, dtype, shape))
        size += n
    weight_map = {}
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        head, offsets = write_safetensors_header(group, {"format": "pt"})
        with open(directory / fname, "wb") as f:
            f.write(head)
            f.truncate(len(head) + max((end for _, end in offsets.values()), default=0))
        weight_map.update({name: fname for name, _, _ in group})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


_CACHE = {}


def cached_checkpoint(folder):
    if folder not in _CACHE:
        _CACHE[folder] = header_only_checkpoint(folder)
    return _CACHE[folder]


def synthetic(entries, folder="synthetic"):
    """Header-only checkpoint from (name, shape, safetensors dtype)."""
    bits = {"BF16": 16, "F32": 32, "F8_E4M3": 8, "U8": 8, "F16": 16, "F8_E8M0": 8, "I8": 8, "I32": 32}
    tensors, pos = {}, 8
    for name, shape, dtype in entries:
        n = math.prod(shape) * bits[dtype] // 8
        tensors[name] = TensorInfo(name, dtype, tuple(shape), Path("/nonexistent") / folder / "m.safetensors", pos, pos + n)
        pos += n
    return Checkpoint(None, [Path("/nonexistent") / folder / "m.safetensors"], tensors)


def config_of_folder(folder):
    return json.loads((SHARED / folder / "config.json").read_text())


def dense_entries(c):
    H, I, hd = c["hidden_size"], c["intermediate_size"], c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (c["vocab_size"], H), "BF16"), ("model.norm.weight", (H,), "BF16")]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out += [(f"{p}.self_attn.q_proj.weight", (q, H), "BF16"), (f"{p}.self_attn.k_proj.weight", (kv, H), "BF16"),
                (f"{p}.self_attn.v_proj.weight", (kv, H), "BF16"), (f"{p}.self_attn.o_proj.weight", (H, q), "BF16"),
                (f"{p}.self_attn.q_norm.weight", (hd,), "BF16"), (f"{p}.self_attn.k_norm.weight", (hd,), "BF16"),
                (f"{p}.mlp.gate_proj.weight", (I, H), "BF16"), (f"{p}.mlp.up_proj.weight", (I, H), "BF16"),
                (f"{p}.mlp.down_proj.weight", (H, I), "BF16"), (f"{p}.input_layernorm.weight", (H,), "BF16"),
                (f"{p}.post_attention_layernorm.weight", (H,), "BF16"), (f"{p}.self_attn.rotary_emb.inv_freq", (hd // 2,), "F32")]
    return out




def deepseek_v4_entries(c, experts="fp4", dense="fp8"):
    """(name, shape, dtype) of a DeepSeek-V4 checkpoint in its own naming (``layers.L.attn.wq_a``,
    ``ffn.experts.E.w1``, ``.scale``), MTP left out: float32 hyper-connection, sink, ``ape`` and gate
    bias tensors; hash layers' I32 ``tid2eid``; ``dense="fp8"``: the attention, compressor, indexer
    query and shared-expert projections in F8_E4M3 with F8_E8M0 128x128 ``.scale``; ``experts``:
    ``"fp4"`` (I8 codes, F8_E8M0 per-32 ``.scale``), ``"nvfp4"`` (ModelOpt), ``"fp8"`` (as dense) or ``"bf16"``."""
    H, heads, hd, qlr = c["hidden_size"], c["num_attention_heads"], c["head_dim"], c["q_lora_rank"]
    og, olr, ih, ihd, hc = c["o_groups"], c["o_lora_rank"], c["index_n_heads"], c["index_head_dim"], c["hc_mult"]
    E, inter = c["n_routed_experts"], c["moe_intermediate_size"]
    mix = (2 + hc) * hc
    out = [("embed.weight", (c["vocab_size"], H), "BF16"), ("head.weight", (c["vocab_size"], H), "BF16"),
           ("norm.weight", (H,), "BF16"), ("hc_head_fn", (hc, hc * H), "F32"), ("hc_head_base", (hc,), "F32"),
           ("hc_head_scale", (1,), "F32")]

    def linear(name, n, k, fmt):
        if fmt == "fp8":
            out.extend([(name + ".weight", (n, k), "F8_E4M3"), (name + ".scale", (-(-n // 128), -(-k // 128)), "F8_E8M0")])
        elif fmt == "fp4":
            out.extend([(name + ".weight", (n, k // 2), "I8"), (name + ".scale", (n, k // 32), "F8_E8M0")])
        elif fmt == "nvfp4":  # ModelOpt
            out.extend([(name + ".weight", (n, k // 2), "U8"), (name + ".weight_scale", (n, k // 16), "F8_E4M3"),
                        (name + ".weight_scale_2", (), "F32"), (name + ".input_scale", (), "F32")])
        else:
            out.append((name + ".weight", (n, k), "BF16"))

    for i in range(c["num_hidden_layers"]):
        p = f"layers.{i}"
        for part in ("attn", "ffn"):
            out += [(f"{p}.hc_{part}_fn", (mix, hc * H), "F32"), (f"{p}.hc_{part}_base", (mix,), "F32"),
                    (f"{p}.hc_{part}_scale", (3,), "F32")]
        a = f"{p}.attn"
        out += [(f"{a}.attn_sink", (heads,), "F32"), (f"{a}.q_norm.weight", (qlr,), "BF16"),
                (f"{a}.kv_norm.weight", (hd,), "BF16"), (f"{p}.attn_norm.weight", (H,), "BF16"),
                (f"{p}.ffn_norm.weight", (H,), "BF16")]
        for name, n, k in (("wq_a", qlr, H), ("wkv", hd, H), ("wq_b", heads * hd, qlr),
                           ("wo_a", og * olr, heads * hd // og), ("wo_b", H, og * olr)):
            linear(f"{a}.{name}", n, k, dense)
        ratio = c["compress_ratios"][i]
        comps = ([(f"{a}.compressor", hd)] if ratio else []) + ([(f"{a}.indexer.compressor", ihd)] if ratio == 4 else [])
        for comp, dim in comps:
            width = 2 * dim if ratio == 4 else dim
            out += [(f"{comp}.ape", (ratio, width), "F32"), (f"{comp}.norm.weight", (dim,), "BF16")]
            linear(f"{comp}.wkv", width, H, dense)
            linear(f"{comp}.wgate", width, H, dense)
        if ratio == 4:
            linear(f"{a}.indexer.wq_b", ih * ihd, qlr, dense)
            out.append((f"{a}.indexer.weights_proj.weight", (ih, H), "BF16"))
        f = f"{p}.ffn"
        out.append((f"{f}.gate.weight", (E, H), "BF16"))
        out.append((f"{f}.gate.tid2eid", (c["vocab_size"], c["num_experts_per_tok"]), "I32") if i < c["num_hash_layers"]
                   else (f"{f}.gate.bias", (E,), "F32"))
        shared = inter * (c.get("n_shared_experts") or 1)
        for w, n, k in (("w1", shared, H), ("w3", shared, H), ("w2", H, shared)):
            linear(f"{f}.shared_experts.{w}", n, k, dense)
        for e in range(E):
            for w, n, k in (("w1", inter, H), ("w3", inter, H), ("w2", H, inter)):
                linear(f"{f}.experts.{e}.{w}", n, k, experts)
    return out
