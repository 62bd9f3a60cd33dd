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
| ``gpt_oss`` | gpt_oss | ``self_attn.qkv_proj`` with bias, ``self_attn.sinks``, ``mlp.router``, MXFP4 experts kept packed: ``mlp.experts.w13_weight`` (uint8 blocks), ``w13_weight_scale`` (E8M0), ``w13_bias``, same for ``w2`` |

Derived targets have the config's dtype (``torch_dtype``/``dtype``): FP8 checkpoint weights are
dequantized into them with their ``weight_scale_inv`` grids (``quantization_config.weight_block_size``,
default 128x128). Exceptions: ``e_score_correction_bias`` stays float32 and gpt-oss's MXFP4 tensors
stay uint8.

Parallel layouts (per rank, :class:`Parallel`):
- tensor parallel: column-parallel targets (qkv, gate_up, q_b_proj, kv_b_proj, experts' w13)
  take a range of the source's rows, row-parallel ones (o_proj, down_proj, experts' w2) a range of
  its columns; vocabulary rows of ``embed_tokens``/``lm_head`` are split too. Attention splits at
  head granularity; with more ranks than KV heads each rank holds one KV head (replicated), as vLLM
  does. Other splits are balanced (:func:`pyloader.assembly.tp_range`; vLLM pads the vocabulary to
  multiples of 64 instead). Norms, routers and the DSA indexer are replicated.
- pipeline parallel: vLLM's partition (``num_layers // pp`` each; the remainder goes one layer each
  to the ranks before the last, counting back from the second-to-last); embeddings on the first
  stage, final norm and ``lm_head`` on the last.
- expert parallel: contiguous balanced expert ranges; experts are then not tensor-parallel split.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .assembly import tp_range
from .errors import PyloaderInputError
from .router import Rules

Range = Tuple[int, int]


@dataclass(frozen=True)
class Parallel:
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    layers: Optional[Range] = None  # explicit [start, stop) layer range instead of the PP partition

    def __post_init__(self):
        for what, r, n in (("tp", self.tp_rank, self.tp_size), ("pp", self.pp_rank, self.pp_size),
                           ("ep", self.ep_rank, self.ep_size)):
            if n < 1 or not 0 <= r < n:
                raise PyloaderInputError(f"{what} rank {r} is not in [0, {n})")


