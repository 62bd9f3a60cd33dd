"""DeepSeek-V4 (Flash, Pro): the checkpoint's own names (``layers.L.attn.wq_a``, ``ffn.experts.E.w1``,
``.scale``) into vLLM's model: manifold hyper-connections (``hc_attn_*``, ``hc_ffn_*``, ``hc_head_*``,
float32), MLA with a single latent KV head (``attn.fused_wqa_wkv`` = wq_a, wkv), grouped low-rank
output (``wo_a`` ``[o_groups * o_lora_rank, heads * head_dim / o_groups]``, ``wo_b``), the KV
compressor of layers whose ``compress_ratios`` entry is non-zero (``compressor.fused_wkv_wgate``,
``ape``; ratio 4 overlaps two windows, so twice the width) and the sparse-attention indexer of
ratio-4 layers (with its own compressor), hash-routed first layers (``ffn.gate.tid2eid``) then
``e_score_correction_bias`` (the checkpoint's ``ffn.gate.bias``), shared experts, routed experts
``w13``/``w2``; MTP modules skipped. Tensor parallel as vLLM's: the query heads (``wq_b``, ``attn_sink``)
and output groups (``wo_a`` rows, ``wo_b`` columns) split, the latent KV projection, compressors,
indexer and hyper-connections replicated, experts and shared experts split as MLPs."""


import torch

from ...errors import PyloaderInputError


def deepseek_v4(b, c, par, layers):
    hidden, heads, hd = c["hidden_size"], c["num_attention_heads"], c["head_dim"]
    qlr, og, olr = c["q_lora_rank"], c["o_groups"], c["o_lora_rank"]
    ih, ihd = c["index_n_heads"], c["index_head_dim"]
    hc = c["hc_mult"]
    mix = (2 + hc) * hc  # pre, post and the hc x hc residual mix
    E, inter = c["n_routed_experts"], c["moe_intermediate_size"]
    shared = inter * (c.get("n_shared_experts") or 1)
    ratios = c.get("compress_ratios") or []
    hash_layers = c.get("num_hash_layers") or 0
    f32 = torch.float32
    if layers[1] == c["num_hidden_layers"]:
        b.replicated("model.hc_head_fn", (hc, hc * hidden), dtype=f32)
        b.replicated("model.hc_head_base", (hc,), dtype=f32)
        b.replicated("model.hc_head_scale", (1,), dtype=f32)
    for i in range(*layers):
        p = f"model.layers.{i}"
        for part in ("attn", "ffn"):
            b.replicated(f"{p}.hc_{part}_fn", (mix, hc * hidden), i, dtype=f32)
            b.replicated(f"{p}.hc_{part}_base", (mix,), i, dtype=f32)
            b.replicated(f"{p}.hc_{part}_scale", (3,), i, dtype=f32)
        a = f"{p}.attn"
        if heads % par.tp_size or og % par.tp_size:
            raise PyloaderInputError(f"deepseek_v4: {heads} heads in {og} output groups do not split over "
                                     f"tp_size {par.tp_size}")
        b.column(f"{a}.attn_sink", (heads,), i, dtype=f32)
        b.stacked_column(f"{a}.fused_wqa_wkv.weight", [(0, (qlr, hidden), (0, qlr)), (1, (hd, hidden), (0, hd))], i)
        b.replicated(f"{a}.q_norm.weight", (qlr,), i)
        b.column(f"{a}.wq_b.weight", (heads * hd, qlr), i, unit=hd)
        b.replicated(f"{a}.kv_norm.weight", (hd,), i)
        b.column(f"{a}.wo_a.weight", (og * olr, heads * hd // og), i, unit=olr)  # a rank's groups of heads
        b.row(f"{a}.wo_b.weight", (hidden, og * olr), i, unit=olr)
        ratio = ratios[i] if i < len(ratios) else 0
        if ratio:
            _compressor(b, f"{a}.compressor", i, ratio, hd, hidden)
        if ratio == 4:
            b.replicated(f"{a}.indexer.wq_b.weight", (ih * ihd, qlr), i)
            b.replicated(f"{a}.indexer.weights_proj.weight", (ih, hidden), i)
            _compressor(b, f"{a}.indexer.compressor", i, ratio, ihd, hidden)
        b.replicated(f"{p}.attn_norm.weight", (hidden,), i)
        b.replicated(f"{p}.ffn_norm.weight", (hidden,), i)
        f = f"{p}.ffn"
        b.replicated(f"{f}.gate.weight", (E, hidden), i)
        if i < hash_layers:
            b.replicated(f"{f}.gate.tid2eid", (c["vocab_size"], c["num_experts_per_tok"]), i, dtype=torch.int32)
        else:
            b.replicated(f"{f}.gate.e_score_correction_bias", (E,), i, dtype=f32)
        b.mlp(f"{f}.shared_experts", i, hidden, shared)
        b.experts(f"{f}.experts", i, E, hidden, inter)


def _compressor(b, prefix: str, layer: int, ratio: int, dim: int, hidden: int):
    width = 2 * dim if ratio == 4 else dim  # ratio 4 compresses overlapping windows: two halves
    b.replicated(f"{prefix}.ape", (ratio, width), layer, dtype=torch.float32)
    b.stacked_column(f"{prefix}.fused_wkv_wgate.weight", [(0, (width, hidden), (0, width)),
                                                          (1, (width, hidden), (0, width))], layer)
    b.replicated(f"{prefix}.norm.weight", (dim,), layer)


DEEPSEEK_V4_STACKED = [(".attn.fused_wqa_wkv", ".attn.wq_a", 0), (".attn.fused_wqa_wkv", ".attn.wkv", 1),
                       (".compressor.fused_wkv_wgate", ".compressor.wkv", 0),
                       (".compressor.fused_wkv_wgate", ".compressor.wgate", 1),
                       (".shared_experts.gate_up_proj", ".shared_experts.w1", 0),
                       (".shared_experts.gate_up_proj", ".shared_experts.w3", 1)]

# the checkpoint's names as vLLM's DeepseekV4 mapper renames them (the dense FP8 weights' ``.scale``
# is their block scale; a packed expert's ``.scale`` goes with it before any rename)
DEEPSEEK_V4_RENAMES = [
    ("regex", r"^layers\.", "model.layers."),
    ("regex", r"^embed\.weight$", "model.embed_tokens.weight"),
    ("regex", r"^head\.weight$", "lm_head.weight"),
    ("regex", r"^norm\.weight$", "model.norm.weight"),
    ("regex", r"^hc_head_", "model.hc_head_"),
    ("regex", r"\.ffn\.gate\.bias$", ".ffn.gate.e_score_correction_bias"),
    ("substring", ".shared_experts.w2.", ".shared_experts.down_proj."),
    ("regex", r"\.scale$", ".weight_scale_inv"),
]
