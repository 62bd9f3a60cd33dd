"""Tiny random models of real architectures, written by transformers' ``save_pretrained`` (BF16),
then as block-FP8 checkpoints by pyloader's quantizer, beside a BF16 checkpoint that holds exactly
the dequantized values: loading the FP8 one into a BF16 model must give the BF16 one's weights.

    python tests/engines/models.py OUT_DIR [qwen3 qwen3_moe deepseek_v3]
"""

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pyloader.ops import dequant_blockwise, quantize_blockwise

# vLLM's CPU MLA needs kv_lora_rank 512 and qk_rope_head_dim 64; without topk_method "noaux_tc"
# (transformers' DeepseekV3Config does not write it) vLLM builds no e_score_correction_bias.
CONFIGS = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              dict(hidden_size=256, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                   num_hidden_layers=4, vocab_size=512)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(hidden_size=256, intermediate_size=384, moe_intermediate_size=128, num_experts=8,
                       num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                       num_hidden_layers=4, vocab_size=512, norm_topk_prob=True)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(hidden_size=256, intermediate_size=384, moe_intermediate_size=128, n_routed_experts=8,
                         n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1, num_attention_heads=4,
                         num_key_value_heads=4, q_lora_rank=192, kv_lora_rank=512, qk_nope_head_dim=64,
                         qk_rope_head_dim=64, v_head_dim=64, first_k_dense_replace=1, num_hidden_layers=4,
                         vocab_size=512, topk_method="noaux_tc", scoring_func="sigmoid", routed_scaling_factor=2.5,
                         rope_scaling=None)),
    "minimax_m2": ("MiniMaxM2Config", "MiniMaxM2ForCausalLM",
                   dict(hidden_size=256, intermediate_size=128, num_local_experts=8, num_experts_per_tok=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_hidden_layers=4,
                        vocab_size=512, use_qk_norm=True, qk_norm_type="per_layer", use_routing_bias=True,
                        scoring_func="softmax", rotary_dim=32, partial_rotary_factor=0.5)),  # vLLM's CPU router: softmax only
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(hidden_size=256, intermediate_size=128, num_local_experts=8, num_experts_per_tok=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_hidden_layers=2, vocab_size=512,
                     sliding_window=64, layer_types=["sliding_attention", "full_attention"])),
}
PACKED_ONLY = ("gpt_oss",)  # released packed (MXFP4): no FP8 pair, an MXFP4 one
COMMON = dict(max_position_embeddings=512, tie_word_embeddings=False, torch_dtype="bfloat16", rms_norm_eps=1e-6)
BLOCK = (128, 128)


def quantized(name: str, t: torch.Tensor) -> bool:
    """The weights DeepSeek-style FP8 releases store in FP8: the linear layers' 2-D weights (not
    embeddings, head, norms, or the router)."""
    return (t.dim() == 2 and name.endswith(".weight") and "norm" not in name and "embed_tokens" not in name
            and not name.startswith("lm_head") and not name.endswith(".gate.weight"))


def write_bf16(kind: str, out: Path, seed: int = 0) -> Path:
    import transformers

    cfg_cls, model_cls, fields = CONFIGS[kind]
    torch.manual_seed(seed)
    config = getattr(transformers, cfg_cls)(**fields, **COMMON)
    model = getattr(transformers, model_cls)(config).to(torch.bfloat16)
    with torch.no_grad():  # random, but with the spread of trained weights (init leaves norms at 1, biases at 0)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p, dtype=torch.float32))
            elif name.endswith("e_score_correction_bias"):
                p.copy_(0.01 * torch.randn_like(p, dtype=torch.float32))
    model.save_pretrained(out)
    _patch_config(out, fields)
    return out


def _patch_config(out: Path, fields: dict) -> None:
    path = out / "config.json"
    c = json.loads(path.read_text())
    c.update({k: v for k, v in fields.items() if k not in c})  # what the config class does not write
    path.write_text(json.dumps(c, indent=2))


def _copy_json(src: Path, dirs) -> None:
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.suffix == ".json":
                shutil.copy(f, d / f.name)


