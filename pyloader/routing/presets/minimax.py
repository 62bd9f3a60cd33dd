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
