"""Presets: routing rules and target layouts of real model families, derived from ``config.json``.

Target names and layouts follow vLLM's for each family:

| preset | families (``model_type``) | fused targets |
|---|---|---|
| ``llama`` | llama, mistral, qwen2, qwen3 (dense) | ``self_attn.qkv_proj`` (q, k, v; bias for qwen2 / ``attention_bias``), ``mlp.gate_up_proj`` (0: gate, 1: up) |
| ``qwen_moe`` | qwen2_moe, qwen3_moe | attention as ``llama``; ``mlp.experts.w13_weight`` ``[E, 2I, H]`` (w1: gate, w3: up), ``mlp.experts.w2_weight`` ``[E, H, I]``; qwen2_moe ``mlp.shared_expert.gate_up_proj`` |
| ``mixtral`` | mixtral | ``block_sparse_moe.experts.w13_weight`` / ``w2_weight`` from ``experts.N.w1/w3/w2`` |
| ``deepseek`` | deepseek_v2, deepseek_v3, kimi_k2 | MLA ``self_attn.fused_qkv_a_proj`` (q_a_proj, kv_a_proj_with_mqa) when ``q_lora_rank``; dense ``mlp.gate_up_proj`` below ``first_k_dense_replace``; experts ``w13``/``w2``; ``mlp.shared_experts.gate_up_proj``; MTP layers ``>= num_hidden_layers`` skipped |
| ``deepseek_dsa`` | deepseek_v32, glm_moe_dsa (GLM-5) | ``deepseek`` plus the sparse-attention indexer: ``self_attn.indexer.wk_weights_proj`` (wk, weights_proj) ``[index_head_dim + index_n_heads, H]``, ``indexer.wq_b``, ``indexer.k_norm`` |
| ``nemotron_h`` | nemotron_h (Nemotron-H, Nemotron 3 Nano/Super/Ultra hybrids) | ``backbone.*`` renamed to ``model.*`` (``embeddings`` → ``embed_tokens``, ``norm_f`` → ``norm``); Mamba2 mixers as stored (``in_proj``, ``conv1d``, ``A_log``, ``D``, ``dt_bias``, ``norm``, ``out_proj``; ``A_log`` kept raw for the engine's post-load hook); attention ``mixer.qkv_proj``; relu2 (non-gated) experts ``mixer.experts.w13_weight`` ``[E, I, H]`` (up only) and ``w2_weight``; LatentMoE (``moe_latent_size``, Nemotron 3 Super/Ultra): ``fc1_latent_proj``/``fc2_latent_proj`` and experts of width ``moe_latent_size``; ``mtp.*`` skipped; tensor parallel as vLLM's MambaMixer2 (in_proj ``[z|x|B|C|dt]`` and conv1d ``[x|B|C]`` split segment by segment: heads, and groups or one replicated group; ``A_log``/``D``/``dt_bias``/``norm`` by heads; ``out_proj`` by columns) |
| ``nemotron_vl`` | NemotronH_Nano_VL_V2, NemotronH_Nano_Omni_Reasoning_V3 | the ``nemotron_h`` language model under ``language_model.`` (from ``llm_config``/``text_config``); ``vision_model.*`` (RADIO tower and its ``input_conditioner.norm_mean``/``norm_std`` buffers), ``mlp1.*``, ``sound_encoder.*``, ``sound_projection.*`` pass through under their checkpoint names and stored shapes, on the first stage |
| ``kimi_k25`` | kimi_k25 (Kimi-K2.5, K2.6) | the ``deepseek`` language model under ``language_model.`` (from ``text_config``); ``vision_tower.*`` and ``mm_projector.*`` pass through on the first stage; INT4 or NVFP4 experts dequantized into the BF16 targets |
| ``minimax_m2`` | minimax_m2 (MiniMax-M2, M2.1, M2.5, M2.7) | ``self_attn.qkv_proj``; ``q_norm``/``k_norm`` over all heads, split with the heads over tensor-parallel ranks; ``block_sparse_moe.experts.w13_weight``/``w2_weight`` from ``experts.N.w1/w3/w2``; float32 ``block_sparse_moe.gate`` and ``e_score_correction_bias``; MTP modules skipped |
| ``minimax_m3`` | minimax_m3 (MiniMax-M3's language model) | ``self_attn.qkv_proj`` = q, k, v and, on the layers of ``sparse_attention_freq``, the indexer's ``index_q`` (split with the KV heads) and ``index_k`` (one head, whole on every rank); per-head ``q_norm``/``k_norm``, ``index_q_norm``/``index_k_norm``; dense layers (``moe_layer_freq`` 0) ``mlp.gate_up_proj`` of ``dense_intermediate_size``; MoE layers ``block_sparse_moe.shared_experts.gate_up_proj``, experts ``w13``/``w2`` from ``experts.N.w1/w3/w2``, float32 ``gate`` and ``e_score_correction_bias``; ``mtp.`` modules skipped |
| ``minimax_m3_vl`` | minimax_m3_vl (the MiniMax-M3 releases) | the ``minimax_m3`` language model under ``language_model.``; ``vision_tower.*``, ``multi_modal_projector.*``, ``patch_merge_mlp.*`` pass through under their checkpoint names on the first stage; ModelOpt MIXED_PRECISION (MXFP8 and NVFP4 by module, checked against ``quantized_layers``) dequantized into the BF16 targets |
| ``deepseek_v4`` | deepseek_v4 (DeepSeek-V4 Flash, Pro) | the checkpoint's own names (``layers.L.attn.*``, ``ffn.experts``, ``.scale``) into vLLM's: ``attn.fused_wqa_wkv`` (wq_a, wkv), ``compressor.fused_wkv_wgate`` (wkv, wgate; indexer's too), ``ffn.shared_experts.gate_up_proj``, experts ``w13``/``w2`` (FP4 or FP8 dequantized), float32 ``hc_*``, ``attn_sink``, ``ape``, ``e_score_correction_bias``; ``tid2eid`` of hash layers; ``mtp.*`` skipped; TP splits query heads (``wq_b``, ``attn_sink``) and output groups (``wo_a`` rows, ``wo_b`` columns), the latent KV, compressors and indexer replicated |
| ``gpt_oss`` | gpt_oss | vLLM's names: ``model.embedding``, ``attn.qkv_proj`` with bias, ``attn.sinks``, ``mlp.router``, MXFP4 experts kept packed: ``mlp.experts.w13_weight`` (uint8 blocks), ``w13_weight_scale`` (E8M0), ``w13_bias``, same for ``w2``; or, into a model holding them in float, dequantized: ``w13_weight`` ``[E, 2I, H]`` (gate/up rows interleaved as stored), ``w2_weight`` ``[E, H, I]``, biases split to match (``w2_bias`` zero on TP ranks > 0) |

Derived targets have the config's dtype (``torch_dtype``/``dtype``): FP8 checkpoint weights are
dequantized into them with their ``weight_scale_inv`` grids (``quantization_config.weight_block_size``,
default 128x128). Exceptions: ``e_score_correction_bias`` stays float32 and gpt-oss's MXFP4 tensors
stay uint8.

Parallel layouts (per rank, :class:`Parallel`):
- tensor parallel: column-parallel targets (qkv, gate_up, q_b_proj, kv_b_proj, experts' w13)
  take a range of the source's rows, row-parallel ones (o_proj, down_proj, experts' w2) a range of
  its columns; vocabulary rows of ``embed_tokens``/``lm_head`` are split too. Attention splits at
  head granularity; with more ranks than KV heads each rank holds one KV head (replicated), as vLLM
  does. Other splits are balanced (:func:`pyloader.parallel.tp_range`; vLLM pads the vocabulary to
  multiples of 64 instead). Norms, routers and the DSA indexer are replicated.
- pipeline parallel: vLLM's partition (``num_layers // pp`` each; the remainder goes one layer each
  to the ranks before the last, counting back from the second-to-last); embeddings on the first
  stage, final norm and ``lm_head`` on the last.
- expert parallel: contiguous balanced expert ranges; experts are then not tensor-parallel split.
"""

