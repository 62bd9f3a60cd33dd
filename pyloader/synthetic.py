"""Synthetic checkpoints with real tensor names and shapes (HF layout), for tests and
``pyloader bench``: safetensors shards + ``model.safetensors.index.json`` + ``config.json``.

Linear weights are FP8 e4m3 with 128x128 ``weight_scale_inv`` grids when ``fp8`` (embeddings,
norms, routers and the head stay BF16, as in DeepSeek-V3 and Qwen3-FP8 releases). Data is random
(NaN byte patterns excluded), written file by file so memory stays at one tensor.
"""

import json
import math
import os
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from .dtypes import TORCH_TO_SAFETENSORS
from .format.safetensors import write_safetensors_header

# A DeepSeek-V3-shaped slice: real hidden/expert/attention shapes, fewer experts and layers.
DEEPSEEK_V3_SLICE = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 7168,
    "intermediate_size": 18432, "moe_intermediate_size": 2048, "n_routed_experts": 32, "n_shared_experts": 1,
    "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "first_k_dense_replace": 1,
    "moe_layer_freq": 1, "num_hidden_layers": 3, "vocab_size": 129280, "tie_word_embeddings": False,
    "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128]},
}


def checkpoint_tensors(c: dict) -> List[Tuple[str, Tuple[int, ...], bool]]:
    """(name, shape, is_linear) of a checkpoint for ``config`` (llama/qwen2/qwen3 dense, qwen3_moe,
    mixtral, deepseek_v2/v3, kimi_k2, the DSA models deepseek_v32 and glm_moe_dsa, minimax_m2/m3), in HF
    naming (MTP layers left out)."""
    mt = c["model_type"]
    H, V = c["hidden_size"], c["vocab_size"]
    out = [("model.embed_tokens.weight", (V, H), False), ("model.norm.weight", (H,), False)]
    if not c.get("tie_word_embeddings"):
        out.append(("lm_head.weight", (V, H), False))
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out += [(f"{p}.input_layernorm.weight", (H,), False), (f"{p}.post_attention_layernorm.weight", (H,), False)]
        if mt in ("deepseek_v2", "deepseek_v3", "kimi_k2", "deepseek_v32", "glm_moe_dsa"):
            heads, qlr, kvlr = c["num_attention_heads"], c["q_lora_rank"], c["kv_lora_rank"]
            nope, rope, vhd = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
            a = f"{p}.self_attn"
            out += [(f"{a}.q_a_proj.weight", (qlr, H), True), (f"{a}.q_a_layernorm.weight", (qlr,), False),
                    (f"{a}.q_b_proj.weight", (heads * (nope + rope), qlr), True),
                    (f"{a}.kv_a_proj_with_mqa.weight", (kvlr + rope, H), True),
                    (f"{a}.kv_a_layernorm.weight", (kvlr,), False),
                    (f"{a}.kv_b_proj.weight", (heads * (nope + vhd), kvlr), True),
                    (f"{a}.o_proj.weight", (H, heads * vhd), True)]
            if mt in ("deepseek_v32", "glm_moe_dsa"):  # the sparse-attention indexer
                ihd, ih = c["index_head_dim"], c["index_n_heads"]
                x = f"{a}.indexer"
                out += [(f"{x}.wq_b.weight", (ih * ihd, qlr), True), (f"{x}.wk.weight", (ihd, H), True),
                        (f"{x}.k_norm.weight", (ihd,), False), (f"{x}.k_norm.bias", (ihd,), False),
                        (f"{x}.weights_proj.weight", (ih, H), False)]
            moe = c.get("n_routed_experts") and i >= c.get("first_k_dense_replace", 0)
            if moe:
                E, I = c["n_routed_experts"], c["moe_intermediate_size"]
                out += [(f"{p}.mlp.gate.weight", (E, H), False)]
                if mt != "deepseek_v2":
                    out += [(f"{p}.mlp.gate.e_score_correction_bias", (E,), False)]
                for e in range(E):
                    out += [(f"{p}.mlp.experts.{e}.gate_proj.weight", (I, H), True),
                            (f"{p}.mlp.experts.{e}.up_proj.weight", (I, H), True),
                            (f"{p}.mlp.experts.{e}.down_proj.weight", (H, I), True)]
                Is = I * c.get("n_shared_experts", 1)
                out += [(f"{p}.mlp.shared_experts.gate_proj.weight", (Is, H), True),
                        (f"{p}.mlp.shared_experts.up_proj.weight", (Is, H), True),
                        (f"{p}.mlp.shared_experts.down_proj.weight", (H, Is), True)]
                continue
        else:
            heads = c["num_attention_heads"]
            kv = c.get("num_key_value_heads") or heads
            hd = c.get("head_dim") or H // heads
            a = f"{p}.self_attn"
            out += [(f"{a}.q_proj.weight", (heads * hd, H), True), (f"{a}.k_proj.weight", (kv * hd, H), True),
                    (f"{a}.v_proj.weight", (kv * hd, H), True), (f"{a}.o_proj.weight", (H, heads * hd), True)]
            if mt in ("qwen2", "qwen2_moe") or c.get("attention_bias"):
                out += [(f"{a}.q_proj.bias", (heads * hd,), False), (f"{a}.k_proj.bias", (kv * hd,), False),
                        (f"{a}.v_proj.bias", (kv * hd,), False)]
            if mt in ("qwen3", "qwen3_moe"):
                out += [(f"{a}.q_norm.weight", (hd,), False), (f"{a}.k_norm.weight", (hd,), False)]
            if mt == "minimax_m2":  # q/k norms over all heads
                out += [(f"{a}.q_norm.weight", (heads * hd,), False), (f"{a}.k_norm.weight", (kv * hd,), False)]
            if mt == "minimax_m3":  # per-head norms; the sparse layers' indexer; dense or MoE
                out += [(f"{a}.q_norm.weight", (hd,), False), (f"{a}.k_norm.weight", (hd,), False)]
                sa = c.get("sparse_attention_config") or {}
                if (sa.get("sparse_attention_freq") or [0] * (i + 1))[i]:
                    ih, idim = sa["sparse_num_index_heads"], sa["sparse_index_dim"]
                    out += [(f"{a}.index_q_proj.weight", (ih * idim, H), True), (f"{a}.index_k_proj.weight", (idim, H), True),
                            (f"{a}.index_q_norm.weight", (idim,), False), (f"{a}.index_k_norm.weight", (idim,), False)]
                freq = c.get("moe_layer_freq")
                if freq is not None and not freq[i]:
                    I = c["dense_intermediate_size"]
                    out += [(f"{p}.mlp.gate_proj.weight", (I, H), True), (f"{p}.mlp.up_proj.weight", (I, H), True),
                            (f"{p}.mlp.down_proj.weight", (H, I), True)]
                    continue
                Is = c["intermediate_size"] * c.get("n_shared_experts", 0)
                if Is:
                    m = f"{p}.block_sparse_moe.shared_experts"
                    out += [(f"{m}.gate_proj.weight", (Is, H), True), (f"{m}.up_proj.weight", (Is, H), True),
                            (f"{m}.down_proj.weight", (H, Is), True)]
            if mt in ("qwen3_moe", "qwen2_moe", "mixtral", "minimax_m2", "minimax_m3"):
                E = c.get("num_experts") or c["num_local_experts"]
                I = c.get("moe_intermediate_size") or c["intermediate_size"]
                pre, names = (f"{p}.block_sparse_moe", ("w1", "w3", "w2")) if mt in ("mixtral", "minimax_m2", "minimax_m3") else \
                    (f"{p}.mlp", ("gate_proj", "up_proj", "down_proj"))
                out += [(f"{pre}.gate.weight", (E, H), False)]
                if mt == "minimax_m2" or (mt == "minimax_m3" and c.get("use_routing_bias")):
                    out += [(f"{pre}.e_score_correction_bias", (E,), False)]
                for e in range(E):
                    out += [(f"{pre}.experts.{e}.{names[0]}.weight", (I, H), True),
                            (f"{pre}.experts.{e}.{names[1]}.weight", (I, H), True),
                            (f"{pre}.experts.{e}.{names[2]}.weight", (H, I), True)]
                continue
        I = c["intermediate_size"]
        out += [(f"{p}.mlp.gate_proj.weight", (I, H), True), (f"{p}.mlp.up_proj.weight", (I, H), True),
                (f"{p}.mlp.down_proj.weight", (H, I), True)]
    return out


