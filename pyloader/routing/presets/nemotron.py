"""Nemotron-H hybrids (Mamba2, attention, MLP, relu2 and LatentMoE experts) and Nemotron Nano VL
(the hybrid language model beside vision and audio towers passed through)."""


import torch

from ...errors import PyloaderInputError
from ..router import Rules
from .builder import Preset, language_model_under


def nemotron_pattern(c: dict) -> str:
    """Layer kinds, one letter a layer: ``hybrid_override_pattern`` or the spelled-out ``layers_block_type``."""
    if c.get("hybrid_override_pattern"):
        return c["hybrid_override_pattern"]
    if c.get("layers_block_type"):  # newer configs (Nemotron 3) spell the pattern out
        kinds = {"mamba": "M", "moe": "E", "attention": "*", "mlp": "-"}
        try:
            return "".join(kinds[k] for k in c["layers_block_type"])
        except KeyError as e:
            raise PyloaderInputError(f"nemotron_h: unknown layers_block_type {e.args[0]!r}") from None
    raise PyloaderInputError("nemotron_h: config has neither hybrid_override_pattern nor layers_block_type")


def nemotron_h(b, c, par, layers):
    """Nemotron-H hybrid (``hybrid_override_pattern`` or ``layers_block_type``: M Mamba2, E MoE, * attention, - MLP)."""
    H = c["hidden_size"]
    pattern = nemotron_pattern(c)
    nh, hd_m, ng, ds = c["mamba_num_heads"], c["mamba_head_dim"], c["n_groups"], c["ssm_state_size"]
    d_inner = nh * hd_m
    conv_dim = d_inner + 2 * ng * ds
    tp = par.tp_size
    if nh % tp:
        raise PyloaderInputError(f"nemotron_h: {nh} Mamba heads do not split over tp_size {tp}")
    if ng % tp and ng != 1:
        raise PyloaderInputError(f"nemotron_h: {ng} Mamba groups do not split over tp_size {tp} (only 1 group is "
                                 "replicated)")
    # vLLM's MambaMixer2 layout on a rank: in_proj [z | x | B | C | dt] and conv1d [x | B | C], each
    # segment this rank's share: z, x and dt by heads, B and C by groups (one group: replicated).
    heads = b.tp(nh)
    inner = (heads[0] * hd_m, heads[1] * hd_m)
    groups = (0, ng * ds) if ng % tp else b.tp(ng * ds, ds)
    xbc = [(d_inner + inner[0], d_inner + inner[1]), (2 * d_inner + groups[0], 2 * d_inner + groups[1]),
           (2 * d_inner + ng * ds + groups[0], 2 * d_inner + ng * ds + groups[1])]
    in_proj = [inner] + xbc + [(d_inner + conv_dim + heads[0], d_inner + conv_dim + heads[1])]
    conv = [(a - d_inner, z - d_inner) for a, z in xbc]
    for i in range(*layers):
        p = f"model.layers.{i}"
        m = f"{p}.mixer"
        b.replicated(f"{p}.norm.weight", (H,), i)
        kind = pattern[i]
        if kind == "M":
            b.segmented_column(f"{m}.in_proj.weight", (d_inner + conv_dim + nh, H), in_proj, i)
            b.segmented_column(f"{m}.conv1d.weight", (conv_dim, 1, c.get("conv_kernel") or 4), conv, i)
            if c.get("use_conv_bias", True):
                b.segmented_column(f"{m}.conv1d.bias", (conv_dim,), conv, i)
            for name in ("A_log", "D", "dt_bias"):
                b.column(f"{m}.{name}", (nh,), i, dtype=torch.float32 if name == "A_log" else None)
            b.column(f"{m}.norm.weight", (d_inner,), i, unit=hd_m)  # gated RMSNorm over this rank's heads
            b.row(f"{m}.out_proj.weight", (H, d_inner), i, unit=hd_m)
        elif kind == "E":
            E = c["n_routed_experts"]
            b.replicated(f"{m}.gate.weight", (E, H), i)
            b.replicated(f"{m}.gate.e_score_correction_bias", (E,), i, dtype=torch.float32)
            latent = c.get("moe_latent_size")  # LatentMoE (Nemotron 3 Super/Ultra): experts work in a smaller width
            if latent:
                b.replicated(f"{m}.fc1_latent_proj.weight", (latent, H), i)
                b.replicated(f"{m}.fc2_latent_proj.weight", (H, latent), i)
            # relu2 experts are not gated: w13 holds the up projection only
            b.experts(f"{m}.experts", i, E, latent or H, c["moe_intermediate_size"], w13=("w1", None))
            Is = c["moe_shared_expert_intermediate_size"] * (c.get("n_shared_experts") or 1)
            b.column(f"{m}.shared_experts.up_proj.weight", (Is, H), i)
            b.row(f"{m}.shared_experts.down_proj.weight", (H, Is), i)
        elif kind == "*":
            heads, kv = c["num_attention_heads"], c["num_key_value_heads"]
            hd = c.get("head_dim") or H // heads
            q, k = b.q_rows(heads, hd), b.kv_rows(kv, hd)
            b.stacked_column(f"{m}.qkv_proj.weight",
                             [("q", (heads * hd, H), q), ("k", (kv * hd, H), k), ("v", (kv * hd, H), k)], i)
            b.row(f"{m}.o_proj.weight", (H, heads * hd), i, unit=hd)
        elif kind == "-":
            I = c["intermediate_size"]
            b.column(f"{m}.up_proj.weight", (I, H), i)
            b.row(f"{m}.down_proj.weight", (H, I), i)
        else:
            raise PyloaderInputError(f"nemotron_h: unknown layer kind {kind!r} at layer {i} in hybrid_override_pattern")


NEMOTRON_H_RENAMES = [
    ("prefix", "backbone.embeddings.", "model.embed_tokens."),
    ("prefix", "backbone.norm_f.", "model.norm."),
    ("prefix", "backbone.", "model."),
]


VL_PASSTHROUGH = ("vision_model.", "mlp1.", "sound_encoder.", "sound_projection.", "vision_projector.")


def nemotron_vl_language_config(c: dict) -> dict:
    """The Nemotron-H config of a Nemotron Nano VL model (``llm_config`` or ``text_config``)."""
    inner = c.get("llm_config") or c.get("text_config")
    if not isinstance(inner, dict):
        raise PyloaderInputError(f"{c.get('model_type')}: config has no llm_config/text_config for the language model")
    inner = dict(inner)
    inner.setdefault("model_type", "nemotron_h")
    return inner


def nemotron_vl(lm: Preset, dtype) -> Preset:
    """Nemotron Nano VL from its language model's preset ``lm``: that model under ``language_model.``
    (its ``backbone.*`` renamed to ``model.*``), and the RADIO vision tower
    (``vision_model.radio_model.*``, input-conditioner buffers included), the ``mlp1`` projector and
    the audio arm passed through under their checkpoint names, on the first pipeline stage."""
    pre = "language_model."
    return language_model_under(lm, "nemotron_vl", pre, VL_PASSTHROUGH, dtype,
                                renames=[("prefix", pre + "backbone.embeddings.", pre + "model.embed_tokens."),
                                         ("prefix", pre + "backbone.norm_f.", pre + "model.norm."),
                                         ("prefix", pre + "backbone.", pre + "model.")],
                                extra_skips=[("prefix", pre + "mtp.", "MTP draft module (loaded by the draft model)")])
