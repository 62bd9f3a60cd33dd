"""What every family preset is built from: a rank's target builder (replicated, column- and
row-parallel, stacked and segmented targets; attention heads; experts), embeddings, llama-style
attention, vLLM's expert mapping, and the ``Preset`` record."""

import re
from dataclasses import dataclass
from typing import Any, Dict, Sequence, Tuple

import torch

from ...errors import PyloaderInputError
from ...parallel import Parallel, Range, pp_layer_range, tp_range
from ..layout import ShardPlacement, TargetSpec
from ..router import Rules


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


def language_config(c: dict, model_type: str) -> dict:
    """The language model's config of a multimodal one (``text_config``), with the outer dtype and tying."""
    inner = dict(c["text_config"])
    inner.setdefault("model_type", model_type)
    for key in ("torch_dtype", "dtype", "tie_word_embeddings"):
        if key in c and key not in inner:
            inner[key] = c[key]
    return inner


def language_model_under(lm: Preset, name: str, pre: str, passthrough: Tuple[str, ...], dtype: torch.dtype,
                         renames: Sequence[Tuple[str, str, str]] = (),
                         extra_skips: Sequence[Tuple[str, str, str]] = ()) -> Preset:
    """A multimodal model from its language model's preset ``lm``: every target and mapping under
    ``pre`` (``language_model.``), and the towers under ``passthrough`` prefixes passed through
    under their checkpoint names and stored shapes, on the first pipeline stage. The language
    model's own renames and skips are not carried (they are anchored at its names): ``renames``
    and ``extra_skips`` give the prefixed ones it needs; pipeline skips are made here."""
    targets = {}
    for tname, spec in lm.targets.items():
        spec.name = pre + tname
        if spec.fill_from:
            spec.fill_from = pre + spec.fill_from
        targets[pre + tname] = spec
    r = lm.rules
    first, last = lm.owned_layers[0] == 0, lm.owned_layers[1] == lm.num_layers
    skips = list(extra_skips)
    if not first:
        skips += [("regex", "^" + re.escape(pre) + r"model\.embed_tokens\.", "embeddings live on the first pipeline stage")]
        skips += [("prefix", p, "vision and audio towers live on the first pipeline stage") for p in passthrough]
    if not last:
        skips += [("regex", "^" + re.escape(pre) + r"(model\.norm\.|lm_head\.)",
                   "final norm and head live on the last pipeline stage")]
    rules = Rules(stacked_params_mapping=r.stacked_params_mapping, expert_params_mapping=r.expert_params_mapping,
                  renames=list(renames), skips=skips,
                  tie_word_embeddings=r.tie_word_embeddings, tied_source=pre + r.tied_source,
                  tied_target=pre + r.tied_target, num_layers=r.num_layers, owned_layers=r.owned_layers)
    return Preset(name, rules, targets, lm.num_layers, lm.owned_layers, lm.block_size, lm.quantized,
                  passthrough=passthrough if first else (), dtype=dtype)


class Builder:
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


def layer_range(config: dict, par: Parallel, num_layers: int) -> Range:
    if par.layers is not None:
        a, b = par.layers
        if not 0 <= a <= b <= num_layers:
            raise PyloaderInputError(f"layer range {par.layers} is outside [0, {num_layers}]")
        return a, b
    return pp_layer_range(num_layers, par.pp_rank, par.pp_size)


def embeddings(b: Builder, vocab: int, hidden: int, tied: bool, first: bool, last: bool, prefix="model"):
    if first:
        b.column(f"{prefix}.embed_tokens.weight", (vocab, hidden))
    if last:
        b.replicated(f"{prefix}.norm.weight", (hidden,))
        spec = b.column("lm_head.weight", (vocab, hidden))
        if tied:
            spec.shards = {}
            spec.fill_from = f"{prefix}.embed_tokens.weight"


def llama_attention(b: Builder, p: str, layer: int, c: dict, hidden: int, bias: bool, qk_norm: bool):
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