def pp_layer_range(num_layers: int, pp_rank: int, pp_size: int) -> Range:
    """vLLM's even partition: ``num_layers // pp_size`` layers a stage; the ``num_layers % pp_size``
    extra layers go one each to the stages before the last, from the second-to-last backwards
    (the first stage also holds the embeddings and the last the head)."""
    if pp_size < 1 or not 0 <= pp_rank < pp_size:
        raise PyloaderInputError(f"pp rank {pp_rank} is not in [0, {pp_size})")
    if num_layers < pp_size:
        raise PyloaderInputError(f"{num_layers} layers cannot be split over {pp_size} pipeline stages")
    sizes = [num_layers // pp_size] * pp_size
    for i in range(2, num_layers % pp_size + 2):
        sizes[-i] += 1
    start = sum(sizes[:pp_rank])
    return start, start + sizes[pp_rank]


@dataclass
class ShardPlacement:
    """Where one checkpoint tensor (or this rank's part of it) lands in a target's plane."""

    offset: int                            # first row of the target plane (dim 0; a 1-D target: element)
    size: int                              # rows (elements) taken on this rank
    src_rows: Optional[Range] = None       # range of the source's rows (dim 0) taken; None: all
    src_cols: Optional[Range] = None       # range of the source's columns (dim 1) taken; None: all
    src_shape: Optional[Tuple[int, ...]] = None  # expected shape of the whole source (one expert's)
    # A source whose rank-local part is several row ranges (the Mamba2 in_proj [z|x|B|C|dt] split
    # segment by segment): each is its own placement; the plan makes one piece per segment.
    segments: Optional[Tuple["ShardPlacement", ...]] = None


@dataclass
class TargetSpec:
    """A parameter or buffer on this rank, and how checkpoint tensors fill it."""

    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    layer: Optional[int] = None
    shards: Dict[Any, ShardPlacement] = field(default_factory=dict)  # shard id (None: unstacked) → placement
    experts: Optional[Dict[int, int]] = None   # expert targets: global expert id → local slot
    experts_stacked_in_source: bool = False    # one checkpoint tensor holds all experts [E, ...]
    fill_from: Optional[str] = None            # tied: filled from this target after loading
    shape_known: bool = True                   # False: a pass-through target seen through an index only

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class Preset:
    name: str
    rules: Rules
    targets: Dict[str, TargetSpec]
    num_layers: int
    owned_layers: Range
    block_size: Tuple[int, int] = (128, 128)
    quantized: bool = False
    # checkpoint names under these prefixes fill identically named targets shaped as stored
    # (towers whose layout the preset does not derive: vision, projector, audio)
    passthrough: Tuple[str, ...] = ()
    dtype: torch.dtype = torch.bfloat16

    def add_passthrough(self, tensors) -> None:
        """Add the pass-through targets for a checkpoint's tensors (see ``passthrough``)."""
        if self.passthrough:
            self.targets.update(passthrough_targets(tensors, self.passthrough, self.dtype))


def passthrough_targets(tensors, prefixes: Sequence[str], dtype: torch.dtype) -> Dict[str, TargetSpec]:
    """Targets for checkpoint tensors under ``prefixes``: same name, stored shape (replicated)."""
    out = {}
    prefixes = tuple(prefixes)
    for name, info in tensors.items():
        if not name.startswith(prefixes):
            continue
        tdt = info.torch_dtype if info.torch_dtype is not None and not info.torch_dtype.is_floating_point else None
        if info.shape is None:  # index only: the shape is not known until the header is read
            out[name] = TargetSpec(name, (), tdt or dtype, None, shards={None: ShardPlacement(0, 1)}, shape_known=False)
            continue
        shape = tuple(info.shape)
        rows = shape[0] if shape else 1
        src = info.torch_dtype
        keep = src if (src is not None and (not src.is_floating_point or src == torch.float32)) else dtype
        out[name] = TargetSpec(name, shape, keep, None, shards={None: ShardPlacement(0, rows, src_shape=shape)})
    return out


def load_config(config: Union[str, Path, dict, None]) -> dict:
    if config is None:
        return {}
    if isinstance(config, dict):
        return config
    p = Path(config)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PyloaderInputError(f"{p}: cannot read config: {e}") from None


_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "half": torch.float16,
           "float": torch.float32}


def _cfg(config: dict, *keys, default=None):
    for k in keys:
        if config.get(k) is not None:
            return config[k]
    if default is not None:
        return default
    raise PyloaderInputError(f"config.json has none of {keys}")