def write_fp8_pair(bf16: Path, fp8: Path, ref: Path, device="cpu") -> None:
    """``fp8``: the BF16 checkpoint's linear weights in 128x128 block e4m3 with float32
    ``weight_scale_inv``; ``ref``: BF16, those weights replaced by their dequantized values."""
    _copy_json(bf16, (fp8, ref))
    for f in sorted(bf16.glob("*.safetensors")):
        q_out, r_out = {}, {}
        backend = None if str(device).startswith("cuda") else "torch"  # the kernels are bitwise the reference
        for name, t in load_file(str(f)).items():
            if quantized(name, t):
                q, s = quantize_blockwise(t.to(device, torch.float32), BLOCK, backend=backend)
                q_out[name], q_out[name[:-len("weight")] + "weight_scale_inv"] = q.cpu(), s.cpu()
                r_out[name] = dequant_blockwise(q, s, BLOCK, out_dtype=torch.bfloat16, backend=backend).cpu()
            else:
                q_out[name] = r_out[name] = t
        save_file(q_out, str(fp8 / f.name), metadata={"format": "pt"})
        save_file(r_out, str(ref / f.name), metadata={"format": "pt"})
    for index in fp8.glob("*.index.json"):  # the scales live beside their weights
        data = json.loads(index.read_text())
        wm = data["weight_map"]
        wm.update({n[:-len("weight")] + "weight_scale_inv": file for n, file in list(wm.items())
                   if n[:-len("weight")] + "weight_scale_inv" in load_file(str(fp8 / file))})
        index.write_text(json.dumps(data, indent=2))
    c = json.loads((fp8 / "config.json").read_text())
    c["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                "weight_block_size": list(BLOCK)}
    (fp8 / "config.json").write_text(json.dumps(c, indent=2))


def write_packed_pair(bf16: Path, q_dir: Path, ref: Path, fmt: str) -> None:
    """The routed experts of ``bf16`` as ``fmt`` — ``"int4"`` (compressed-tensors pack-quantized,
    group 32, Kimi-K2.5's experts) or ``"nvfp4"`` (compressed-tensors nvfp4-pack-quantized) — written
    by the tests' quantizers under a real ``quantization_config``; ``ref``: BF16, the experts
    replaced by their dequantized values (the independent float formula)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from quantizers import quantize_ct

    _copy_json(bf16, (q_dir, ref))
    for f in sorted(bf16.glob("*.safetensors")):
        q_out, r_out = {}, {}
        for name, t in load_file(str(f)).items():
            if ".mlp.experts." in name and name.endswith(".weight"):
                parts, r_out[name] = quantize_ct(t, fmt)
                q_out.update({name[:-len("weight")] + k: v for k, v in parts.items()})
            else:
                q_out[name] = r_out[name] = t
        save_file(q_out, str(q_dir / f.name), metadata={"format": "pt"})
        save_file(r_out, str(ref / f.name), metadata={"format": "pt"})
    weights = {"int4": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32},
               "nvfp4": {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group",
                         "group_size": 16}}[fmt]
    c = json.loads((q_dir / "config.json").read_text())
    c["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "pack-quantized" if fmt == "int4" else "nvfp4-pack-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None}},
        "ignore": ["lm_head", "re:.*self_attn.*", "re:.*mlp.gate$"]}
    (q_dir / "config.json").write_text(json.dumps(c, indent=2))


def write_mxfp4_pair(bf16: Path, q_dir: Path, ref: Path) -> None:
    """gpt-oss as released: the experts' ``gate_up_proj``/``down_proj`` (transformers' ``[E, in, out]``)
    as MXFP4 ``*_blocks`` ``[E, out, in/32, 16]`` and E8M0 ``*_scales`` ``[E, out, in/32]`` by the tests'
    quantizer, under ``quant_method: mxfp4``; ``ref``: BF16, those tensors replaced by their dequantized
    values (the independent float formula) in transformers' layout."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from quantizers import formula, quantize_fp4_e8m0

    _copy_json(bf16, (q_dir, ref))
    for f in sorted(bf16.glob("*.safetensors")):
        q_out, r_out = {}, {}
        for name, t in load_file(str(f)).items():
            if name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
                blocks, scales, values = [], [], []
                for w in t.transpose(1, 2).float():  # each expert [out, in]
                    codes, exps = quantize_fp4_e8m0(w)
                    blocks.append(codes.reshape(w.shape[0], -1, 16))
                    scales.append(exps)
                    values.append(formula(codes, w.shape[1], "e2m1", exps, (1, 32)))
                q_out[name + "_blocks"], q_out[name + "_scales"] = torch.stack(blocks), torch.stack(scales)
                r_out[name] = torch.stack(values).transpose(1, 2).contiguous()
            else:
                q_out[name] = r_out[name] = t
        save_file(q_out, str(q_dir / f.name), metadata={"format": "pt"})
        save_file(r_out, str(ref / f.name), metadata={"format": "pt"})
    c = json.loads((q_dir / "config.json").read_text())
    c["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (q_dir / "config.json").write_text(json.dumps(c, indent=2))


def write_models(out: Path, kinds=tuple(CONFIGS)) -> dict:
    """``{kind: {"bf16": dir, "fp8": dir, "ref": dir}}`` under ``out`` (gpt-oss: ``"mxfp4"`` for ``"fp8"``)."""
    dirs = {}
    for kind in kinds:
        if kind == "deepseek_v4":
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
            from tiny_models import write_deepseek_v4

            dirs[kind] = write_deepseek_v4(out)
            continue
        d = {v: out / kind / v for v in ("bf16", "fp8", "ref")}
        write_bf16(kind, d["bf16"])
        if kind in PACKED_ONLY:
            d["mxfp4"] = d.pop("fp8").with_name("mxfp4")
            write_mxfp4_pair(d["bf16"], d["mxfp4"], d["ref"])
            dirs[kind] = d
            continue
        write_fp8_pair(d["bf16"], d["fp8"], d["ref"])
        if kind == "qwen3_moe":
            for fmt in ("int4", "nvfp4"):
                d[fmt], d[fmt + "_ref"] = out / kind / fmt, out / kind / (fmt + "_ref")
                write_packed_pair(d["bf16"], d[fmt], d[fmt + "_ref"], fmt)
        dirs[kind] = d
    return dirs


if __name__ == "__main__":
    print(write_models(Path(sys.argv[1]), tuple(sys.argv[2:]) or tuple(CONFIGS) + ("deepseek_v4",)))
