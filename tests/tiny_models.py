"""Tiny configs of each preset family: small enough for CPU tests, shaped like the real ones; and a
tiny DeepSeek-V4 checkpoint as released, beside its BF16 reference."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

TINY = {
    "llama": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 384,
              "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 300},
    "qwen2": {"model_type": "qwen2", "hidden_size": 256, "intermediate_size": 200, "num_attention_heads": 4,
              "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 77},
    "qwen3_moe": {"model_type": "qwen3_moe", "hidden_size": 256, "intermediate_size": 384, "moe_intermediate_size": 96,
                  "num_experts": 6, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
                  "num_hidden_layers": 2, "vocab_size": 300},
    "mixtral": {"model_type": "mixtral", "hidden_size": 128, "intermediate_size": 160, "num_local_experts": 4,
                "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 1, "vocab_size": 50},
    "deepseek_v3": {"model_type": "deepseek_v3", "hidden_size": 256, "intermediate_size": 320, "moe_intermediate_size": 96,
                    "n_routed_experts": 4, "n_shared_experts": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
                    "q_lora_rank": 160, "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16,
                    "v_head_dim": 32, "first_k_dense_replace": 1, "num_hidden_layers": 2, "vocab_size": 100,
                    "topk_method": "noaux_tc"},
}
for c in TINY.values():
    c.setdefault("tie_word_embeddings", False)
    c.setdefault("torch_dtype", "bfloat16")


# vLLM's CPU DeepSeek-V4 needs index_head_dim 128 and head_dim 512; compress_ratios has an entry for
# the MTP layer too
DEEPSEEK_V4 = dict(model_type="deepseek_v4", architectures=["DeepseekV4ForCausalLM"], hidden_size=256,
                   num_attention_heads=8, num_key_value_heads=1, head_dim=512, qk_rope_head_dim=64, q_lora_rank=64,
                   o_lora_rank=64, o_groups=2, index_n_heads=4, index_head_dim=128, index_topk=16, n_routed_experts=8,
                   n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=128, num_hidden_layers=4,
                   num_hash_layers=1, compress_ratios=[0, 4, 128, 0, 0], vocab_size=512, hc_mult=4, hc_eps=1e-6,
                   hc_sinkhorn_iters=20, hidden_act="silu", swiglu_limit=10.0, norm_topk_prob=True,
                   routed_scaling_factor=1.5, scoring_func="sqrtsoftplus", topk_method="noaux_tc", sliding_window=128,
                   rms_norm_eps=1e-6, rope_theta=10000, compress_rope_theta=160000, max_position_embeddings=4096,
                   rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 16, "original_max_position_embeddings": 256,
                                 "type": "yarn"},
                   num_nextn_predict_layers=0, tie_word_embeddings=False, torch_dtype="bfloat16")


def write_deepseek_v4(out: Path, seed: int = 0) -> dict:
    """DeepSeek-V4 in its own naming, as released: FP8 attention, compressor, indexer and shared
    experts with E8M0 128x128 ``.scale``, FP4 routed experts with E8M0 per-32 ``.scale``
    (``expert_dtype: fp4``, ``scale_fmt: ue8m0``), written by the tests' quantizers; ``ref``: BF16,
    every quantized weight replaced by its dequantized values (the independent float formula)."""
    from checkpoint_lists import deepseek_v4_entries
    from quantizers import formula, quantize_fp4_e8m0

    from pyloader.ops import quantize_blockwise

    gen = torch.Generator().manual_seed(seed)
    c = DEEPSEEK_V4
    q_out, r_out = {}, {}
    for name, shape, dtype in deepseek_v4_entries(c, experts="bf16", dense="bf16"):
        leaf = name.rsplit(".", 1)[-1]
        if dtype == "I32":  # tid2eid: each token's experts, distinct
            t = torch.stack([torch.randperm(c["n_routed_experts"], generator=gen)[:shape[1]]
                             for _ in range(shape[0])]).to(torch.int32)
        elif "norm" in name:
            t = (1 + 0.1 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
        elif dtype == "F32":
            t = 0.05 * torch.randn(shape, generator=gen)
            if leaf.endswith("scale") and name.startswith(("hc_", "layers")) and "hc_" in name:
                t = 0.5 + 0.1 * torch.randn(shape, generator=gen)
        else:
            fan_in = shape[1] if len(shape) > 1 else 1
            t = (torch.randn(shape, generator=gen) / fan_in ** 0.5).to(torch.bfloat16)
        r_out[name] = t
        if not (len(shape) == 2 and leaf == "weight" and dtype == "BF16") or name.startswith(("embed", "head")) \
                or name.endswith(("gate.weight", "weights_proj.weight")):
            q_out[name] = t
            continue
        base = name[: -len("weight")]
        if ".experts." in name and ".shared_experts." not in name:
            codes, exps = quantize_fp4_e8m0(t.float(), int8=True)
            q_out[name], q_out[base + "scale"] = codes, exps.view(torch.float8_e8m0fnu)
            r_out[name] = formula(codes, shape[1], "e2m1", exps, (1, 32))
        else:
            q, sc = quantize_blockwise(t.float(), (128, 128), scale_fmt="ue8m0", backend="torch")
            q_out[name], q_out[base + "scale"] = q, sc.to(torch.float8_e8m0fnu)
            r_out[name] = formula(q, shape[1], None, sc, (128, 128))
    dirs = {"fp8": out / "deepseek_v4" / "fp8", "ref": out / "deepseek_v4" / "ref"}
    for kind, tensors, extra in (("fp8", q_out, {"expert_dtype": "fp4", "quantization_config": {
            "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0",
            "weight_block_size": [128, 128]}}), ("ref", r_out, {"expert_dtype": "bf16"})):
        dirs[kind].mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(dirs[kind] / "model.safetensors"), metadata={"format": "pt"})
        (dirs[kind] / "config.json").write_text(json.dumps(dict(c, **extra), indent=2))
    return dirs
