"""gpt-oss: attention with sinks and biases, and MXFP4 experts kept packed."""


import torch

from ...parallel import tp_range
from ..layout import ShardPlacement
from .builder import llama_attention


def gpt_oss(b, c, par, layers):
    hidden, E, inter = c["hidden_size"], c["num_local_experts"], c["intermediate_size"]
    u8 = torch.uint8
    blocks = -(-inter // 32)  # MXFP4: 32 values a block, 16 bytes of packed e2m1
    hblocks = -(-hidden // 32)
    for i in range(*layers):
        p = f"model.layers.{i}"
        heads, kv, hd = llama_attention(b, p, i, c, hidden, True, False)
        b.replicated(f"{p}.self_attn.o_proj.bias", (hidden,), i)
        b.column(f"{p}.self_attn.sinks", (heads,), i)
        b.replicated(f"{p}.mlp.router.weight", (E, hidden), i)
        b.replicated(f"{p}.mlp.router.bias", (E,), i)
        if par.ep_size > 1:
            a, z = tp_range(E, par.ep_rank, par.ep_size)
            emap = {g: g - a for g in range(a, z)}
        else:
            emap = {g: g for g in range(E)}
        e = len(emap)
        pe = f"{p}.mlp.experts"
        # Pre-stacked [E, ...] checkpoint tensors; MXFP4 stays packed (no e2m1 kernel yet).
        for name, shape, dtype in (("w13_weight", (2 * inter, hblocks, 16), u8), ("w13_weight_scale", (2 * inter, hblocks), u8),
                                   ("w13_bias", (2 * inter,), None), ("w2_weight", (hidden, blocks, 16), u8),
                                   ("w2_weight_scale", (hidden, blocks), u8), ("w2_bias", (hidden,), None)):
            b.add(f"{pe}.{name}", (e,) + shape, i, dtype, experts=emap, experts_stacked_in_source=True,
                  shards={None: ShardPlacement(0, shape[0], src_shape=shape)})


GPT_OSS_RENAMES = [
    ("regex", r"\.mlp\.experts\.gate_up_proj_blocks$", ".mlp.experts.w13_weight"),
    ("regex", r"\.mlp\.experts\.gate_up_proj_scales$", ".mlp.experts.w13_weight_scale"),
    ("regex", r"\.mlp\.experts\.gate_up_proj_bias$", ".mlp.experts.w13_bias"),
    ("regex", r"\.mlp\.experts\.down_proj_blocks$", ".mlp.experts.w2_weight"),
    ("regex", r"\.mlp\.experts\.down_proj_scales$", ".mlp.experts.w2_weight_scale"),
    ("regex", r"\.mlp\.experts\.down_proj_bias$", ".mlp.experts.w2_bias"),
]