import math
from pathlib import Path
from typing import List, Optional, Union

import torch

from ...errors import PyloaderInputError
from ...format.checkpoint import read_json_object
from ...parallel import Parallel
from ..layout import ShardPlacement
from ..router import Rules
from .builder import (LLAMA_STACKED, Builder, Preset, embeddings, expert_params_mapping, language_config,
                      language_model_under, layer_range)
from .deepseek import deepseek
from .deepseek_v4 import DEEPSEEK_V4_RENAMES, DEEPSEEK_V4_STACKED, deepseek_v4
from .gpt_oss import GPT_OSS_RENAMES, GPT_OSS_UNSTACK, GPT_OSS_VLLM_NAMES, gpt_oss, gpt_oss_expert_mapping, vllm_names
from .kimi import kimi_k25, kimi_language_config
from .llama import dense_or_moe
from .minimax import MINIMAX_M3_PASSTHROUGH, MINIMAX_M3_SKIPS, MINIMAX_M3_STACKED, minimax_m2, minimax_m3
from .nemotron import NEMOTRON_H_RENAMES, nemotron_h, nemotron_pattern, nemotron_vl, nemotron_vl_language_config


def load_config(config: Union[str, Path, dict, None]) -> dict:
    if config is None:
        return {}
    if isinstance(config, dict):
        return config
    return read_json_object(Path(config), "config")


