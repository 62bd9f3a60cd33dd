"""An independent reference for loads and refits: each checkpoint tensor read with the safetensors
library, dequantized with the torch reference, and each family's fusion written out by hand."""

import json

import torch
from safetensors.torch import load_file

from pyloader.ops import reference


def expected_tensor(target: str, raw: dict, c: dict, out_dtype) -> torch.Tensor:
    """Independent reference: the family's fusion written out by hand."""
    def get(name):
        w = raw[name]
        if w.dtype == torch.float8_e4m3fn:
            s = raw[name + "_scale_inv"]
            return reference.dequant_blockwise_torch(w, s, torch.empty(w.shape, dtype=out_dtype), (128, 128))
        return w.to(out_dtype)

    def stack(names):
        return torch.cat([get(n) for n in names])

    if target.endswith("qkv_proj.weight") or target.endswith("qkv_proj.bias"):
        suffix = target.rsplit(".", 1)[1]
        base = target[: -len("qkv_proj." + suffix)]
        return stack([f"{base}{p}_proj.{suffix}" for p in "qkv"])
    if target.endswith("gate_up_proj.weight"):
        base = target[: -len("gate_up_proj.weight")]
        return stack([base + "gate_proj.weight", base + "up_proj.weight"])
    if target.endswith("fused_qkv_a_proj.weight"):
        base = target[: -len("fused_qkv_a_proj.weight")]
        return stack([base + "q_a_proj.weight", base + "kv_a_proj_with_mqa.weight"])
    if ".experts.w13_weight" in target or ".experts.w2_weight" in target:
        base = target.split("experts.")[0] + "experts."
        E = c.get("n_routed_experts") or c.get("num_experts") or c.get("num_local_experts")
        g, u, d = ("w1", "w3", "w2") if c["model_type"] == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        if target.endswith("w13_weight"):
            return torch.stack([stack([f"{base}{e}.{g}.weight", f"{base}{e}.{u}.weight"]) for e in range(E)])
        return torch.stack([get(f"{base}{e}.{d}.weight") for e in range(E)])
    return get(target)


def raw_tensors(d):
    index = json.loads((d / "model.safetensors.index.json").read_text())
    out = {}
    for f in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(d / f)))
    return out