class _Builder:
    """Accumulates the targets of one rank."""

    def __init__(self, config: dict, par: Parallel, dtype: torch.dtype):
        self.c, self.par, self.dtype = config, par, dtype
        self.targets: Dict[str, TargetSpec] = {}

    def tp(self, n: int, unit: int = 1) -> Range:
        """This rank's [start, stop) of n rows split at multiples of ``unit``."""
        if n % unit:
            raise PyloaderInputError(f"size {n} is not a multiple of the split unit {unit}")
        a, b = tp_range(n // unit, self.par.tp_rank, self.par.tp_size)
        return a * unit, b * unit

    def add(self, name, shape, layer=None, dtype=None, **kw) -> TargetSpec:
        spec = TargetSpec(name, tuple(shape), dtype or self.dtype, layer, **kw)
        self.targets[name] = spec
        return spec

    def replicated(self, name, shape, layer=None, dtype=None):
        return self.add(name, shape, layer, dtype, shards={None: ShardPlacement(0, shape[0], src_shape=tuple(shape))})

    def column(self, name, shape, layer=None, unit=1, dtype=None):
        """Output rows split over TP ranks (``[out, in]`` weight or ``[out]`` bias)."""
        r = self.tp(shape[0], unit)
        local = (r[1] - r[0],) + tuple(shape[1:])
        return self.add(name, local, layer, dtype,
                        shards={None: ShardPlacement(0, local[0], src_rows=r, src_shape=tuple(shape))})

    def row(self, name, shape, layer=None, unit=1, dtype=None):
        """Input columns split over TP ranks (``[out, in]``)."""
        r = self.tp(shape[1], unit)
        local = (shape[0], r[1] - r[0])
        return self.add(name, local, layer, dtype,
                        shards={None: ShardPlacement(0, shape[0], src_cols=r, src_shape=tuple(shape))})

    def segmented_column(self, name, shape, segments: Sequence[Range], layer=None, dtype=None):
        """One source whose rank-local part is several row ranges, packed in order (``[out, ...]``)."""
        parts, off = [], 0
        for a, z in segments:
            parts.append(ShardPlacement(off, z - a, src_rows=(a, z), src_shape=tuple(shape)))
            off += z - a
        local = (off,) + tuple(shape[1:])
        return self.add(name, local, layer, dtype, shards={None: ShardPlacement(
            0, off, src_shape=tuple(shape), segments=tuple(parts))})

    def stacked_column(self, name, parts: Sequence[Tuple[Any, Tuple[int, ...], Range]], layer=None, dtype=None):
        """Shards stacked along rows, each taking its own source row range (TP) in order."""
        shards, off = {}, 0
        rest = tuple(parts[0][1][1:])
        for shard_id, src_shape, rows in parts:
            n = rows[1] - rows[0]
            shards[shard_id] = ShardPlacement(off, n, src_rows=rows, src_shape=tuple(src_shape))
            off += n
        return self.add(name, (off,) + rest, layer, dtype, shards=shards)

    # -- attention heads --------------------------------------------------------------------
    def q_rows(self, heads: int, head_dim: int) -> Range:
        if heads % self.par.tp_size:
            raise PyloaderInputError(f"{heads} attention heads do not split over tp_size {self.par.tp_size}")
        return self.tp(heads * head_dim, head_dim)

    def kv_rows(self, kv_heads: int, head_dim: int) -> Range:
        tp = self.par.tp_size
        if tp <= kv_heads:
            if kv_heads % tp:
                raise PyloaderInputError(f"{kv_heads} KV heads do not split over tp_size {tp}")
            return self.tp(kv_heads * head_dim, head_dim)
        if tp % kv_heads:
            raise PyloaderInputError(f"tp_size {tp} is not a multiple of {kv_heads} KV heads")
        h = self.par.tp_rank * kv_heads // tp  # one KV head a rank, replicated tp / kv_heads times
        return h * head_dim, (h + 1) * head_dim

    def mlp(self, prefix, layer, hidden, inter):
        g = self.tp(inter)
        self.stacked_column(f"{prefix}.gate_up_proj.weight", [(0, (inter, hidden), g), (1, (inter, hidden), g)], layer)
        self.row(f"{prefix}.down_proj.weight", (hidden, inter), layer)

    def experts(self, prefix, layer, num_experts, hidden, inter, w13=("w1", "w3"), w2="w2"):
        par = self.par
        if par.ep_size > 1:
            a, b = tp_range(num_experts, par.ep_rank, par.ep_size)
            emap = {g: g - a for g in range(a, b)}
            rows = (0, inter)
        else:
            emap = {g: g for g in range(num_experts)}
            rows = self.tp(inter)
        n = rows[1] - rows[0]
        shards = {w13[0]: ShardPlacement(0, n, src_rows=rows, src_shape=(inter, hidden))}
        if w13[1] is not None:  # gated (SwiGLU): gate then up
            shards[w13[1]] = ShardPlacement(n, n, src_rows=rows, src_shape=(inter, hidden))
        self.add(f"{prefix}.w13_weight", (len(emap), n * len(shards), hidden), layer, experts=emap, shards=shards)
        self.add(f"{prefix}.w2_weight", (len(emap), hidden, n), layer, experts=emap, shards={
            w2: ShardPlacement(0, hidden, src_cols=rows, src_shape=(hidden, inter))})
        return emap


def _layer_range(config: dict, par: Parallel, num_layers: int) -> Range:
    if par.layers is not None:
        a, b = par.layers
        if not 0 <= a <= b <= num_layers:
            raise PyloaderInputError(f"layer range {par.layers} is outside [0, {num_layers}]")
        return a, b
    return pp_layer_range(num_layers, par.pp_rank, par.pp_size)


def _embeddings(b: _Builder, vocab: int, hidden: int, tied: bool, first: bool, last: bool, prefix="model"):
    if first:
        b.column(f"{prefix}.embed_tokens.weight", (vocab, hidden))
    if last:
        b.replicated(f"{prefix}.norm.weight", (hidden,))
        spec = b.column("lm_head.weight", (vocab, hidden))
        if tied:
            spec.shards = {}
            spec.fill_from = f"{prefix}.embed_tokens.weight"


def _llama_attention(b: _Builder, p: str, layer: int, c: dict, hidden: int, bias: bool, qk_norm: bool):
    heads = c["num_attention_heads"]
    kv = c.get("num_key_value_heads") or heads
    hd = c.get("head_dim") or hidden // heads
    q, k = b.q_rows(heads, hd), b.kv_rows(kv, hd)
    b.stacked_column(f"{p}.self_attn.qkv_proj.weight",
                     [("q", (heads * hd, hidden), q), ("k", (kv * hd, hidden), k), ("v", (kv * hd, hidden), k)], layer)
    if bias:
        b.stacked_column(f"{p}.self_attn.qkv_proj.bias",
                         [("q", (heads * hd,), q), ("k", (kv * hd,), k), ("v", (kv * hd,), k)], layer)
    b.row(f"{p}.self_attn.o_proj.weight", (hidden, heads * hd), layer, unit=hd)
    if qk_norm:
        b.replicated(f"{p}.self_attn.q_norm.weight", (hd,), layer)
        b.replicated(f"{p}.self_attn.k_norm.weight", (hd,), layer)
    b.replicated(f"{p}.input_layernorm.weight", (hidden,), layer)
    b.replicated(f"{p}.post_attention_layernorm.weight", (hidden,), layer)
    return heads, kv, hd


LLAMA_STACKED = [(".qkv_proj", ".q_proj", "q"), (".qkv_proj", ".k_proj", "k"), (".qkv_proj", ".v_proj", "v"),
                 (".gate_up_proj", ".gate_proj", 0), (".gate_up_proj", ".up_proj", 1)]


def expert_params_mapping(num_experts: int, gate="gate_proj", up="up_proj", down="down_proj", prefix="experts."):
    """vLLM's FusedMoE.make_expert_params_mapping, as data: ``(param, weight_name, expert_id, shard_id)``."""
    out = []
    for e in range(num_experts):
        for name, param, sid in ((gate, "w13_", "w1"), (down, "w2_", "w2"), (up, "w13_", "w3")):
            out.append((f"{prefix}{param}", f"{prefix}{e}.{name}.", e, sid))
    return out


def _dense_or_moe(b, c, par, layers, kind):
    hidden = c["hidden_size"]
    for i in range(*layers):
        p = f"model.layers.{i}"
        qk_norm = c.get("model_type") in ("qwen3", "qwen3_moe")
        bias = bool(c.get("attention_bias")) or c.get("model_type") in ("qwen2", "qwen2_moe")
        _llama_attention(b, p, i, c, hidden, bias, qk_norm)
        moe_layer = kind != "dense" and i not in set(c.get("mlp_only_layers") or []) and \
            (i + 1) % (c.get("decoder_sparse_step") or 1) == 0
        if kind == "mixtral":
            E = c["num_local_experts"]
            b.replicated(f"{p}.block_sparse_moe.gate.weight", (E, hidden), i)
            b.experts(f"{p}.block_sparse_moe.experts", i, E, hidden, c["intermediate_size"])
        elif moe_layer:
            E = c["num_experts"]
            b.replicated(f"{p}.mlp.gate.weight", (E, hidden), i)
            b.experts(f"{p}.mlp.experts", i, E, hidden, c["moe_intermediate_size"])
            if c.get("shared_expert_intermediate_size"):
                b.mlp(f"{p}.mlp.shared_expert", i, hidden, c["shared_expert_intermediate_size"])
                b.replicated(f"{p}.mlp.shared_expert_gate.weight", (1, hidden), i)
        else:
            b.mlp(f"{p}.mlp", i, hidden, c["intermediate_size"])


def _deepseek(b, c, par, layers, dsa: bool):
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    qlr, kvlr = c.get("q_lora_rank"), c["kv_lora_rank"]
    nope, rope, vhd = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    qk = nope + rope
    E = c.get("n_routed_experts")
    first_dense = c.get("first_k_dense_replace", 0)
    freq = c.get("moe_layer_freq", 1)
    f32 = torch.float32
    for i in range(*layers):
        p = f"model.layers.{i}"
        a = f"{p}.self_attn"
        if qlr:
            b.stacked_column(f"{a}.fused_qkv_a_proj.weight", [(0, (qlr, hidden), (0, qlr)),
                                                               (1, (kvlr + rope, hidden), (0, kvlr + rope))], i)
            b.replicated(f"{a}.q_a_layernorm.weight", (qlr,), i)
            b.column(f"{a}.q_b_proj.weight", (heads * qk, qlr), i, unit=qk)
        else:
            b.replicated(f"{a}.kv_a_proj_with_mqa.weight", (kvlr + rope, hidden), i)
            b.column(f"{a}.q_proj.weight", (heads * qk, hidden), i, unit=qk)
        b.replicated(f"{a}.kv_a_layernorm.weight", (kvlr,), i)
        b.column(f"{a}.kv_b_proj.weight", (heads * (nope + vhd), kvlr), i, unit=nope + vhd)
        b.row(f"{a}.o_proj.weight", (hidden, heads * vhd), i, unit=vhd)
        if dsa:
            ihd, ih = c["index_head_dim"], c["index_n_heads"]
            b.replicated(f"{a}.indexer.wq_b.weight", (ih * ihd, qlr), i)
            b.stacked_column(f"{a}.indexer.wk_weights_proj.weight", [(0, (ihd, hidden), (0, ihd)),
                                                                      (1, (ih, hidden), (0, ih))], i)
            b.replicated(f"{a}.indexer.k_norm.weight", (ihd,), i)
            b.replicated(f"{a}.indexer.k_norm.bias", (ihd,), i)
        b.replicated(f"{p}.input_layernorm.weight", (hidden,), i)
        b.replicated(f"{p}.post_attention_layernorm.weight", (hidden,), i)
        if E and i >= first_dense and i % freq == 0:
            b.replicated(f"{p}.mlp.gate.weight", (E, hidden), i)
            if c.get("topk_method") == "noaux_tc" or c.get("model_type") in ("deepseek_v3", "glm_moe_dsa",
                                                                               "deepseek_v32", "kimi_k2"):
                b.replicated(f"{p}.mlp.gate.e_score_correction_bias", (E,), i, dtype=f32)
            b.experts(f"{p}.mlp.experts", i, E, hidden, c["moe_intermediate_size"])
            if c.get("n_shared_experts"):
                b.mlp(f"{p}.mlp.shared_experts", i, hidden, c["moe_intermediate_size"] * c["n_shared_experts"])
        else:
            b.mlp(f"{p}.mlp", i, hidden, c["intermediate_size"])


def _gpt_oss(b, c, par, layers):
    hidden, E, inter = c["hidden_size"], c["num_local_experts"], c["intermediate_size"]
    u8 = torch.uint8
    blocks = -(-inter // 32)  # MXFP4: 32 values a block, 16 bytes of packed e2m1
    hblocks = -(-hidden // 32)
    for i in range(*layers):
        p = f"model.layers.{i}"
        heads, kv, hd = _llama_attention(b, p, i, c, hidden, True, False)
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


def _nemotron_pattern(c: dict) -> str:
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


def _nemotron_h(b, c, par, layers):
    """Nemotron-H hybrid (``hybrid_override_pattern`` or ``layers_block_type``: M Mamba2, E MoE, * attention, - MLP)."""
    H = c["hidden_size"]
    pattern = _nemotron_pattern(c)
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
            b.segmented_column(f"{m}.conv1d.weight", (conv_dim, 1, c.get("conv_kernel", 4)), conv, i)
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


GPT_OSS_RENAMES = [
    ("regex", r"\.mlp\.experts\.gate_up_proj_blocks$", ".mlp.experts.w13_weight"),
    ("regex", r"\.mlp\.experts\.gate_up_proj_scales$", ".mlp.experts.w13_weight_scale"),
    ("regex", r"\.mlp\.experts\.gate_up_proj_bias$", ".mlp.experts.w13_bias"),
    ("regex", r"\.mlp\.experts\.down_proj_blocks$", ".mlp.experts.w2_weight"),
    ("regex", r"\.mlp\.experts\.down_proj_scales$", ".mlp.experts.w2_weight_scale"),
    ("regex", r"\.mlp\.experts\.down_proj_bias$", ".mlp.experts.w2_bias"),
]

FAMILIES = {
    "llama": ("llama", "mistral", "qwen2", "qwen3"),
    "qwen_moe": ("qwen2_moe", "qwen3_moe"),
    "mixtral": ("mixtral",),
    "deepseek": ("deepseek_v2", "deepseek_v3", "kimi_k2"),
    "deepseek_dsa": ("deepseek_v32", "glm_moe_dsa"),
    "gpt_oss": ("gpt_oss",),
    "nemotron_h": ("nemotron_h",),
    "nemotron_vl": ("NemotronH_Nano_VL_V2", "NemotronH_Nano_Omni_Reasoning_V3"),
}
VL_PASSTHROUGH = ("vision_model.", "mlp1.", "sound_encoder.", "sound_projection.", "vision_projector.")


def _nemotron_vl(c: dict, parallel: Parallel, dtype) -> Preset:
    """Nemotron Nano VL: the Nemotron-H language model under ``language_model.`` (its
    ``backbone.*`` renamed to ``model.*``), and the RADIO vision tower (``vision_model.radio_model.*``,
    input-conditioner buffers included), the ``mlp1`` projector and the audio arm passed through
    under their checkpoint names, on the first pipeline stage."""
    inner = c.get("llm_config") or c.get("text_config")
    if not isinstance(inner, dict):
        raise PyloaderInputError(f"{c.get('model_type')}: config has no llm_config/text_config for the language model")
    inner = dict(inner)
    inner.setdefault("model_type", "nemotron_h")
    lm = build_preset(inner, "nemotron_h", parallel, dtype)
    pre = "language_model."
    targets = {}
    for name, spec in lm.targets.items():
        spec.name = pre + name
        if spec.fill_from:
            spec.fill_from = pre + spec.fill_from
        targets[pre + name] = spec
    r = lm.rules
    first, last = lm.owned_layers[0] == 0, lm.owned_layers[1] == lm.num_layers
    skips = [("prefix", pre + "mtp.", "MTP draft module (loaded by the draft model)")]
    if not first:
        skips += [("regex", r"^language_model\.model\.embed_tokens\.", "embeddings live on the first pipeline stage"),
                  ("prefix", VL_PASSTHROUGH, "vision and audio towers live on the first pipeline stage")]
    if not last:
        skips += [("regex", r"^language_model\.(model\.norm\.|lm_head\.)", "final norm and head live on the last pipeline stage")]
    skips = [(k, p, why) for k, ps, why in skips for p in (ps if isinstance(ps, tuple) else (ps,))]
    rules = Rules(stacked_params_mapping=r.stacked_params_mapping, expert_params_mapping=r.expert_params_mapping,
                  renames=[("prefix", pre + "backbone.embeddings.", pre + "model.embed_tokens."),
                           ("prefix", pre + "backbone.norm_f.", pre + "model.norm."),
                           ("prefix", pre + "backbone.", pre + "model.")],
                  skips=skips, tie_word_embeddings=r.tie_word_embeddings, tied_source=pre + r.tied_source,
                  tied_target=pre + r.tied_target, num_layers=r.num_layers, owned_layers=r.owned_layers)
    return Preset("nemotron_vl", rules, targets, lm.num_layers, lm.owned_layers, lm.block_size, lm.quantized,
                  passthrough=VL_PASSTHROUGH if first else (), dtype=dtype)
PRESETS = tuple(FAMILIES)


def choose_preset(config: dict) -> str:
    mt = config.get("model_type")
    for preset, types in FAMILIES.items():
        if mt in types:
            return preset
    archs = " ".join(config.get("architectures") or [])
    raise PyloaderInputError(
        f"no preset for model_type {mt!r} ({archs or 'no architectures'}); known: "
        f"{', '.join(t for ts in FAMILIES.values() for t in ts)}. Pass preset=… or your own rules and targets."
    )


def build_preset(config: Union[str, Path, dict], preset: Optional[str] = None, parallel: Parallel = Parallel(),
                 dtype: Optional[torch.dtype] = None) -> Preset:
    """Rules and this rank's targets (shapes per rank) for ``config``."""
    c = load_config(config)
    name = preset or choose_preset(c)
    if name != "nemotron_vl" and isinstance(c.get("text_config"), dict) and "hidden_size" not in c:
        raise PyloaderInputError("multimodal configs (text_config) have no preset yet; pass rules and targets")
    if name not in FAMILIES:
        raise PyloaderInputError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    dtype = dtype or _DTYPES.get(str(c.get("torch_dtype") or c.get("dtype") or "bfloat16"), torch.bfloat16)
    if name == "nemotron_vl":
        return _nemotron_vl(c, parallel, dtype)
    try:
        return _build(c, name, parallel, dtype)
    except KeyError as e:  # a field the family needs is absent: name it, not a traceback
        raise PyloaderInputError(f"config.json has no {e.args[0]!r}, which the {name} preset needs") from None


def _build(c: dict, name: str, parallel: Parallel, dtype: torch.dtype) -> Preset:
    b = _Builder(c, parallel, dtype)
    n = c.get("num_hidden_layers") or (len(_nemotron_pattern(c)) if name == "nemotron_h" else c["num_hidden_layers"])
    layers = _layer_range(c, parallel, n)
    first, last = layers[0] == 0, layers[1] == n
    tied = bool(c.get("tie_word_embeddings"))
    _embeddings(b, c["vocab_size"], c["hidden_size"], tied, first, last)
    stacked = list(LLAMA_STACKED)
    experts_map: List = []
    renames: List = []
    skips: tuple = ()
    if name == "llama":
        _dense_or_moe(b, c, parallel, layers, "dense")
    elif name == "qwen_moe":
        _dense_or_moe(b, c, parallel, layers, "moe")
        experts_map = expert_params_mapping(c["num_experts"])
    elif name == "mixtral":
        _dense_or_moe(b, c, parallel, layers, "mixtral")
        experts_map = expert_params_mapping(c["num_local_experts"], "w1", "w3", "w2")
    elif name in ("deepseek", "deepseek_dsa"):
        _deepseek(b, c, parallel, layers, name == "deepseek_dsa")
        stacked += [(".fused_qkv_a_proj", ".q_a_proj", 0), (".fused_qkv_a_proj", ".kv_a_proj_with_mqa", 1)]
        if name == "deepseek_dsa":
            stacked += [(".indexer.wk_weights_proj", ".indexer.wk", 0),
                        (".indexer.wk_weights_proj", ".indexer.weights_proj", 1)]
        if c.get("n_routed_experts"):
            experts_map = expert_params_mapping(c["n_routed_experts"])
    elif name == "gpt_oss":
        _gpt_oss(b, c, parallel, layers)
        renames = GPT_OSS_RENAMES
    elif name == "nemotron_h":
        _nemotron_h(b, c, parallel, layers)
        renames = NEMOTRON_H_RENAMES
        skips = (("prefix", "mtp.", "MTP draft module (loaded by the draft model)"),)
        stacked = [(".qkv_proj", ".q_proj", "q"), (".qkv_proj", ".k_proj", "k"), (".qkv_proj", ".v_proj", "v")]
        experts_map = [(f"experts.{p}_", f"experts.{e}.{n}.", e, sid) for e in range(c.get("n_routed_experts") or 0)
                       for n, p, sid in (("up_proj", "w13", "w1"), ("down_proj", "w2", "w2"))]
    q = c.get("quantization_config") or {}
    block = tuple(q.get("weight_block_size") or (128, 128))
    rules = Rules(stacked_params_mapping=stacked, expert_params_mapping=experts_map, renames=renames,
                  skips=skips, tie_word_embeddings=tied, num_layers=n, owned_layers=range(*layers))
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