_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "half": torch.float16,
           "float": torch.float32}


FAMILIES = {
    "llama": ("llama", "mistral", "qwen2", "qwen3"),
    "qwen_moe": ("qwen2_moe", "qwen3_moe"),
    "mixtral": ("mixtral",),
    "deepseek": ("deepseek_v2", "deepseek_v3", "kimi_k2"),
    "deepseek_dsa": ("deepseek_v32", "glm_moe_dsa"),
    "gpt_oss": ("gpt_oss",),
    "nemotron_h": ("nemotron_h",),
    "nemotron_vl": ("NemotronH_Nano_VL_V2", "NemotronH_Nano_Omni_Reasoning_V3"),
    "kimi_k25": ("kimi_k25",),
    "minimax_m2": ("minimax_m2",),
    "minimax_m3": ("minimax_m3",),
    "minimax_m3_vl": ("minimax_m3_vl",),
    "deepseek_v4": ("deepseek_v4",),
}


PRESETS = tuple(FAMILIES)
WRAPPERS = ("nemotron_vl", "kimi_k25", "minimax_m3_vl")  # a language model's preset under a prefix, towers passed through


# architectures whose configs carry another model_type (sgl-project's DeepSeek-V4 FP8: "deepseek_ref")
ARCHITECTURES = {"DeepseekV4ForCausalLM": "deepseek_v4"}


