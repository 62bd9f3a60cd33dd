"""gpt-oss: attention with sinks and biases, and MXFP4 experts kept packed in vLLM's MXFP4 layout
(``w13_weight`` uint8 ``[E, 2I, H/2]``, ``w13_weight_scale`` ``[E, 2I, H/32]``, ``w2_weight``
``[E, H, I/2]``, ``w2_weight_scale`` ``[E, H, I/32]``; under tensor parallelism each rank takes
``I`` in whole 32-value blocks, ``ceil(I/32 / tp)`` of them, rows ``2a..2z`` of w13 and the bytes
and scales of columns ``a..z`` of w2; the engine may pad each of them, see ``TargetSpec.padded``)
or, when the model holds them in float, dequantized into vLLM's unquantized layout: ``w13_weight``
``[E, 2I, H]`` with gate and up rows interleaved as stored, ``w2_weight`` ``[E, H, I]``, ``I`` split
in ``ceil(I / tp)`` as vLLM does there. ``w2_bias`` is zero on ranks other than 0 (the ranks'
partial sums add it once). Both read each expert's slice of the stacked tensors (``Rules.unstack``)."""


import torch

from ...errors import PyloaderInputError
from ...parallel import tp_range
from ..layout import ABSENT, ZEROS, ShardPlacement, TargetSpec
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
        dq = _dequantized(b, pe, i, emap, hidden, inter, par)
        a, z = _packed_range(inter, par)
        local, rows = z - a, (2 * a, 2 * z)
        cols = None if (a, z) == (0, inter) else (a // 2, z // 2)  # w2's bytes: two codes a byte
        scale_cols = None if cols is None else (a // 32, z // 32)
        zero_bias = par.ep_size == 1 and par.tp_rank > 0
        for name, shape, dtype, placement in (
                ("w13_weight", (2 * local, hblocks * 16), u8,
                 ShardPlacement(0, 2 * local, src_rows=rows, src_shape=(2 * inter, hblocks, 16))),
                ("w13_weight_scale", (2 * local, hblocks), u8,
                 ShardPlacement(0, 2 * local, src_rows=rows, src_shape=(2 * inter, hblocks))),
                ("w13_bias", (2 * local,), None, ShardPlacement(0, 2 * local, src_rows=rows, src_shape=(2 * inter,))),
                ("w2_weight", (hidden, blocks * 16 if cols is None else local // 2), u8,
                 ShardPlacement(0, hidden, src_cols=cols, src_shape=(hidden, blocks, 16))),
                ("w2_weight_scale", (hidden, blocks if cols is None else local // 32), u8,
                 ShardPlacement(0, hidden, src_cols=scale_cols, src_shape=(hidden, blocks))),
                ("w2_bias", (hidden,), None, ShardPlacement(0, hidden, src_shape=(hidden,)))):
            b.add(f"{pe}.{name}", (e,) + shape, i, dtype, experts=emap, shards={None: placement}, padded=True,
                  fill_from=ZEROS if name == "w2_bias" and zero_bias else None, alternative=dq.get(name, ABSENT))


def _packed_range(inter: int, par):
    """This rank's part of the intermediate dimension in vLLM's MXFP4 loader: whole 32-value blocks."""
    if par.ep_size > 1 or par.tp_size == 1:
        return 0, inter
    if inter % 32:
        raise PyloaderInputError(f"gpt-oss MXFP4 experts: intermediate_size {inter} is not a whole number of "
                                 "32-value blocks, which tensor parallelism splits")
    per = -(-(inter // 32) // par.tp_size) * 32
    return min(inter, par.tp_rank * per), min(inter, (par.tp_rank + 1) * per)


def _dequantized(b, pe: str, layer: int, emap, hidden: int, inter: int, par):
    """The experts' float targets (``alternative`` of the packed ones), filled expert by expert."""
    if par.ep_size > 1:  # expert parallel: whole experts, no tensor-parallel split
        a, z = 0, inter
    else:
        per = -(-inter // par.tp_size)
        a, z = min(inter, par.tp_rank * per), min(inter, (par.tp_rank + 1) * per)
    e, local = len(emap), z - a

    def spec(name, shape, placement, **kw):
        return TargetSpec(f"{pe}.{name}", (e,) + shape, b.dtype, layer, shards={None: placement}, experts=emap, **kw)

    zero_bias = par.ep_size == 1 and par.tp_rank > 0
    return {
        "w13_weight": spec("w13_weight", (2 * local, hidden),
                           ShardPlacement(0, 2 * local, src_rows=(2 * a, 2 * z), src_shape=(2 * inter, hidden))),
        "w2_weight": spec("w2_weight", (hidden, local),
                          ShardPlacement(0, hidden, src_cols=(a, z), src_shape=(hidden, inter))),
        "w13_bias": spec("w13_bias", (2 * local,),
                         ShardPlacement(0, 2 * local, src_rows=(2 * a, 2 * z), src_shape=(2 * inter,))),
        "w2_bias": spec("w2_bias", (hidden,), ShardPlacement(0, hidden, src_shape=(hidden,)),
                        fill_from=ZEROS if zero_bias else None),
    }


# each expert's slice of the stacked tensors, routed as experts stored one by one (the packed bytes
# and scales under names the expert mapping takes to vLLM's w13_weight / w13_weight_scale / ...)
GPT_OSS_UNSTACK = ((r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj)", r"\1.{}.\2.weight"),
                   (r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj)_bias", r"\1.{}.\2.bias"),
                   (r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj)_(blocks|scales)", r"\1.{}.\2_\3"))


def gpt_oss_expert_mapping(n_experts: int):
    return [(f"experts.{param}_", f"experts.{e}.{name}.", e, None) for e in range(n_experts)
            for name, param in (("gate_up_proj", "w13"), ("down_proj", "w2"))] + \
        [(f"experts.{param}_{what}", f"experts.{e}.{name}_{kind}", e, None) for e in range(n_experts)
         for name, param in (("gate_up_proj", "w13"), ("down_proj", "w2"))
         for kind, what in (("blocks", "weight"), ("scales", "weight_scale"))]


# vLLM's GptOssModel names its modules ``embedding`` and ``attn``; the checkpoint's are renamed to them
GPT_OSS_VLLM_NAMES = [("regex", r"^model\.embed_tokens\.", "model.embedding."), ("substring", ".self_attn.", ".attn.")]


def vllm_names(b, renames) -> None:
    """The builder's targets renamed by ``renames`` (``regex`` or ``substring`` rules)."""
    import re

    out = {}
    for name, spec in b.targets.items():
        for kind, pattern, repl in renames:
            name = re.sub(pattern, repl, name) if kind == "regex" else name.replace(pattern, repl)
        spec.name = name
        if isinstance(spec.alternative, TargetSpec):
            spec.alternative.name = name
        out[name] = spec
    b.targets.clear()
    b.targets.update(out)


GPT_OSS_RENAMES = [
    ("regex", r"\.mlp\.experts\.gate_up_proj_blocks$", ".mlp.experts.w13_weight"),
    ("regex", r"\.mlp\.experts\.gate_up_proj_scales$", ".mlp.experts.w13_weight_scale"),
    ("regex", r"\.mlp\.experts\.gate_up_proj_bias$", ".mlp.experts.w13_bias"),
    ("regex", r"\.mlp\.experts\.down_proj_blocks$", ".mlp.experts.w2_weight"),
    ("regex", r"\.mlp\.experts\.down_proj_scales$", ".mlp.experts.w2_weight_scale"),
    ("regex", r"\.mlp\.experts\.down_proj_bias$", ".mlp.experts.w2_bias"),
]