def _random(shape, dtype, gen) -> torch.Tensor:
    n = math.prod(shape)
    raw = torch.randint(0, 256, (n * torch.empty((), dtype=dtype).element_size(),), dtype=torch.uint8, generator=gen)
    if dtype == torch.float8_e4m3fn:
        raw[(raw & 0x7F) == 0x7F] = 0x7E  # no NaN bytes
        return raw.view(dtype).view(shape)
    # finite floats of moderate magnitude
    return (torch.randn(shape, generator=gen) * 0.05).to(dtype)


def write_checkpoint(directory, config: dict, fp8: bool = True, scale_dtype=torch.float32, shard_bytes: int = 2 << 30,
                     seed: int = 0, progress: bool = False) -> Path:
    """Write a checkpoint for ``config`` into ``directory`` (a progress bar with ``progress``); returns its path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    entries: List[Tuple[str, Tuple[int, ...], torch.dtype]] = []
    for name, shape, linear in checkpoint_tensors(config):
        if fp8 and linear:
            entries.append((name, shape, torch.float8_e4m3fn))
            entries.append((name + "_scale_inv", (-(-shape[0] // 128), -(-shape[1] // 128)), scale_dtype))
        else:
            entries.append((name, shape, torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16))
    files: List[List] = [[]]
    size = 0
    for e in entries:
        nbytes = math.prod(e[1]) * torch.empty((), dtype=e[2]).element_size()
        if size + nbytes > shard_bytes and files[-1]:
            files.append([])
            size = 0
        files[-1].append(e)
        size += nbytes
    weight_map, total = {}, 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(math.prod(e[1]) * torch.empty((), dtype=e[2]).element_size() for e in entries), unit="B",
                   unit_scale=True, unit_divisor=1024, desc="writing the checkpoint", leave=False)
    for k, group in enumerate(files):
        fname = f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
        head, _ = write_safetensors_header([(n, TORCH_TO_SAFETENSORS[dt], s) for n, s, dt in group], {"format": "pt"})
        tmp = d / (fname + ".tmp")
        with open(tmp, "wb") as f:
            f.write(head)
            for name, shape, dtype in group:
                if name.endswith("_scale_inv"):
                    t = (torch.rand(shape, generator=gen) * 1e-3 + 1e-4).to(dtype)
                else:
                    t = _random(shape, dtype, gen)
                f.write(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
                weight_map[name] = fname
                total += t.numel() * t.element_size()
                if bar is not None:
                    bar.update(t.numel() * t.element_size())
        os.replace(tmp, d / fname)
    if bar is not None:
        bar.close()
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                "weight_map": weight_map}, indent=1))
    cfg = dict(config)
    if not fp8:
        cfg.pop("quantization_config", None)
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    return d


def allocate_targets(preset_targets, device, dtype=None) -> Dict[str, torch.Tensor]:
    """Empty tensors for a preset's targets (what an engine would have allocated)."""
    out = {}
    for name, spec in preset_targets.items():
        out[name] = torch.empty(spec.shape, dtype=dtype or spec.dtype, device=device)
    return out


