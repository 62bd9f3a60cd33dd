"""MiniMax-M2 (M2, M2.1, M2.5, M2.7): llama attention with a q/k norm over all heads (split over
tensor-parallel ranks with the heads, as vLLM's MiniMaxText01RMSNormTP; a replicated KV head's
norm with it), every layer a MoE of ``block_sparse_moe.experts.N.w1/w3/w2``, a float32 router and
routing bias; the MTP modules (``model.layers.{num_hidden_layers}…``) are skipped."""

import torch

from ..layout import ShardPlacement
from .builder import llama_attention


def _head_split_norm(b, name, total, rows, layer):
    n = rows[1] - rows[0]
    b.add(name, (n,), layer, shards={None: ShardPlacement(0, n, src_rows=rows, src_shape=(total,))})


def minimax_m2(b, c, par, layers):
    hidden, E = c["hidden_size"], c["num_local_experts"]
    for i in range(*layers):
        p = f"model.layers.{i}"
        heads, kv, hd = llama_attention(b, p, i, c, hidden, bool(c.get("attention_bias")), qk_norm=False)
        if c.get("use_qk_norm", True):
            _head_split_norm(b, f"{p}.self_attn.q_norm.weight", heads * hd, b.q_rows(heads, hd), i)
            _head_split_norm(b, f"{p}.self_attn.k_norm.weight", kv * hd, b.kv_rows(kv, hd), i)
        m = f"{p}.block_sparse_moe"
        b.replicated(f"{m}.gate.weight", (E, hidden), i, dtype=torch.float32)
        if c.get("use_routing_bias"):
            b.replicated(f"{m}.e_score_correction_bias", (E,), i, dtype=torch.float32)
        b.experts(f"{m}.experts", i, E, hidden, c["intermediate_size"])


MINIMAX_M3_STACKED = [(".qkv_proj", ".index_q_proj", "index_q"), (".qkv_proj", ".index_k_proj", "index_k")]
MINIMAX_M3_PASSTHROUGH = ("vision_tower.", "multi_modal_projector.", "patch_merge_mlp.")
# vLLM skips every name with "mtp." in it (the draft modules), under any prefix
MINIMAX_M3_SKIPS = (("regex", r"(^|\.)mtp\.", "MTP draft modules (loaded by the draft model)"),)


def _flags(c, key, layers_total, absent):
    """A 0/1 flag a layer from ``c[key]``, or ``absent`` for every layer (vLLM's defaults)."""
    v = c.get(key)
    return [absent] * layers_total if v is None else [int(bool(x)) for x in v]


def minimax_m3(b, c, par, layers):
    """MiniMax-M3's language model as vLLM holds it: dense attention or, on the layers of
    ``sparse_attention_freq``, sparse attention whose indexer projections ride in ``qkv_proj``
    (``[q | k | v | index_q | index_k]``: index_q split like the KV heads, index_k one replicated
    head); per-head gemma q/k norms; the layers of ``moe_layer_freq`` a MoE with a shared expert,
    the others a dense MLP of ``dense_intermediate_size``."""
    hidden, n = c["hidden_size"], c["num_hidden_layers"]
    heads, kv, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    sparse_cfg = c.get("sparse_attention_config") or {}
    sparse = _flags(sparse_cfg, "sparse_attention_freq", n, 0)
    moe = _flags(c, "moe_layer_freq", n, 1)
    if len(sparse) < n or len(moe) < n:
        raise ValueError(f"sparse_attention_freq / moe_layer_freq cover fewer than {n} layers")
    E, inter = c["num_local_experts"], c["intermediate_size"]
    for i in range(*layers):
        p = f"model.layers.{i}"
        a = f"{p}.self_attn"
        q, k = b.q_rows(heads, hd), b.kv_rows(kv, hd)
        parts = [("q", (heads * hd, hidden), q), ("k", (kv * hd, hidden), k), ("v", (kv * hd, hidden), k)]
        if sparse[i]:
            ih, idim = sparse_cfg["sparse_num_index_heads"], sparse_cfg["sparse_index_dim"]
            if ih != kv:
                raise ValueError(f"sparse_num_index_heads {ih} differs from num_key_value_heads {kv} "
                                 "(vLLM shards the index queries with the KV heads)")
            parts += [("index_q", (ih * idim, hidden), b.kv_rows(ih, idim)), ("index_k", (idim, hidden), (0, idim))]
        b.stacked_column(f"{a}.qkv_proj.weight", parts, i)
        b.row(f"{a}.o_proj.weight", (hidden, heads * hd), i, unit=hd)
        b.replicated(f"{a}.q_norm.weight", (hd,), i)
        b.replicated(f"{a}.k_norm.weight", (hd,), i)
        if sparse[i]:
            b.replicated(f"{a}.index_q_norm.weight", (idim,), i)
            b.replicated(f"{a}.index_k_norm.weight", (idim,), i)
        b.replicated(f"{p}.input_layernorm.weight", (hidden,), i)
        b.replicated(f"{p}.post_attention_layernorm.weight", (hidden,), i)
        if moe[i]:
            m = f"{p}.block_sparse_moe"
            b.replicated(f"{m}.gate.weight", (E, hidden), i, dtype=torch.float32)
            if c.get("use_routing_bias"):
                b.replicated(f"{m}.e_score_correction_bias", (E,), i, dtype=torch.float32)
            if c.get("n_shared_experts"):
                b.mlp(f"{m}.shared_experts", i, hidden, inter * c["n_shared_experts"])
            b.experts(f"{m}.experts", i, E, hidden, inter)
        else:
            b.mlp(f"{p}.mlp", i, hidden, c["dense_intermediate_size"])