def choose_preset(config: dict) -> str:
    mt = config.get("model_type")
    for preset, types in FAMILIES.items():
        if mt in types:
            return preset
    archs = config.get("architectures")
    archs = [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []
    for a in archs:
        if a in ARCHITECTURES:
            return ARCHITECTURES[a]
    archs = " ".join(archs)
    raise PyloaderInputError(
        f"no preset for model_type {mt!r} ({archs or 'no architectures'}); known: "
        f"{', '.join(t for ts in FAMILIES.values() for t in ts)}. Pass preset=… or your own rules and targets."
    )


def build_preset(config: Union[str, Path, dict], preset: Optional[str] = None, parallel: Parallel = Parallel(),
                 dtype: Optional[torch.dtype] = None) -> Preset:
    """Rules and this rank's targets (shapes per rank) for ``config``."""
    c = load_config(config)
    name = preset or choose_preset(c)
    if name not in WRAPPERS and isinstance(c.get("text_config"), dict) and "hidden_size" not in c:
        raise PyloaderInputError("multimodal configs (text_config) have no preset yet; pass rules and targets")
    if name not in FAMILIES:
        raise PyloaderInputError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    dtype = dtype or _DTYPES.get(str(c.get("torch_dtype") or c.get("dtype") or "bfloat16"), torch.bfloat16)
    if name == "nemotron_vl":
        return nemotron_vl(build_preset(nemotron_vl_language_config(c), "nemotron_h", parallel, dtype), dtype)
    if name == "kimi_k25":
        if not isinstance(c.get("text_config"), dict):
            raise PyloaderInputError("kimi_k25: config has no text_config for the language model")
        return kimi_k25(build_preset(kimi_language_config(c), "deepseek", parallel, dtype), dtype)
    if name == "minimax_m3_vl":
        if not isinstance(c.get("text_config"), dict):
            raise PyloaderInputError("minimax_m3_vl: config has no text_config for the language model")
        lm = build_preset(language_config(c, "minimax_m3"), "minimax_m3", parallel, dtype)
        return language_model_under(lm, name, "language_model.", MINIMAX_M3_PASSTHROUGH, dtype,
                                    extra_skips=MINIMAX_M3_SKIPS)
    _check_sizes(c, name)
    if name == "qwen_moe" and "num_experts" not in c and "num_local_experts" in c:
        c = dict(c, num_experts=c["num_local_experts"])  # transformers >= 5 writes num_experts under this name
    try:
        preset = _build(c, name, parallel, dtype)
    except KeyError as e:  # a field the family needs is absent: name it, not a traceback
        raise PyloaderInputError(f"config.json has no {e.args[0]!r}, which the {name} preset needs") from None
    except (TypeError, ValueError, ZeroDivisionError, IndexError) as e:  # fields of the wrong kind or that disagree
        raise PyloaderInputError(f"config.json does not describe a {name} model: {type(e).__name__}: {e}") from None
    for spec in preset.targets.values():  # a field left null gives a shape no tensor can have
        if not all(type(d) is int and d >= 0 for d in spec.shape) or math.prod(spec.shape) >= 1 << 63:
            raise PyloaderInputError(f"config.json gives {spec.name} the shape {list(spec.shape)} (the {name} preset; "
                                     "a size field null or of the wrong kind?)")
    return preset


# Sizes the presets build targets and loops from: whole numbers no real model comes near the
# bounds of, checked before any is used (a layer count of 2^40 would loop for hours).
_SIZE_FIELDS = (
    "hidden_size", "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size", "vocab_size",
    "num_attention_heads", "num_key_value_heads", "head_dim", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
    "qk_rope_head_dim", "v_head_dim", "index_head_dim", "index_n_heads", "mamba_num_heads", "mamba_head_dim",
    "n_groups", "ssm_state_size", "conv_kernel", "moe_latent_size", "moe_shared_expert_intermediate_size",
    "dense_intermediate_size",
)
_COUNT_FIELDS = ("num_hidden_layers", "num_experts", "n_routed_experts", "num_local_experts", "n_shared_experts",
                 "first_k_dense_replace", "moe_layer_freq", "decoder_sparse_step")
_MAX_SIZE, _MAX_COUNT = 1 << 24, 1 << 16


def _check_sizes(c: dict, name: str) -> None:
    for field, bound in [(f, _MAX_SIZE) for f in _SIZE_FIELDS] + [(f, _MAX_COUNT) for f in _COUNT_FIELDS]:
        v = c.get(field)
        if v is None:
            continue
        if field == "moe_layer_freq" and isinstance(v, list) and all(x in (0, 1) for x in v):
            continue  # MiniMax-M3: a flag a layer
        if type(v) is not int or not 0 <= v <= bound:
            raise PyloaderInputError(f"config.json: {field} = {v!r} is not a whole number in [0, {bound}] "
                                     f"(the {name} preset builds its targets from it)")


def _build(c: dict, name: str, parallel: Parallel, dtype: torch.dtype) -> Preset:
    b = Builder(c, parallel, dtype)
    n = c.get("num_hidden_layers") or (len(nemotron_pattern(c)) if name == "nemotron_h" else c["num_hidden_layers"])
    layers = layer_range(c, parallel, n)
    first, last = layers[0] == 0, layers[1] == n
    tied = bool(c.get("tie_word_embeddings"))
    embeddings(b, c["vocab_size"], c["hidden_size"], tied, first, last)
    stacked = list(LLAMA_STACKED)
    experts_map: List = []
    renames: List = []
    skips: tuple = ()
    unstack: tuple = ()
    if name == "llama":
        dense_or_moe(b, c, parallel, layers, "dense")
    elif name == "qwen_moe":
        dense_or_moe(b, c, parallel, layers, "moe")
        experts_map = expert_params_mapping(c["num_experts"])
    elif name == "mixtral":
        dense_or_moe(b, c, parallel, layers, "mixtral")
        experts_map = expert_params_mapping(c["num_local_experts"], "w1", "w3", "w2")
    elif name in ("deepseek", "deepseek_dsa"):
        deepseek(b, c, parallel, layers, name == "deepseek_dsa")
        stacked += [(".fused_qkv_a_proj", ".q_a_proj", 0), (".fused_qkv_a_proj", ".kv_a_proj_with_mqa", 1)]
        if name == "deepseek_dsa":
            stacked += [(".indexer.wk_weights_proj", ".indexer.wk", 0),
                        (".indexer.wk_weights_proj", ".indexer.weights_proj", 1)]
        if c.get("n_routed_experts"):
            experts_map = expert_params_mapping(c["n_routed_experts"])
    elif name == "deepseek_v4":
        deepseek_v4(b, c, parallel, layers)
        stacked = list(DEEPSEEK_V4_STACKED)
        experts_map = expert_params_mapping(c["n_routed_experts"], "w1", "w3", "w2")
        renames = DEEPSEEK_V4_RENAMES
        skips = (("prefix", "mtp.", "MTP draft module (loaded by the draft model)"),)
        if not last:
            skips += (("prefix", "hc_head_", "final norm and head live on the last pipeline stage"),)
    elif name == "minimax_m2":
        minimax_m2(b, c, parallel, layers)
        experts_map = expert_params_mapping(c["num_local_experts"], "w1", "w3", "w2")
    elif name == "minimax_m3":
        minimax_m3(b, c, parallel, layers)
        stacked += MINIMAX_M3_STACKED
        experts_map = expert_params_mapping(c["num_local_experts"], "w1", "w3", "w2")
        skips = MINIMAX_M3_SKIPS
    elif name == "gpt_oss":
        gpt_oss(b, c, parallel, layers)
        renames = GPT_OSS_RENAMES + GPT_OSS_VLLM_NAMES
        vllm_names(b, GPT_OSS_VLLM_NAMES)
        experts_map = gpt_oss_expert_mapping(c["num_local_experts"])
        unstack = GPT_OSS_UNSTACK
    elif name == "nemotron_h":
        nemotron_h(b, c, parallel, layers)
        renames = NEMOTRON_H_RENAMES
        skips = (("prefix", "mtp.", "MTP draft module (loaded by the draft model)"),)
        stacked = [(".qkv_proj", ".q_proj", "q"), (".qkv_proj", ".k_proj", "k"), (".qkv_proj", ".v_proj", "v")]
        experts_map = [(f"experts.{p}_", f"experts.{e}.{n}.", e, sid) for e in range(c.get("n_routed_experts") or 0)
                       for n, p, sid in (("up_proj", "w13", "w1"), ("down_proj", "w2", "w2"))]
    q = c.get("quantization_config") or {}
    block = tuple(q.get("weight_block_size") or (128, 128))
    rules = Rules(stacked_params_mapping=stacked, expert_params_mapping=experts_map, renames=renames,
                  skips=skips, tie_word_embeddings=tied, num_layers=n, owned_layers=range(*layers), unstack=unstack)
    if tied and last and not first:  # the last stage's head is read from the embedding
        lm = b.targets["lm_head.weight"]
        lm.fill_from, lm.shards = None, {None: ShardPlacement(0, lm.shape[0], src_rows=b.tp(c["vocab_size"]),
                                                              src_shape=(c["vocab_size"], c["hidden_size"]))}
        rules.renames = tuple(rules.renames) + (("regex", r"^model\.embed_tokens\.weight$", "lm_head.weight"),)
    elif not first:
        rules.skips = tuple(rules.skips) + (("regex", r"^model\.embed_tokens\.", "embeddings live on the first pipeline stage"),)
    if not last:
        rules.skips = tuple(rules.skips) + (("regex", r"^(model\.norm\.|lm_head\.)", "final norm and head live on the last pipeline stage"),)
    return Preset(name, rules, b.targets, n, layers, (int(block[0]), int(block[1])), quantized=bool(q))