# vLLM-layout parameters a block-FP8 model holds in FP8 (fused projections, expert stacks); the
# head, embeddings, norms and routers stay in the model's dtype.
FP8_PARAM_SUFFIXES = ("_proj.weight", "experts.w13_weight", "experts.w2_weight")


def trainer_tensors(config: dict, device, seed: int = 0) -> Dict[str, torch.Tensor]:
    """A trainer's state for ``config``: every HF-named tensor, random BF16 (float32 where the
    checkpoints keep it), made on ``device``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, shape, _ in checkpoint_tensors(config):
        dt = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
        out[name] = (torch.randn(shape, generator=gen, device=device) * 0.05).to(dt)
    return out


def with_fp8_weights(params: Dict[str, torch.Tensor], block: int = 128) -> Dict[str, torch.Tensor]:
    """``params`` (allocated targets) as a block-FP8 rollout model holds them: each FP8 linear
    weight e4m3fn, beside a float32 ``…weight_scale_inv`` grid of ``block``-square blocks."""
    out = dict(params)
    for name, t in params.items():
        if t.dim() >= 2 and name.endswith(FP8_PARAM_SUFFIXES) and "lm_head" not in name:
            out[name] = torch.empty(t.shape, dtype=torch.float8_e4m3fn, device=t.device)
            grid = tuple(t.shape[:-2]) + (-(-t.shape[-2] // block), -(-t.shape[-1] // block))
            out[name + "_scale_inv"] = torch.empty(grid, dtype=torch.float32, device=t.device)
    return out
