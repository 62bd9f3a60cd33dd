"""The load plan: every checkpoint tensor routed, paired with its scale, checked against its target
and placed, before any GPU work. Problems are collected and reported all at once.

    plan = build_plan(checkpoint, targets, rules)            # raises PlanError listing every problem
    for layer, pieces in plan.by_layer():                     # the executor's work list
        for p in pieces: p.read_range, p.target, p.placement, p.scale ...
"""

import logging
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from ..dtypes import FP8_SAFETENSORS, FP8_WEIGHT_DTYPES
from ..errors import PyloaderInputError
from ..format.checkpoint import Checkpoint, gc_paused
from ..format.safetensors import TensorInfo
from ..format.quant import Quantized, Recognition
from ..format.scales import scale_block
from .layout import ZEROS, ShardPlacement, TargetSpec
from .router import Route, Router, RoutingSummary, Rules, unexpected_error

logger = logging.getLogger("pyloader")

FLOAT_TARGETS = (torch.bfloat16, torch.float16, torch.float32)
_FLOAT_SOURCES = ("BF16", "F16", "F32", "F64")


class PlanError(PyloaderInputError):
    """Everything wrong with a plan, listed at once."""

    def __init__(self, problems: List[str]):
        self.problems = problems
        shown = "\n".join(f"  - {p}" for p in problems[:50])
        more = f"\n  … and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"the load plan has {len(problems)} problem(s):\n{shown}{more}")


@dataclass(slots=True)
class Piece:
    """One checkpoint tensor (this rank's part of it) → one place in one target."""

    source: TensorInfo
    target: str
    shard_id: Any
    expert_id: Optional[int]
    slot: Optional[int]            # local expert slot of an expert target
    placement: ShardPlacement
    transform: str                 # "copy" | "cast" | "dequant" | "requant" (refit into FP8)
    scale: Optional[TensorInfo] = None
    block_size: Tuple[int, int] = (128, 128)
    layer: Optional[int] = None
    read_range: Tuple[int, int] = (0, 0)   # absolute file offsets this rank reads
    quant: Optional[Quantized] = None      # a packed source (FP4/INT4) dequantized: its format and scales

    @property
    def read_bytes(self) -> int:
        return self.read_range[1] - self.read_range[0]


@dataclass
class Plan:
    targets: Dict[str, TargetSpec]
    pieces: List[Piece]
    summary: RoutingSummary
    missing: List[str]
    owned_layers: Optional[Tuple[int, int]] = None
    scales: List[TensorInfo] = field(default_factory=list)
    _sources: Optional[Dict[str, List[str]]] = field(default=None, repr=False)

    @property
    def read_bytes(self) -> int:
        return sum(p.read_bytes for p in self.pieces) + sum(s.nbytes for s in self.scales)

    def by_layer(self) -> List[Tuple[Optional[int], List[Piece]]]:
        """Pieces grouped by layer in load order (non-layer tensors — embeddings, head — last)."""
        groups: Dict[Optional[int], List[Piece]] = {}
        for p in self.pieces:
            groups.setdefault(p.layer, []).append(p)
        for g in groups.values():
            g.sort(key=lambda p: (str(p.source.file), p.source.start))
        order = sorted((k for k in groups if k is not None)) + ([None] if None in groups else [])
        return [(k, groups[k]) for k in order]

    def sources_of(self, target: str) -> List[str]:
        if self._sources is None:  # one pass over the pieces, not one per target
            self._sources = {}
            for p in self.pieces:
                self._sources.setdefault(p.target, []).append(p.source.name)
        return list(dict.fromkeys(self._sources.get(target, ())))  # a segmented source once


def targets_from_tensors(tensors: Mapping[str, torch.Tensor], rules: Optional[Rules] = None) -> Dict[str, TargetSpec]:
    """TargetSpecs of existing tensors (a module's parameters and buffers, or a dict); the shard
    layout of stacked and expert targets is inferred from the sources when the plan is built."""
    specs = {}
    for name, t in tensors.items():
        spec = TargetSpec(name, tuple(t.shape), t.dtype)
        if rules is not None and rules.tie_word_embeddings and name == rules.tied_target:
            spec.fill_from = rules.tied_source
        specs[name] = spec
    return specs


def targets_of_module(module: torch.nn.Module, rules: Optional[Rules] = None) -> Dict[str, TargetSpec]:
    """Parameters and registered buffers (persistent or not) of ``module`` as targets."""
    tensors = dict(module.named_parameters())
    tensors.update(dict(module.named_buffers()))
    return targets_from_tensors(tensors, rules)


def _shard_order(rules: Rules) -> Dict[Any, int]:
    order: Dict[Any, int] = {}
    for _, _, sid in rules.stacked_params_mapping:
        order.setdefault(sid, len(order))
    for _, _, _, sid in rules.expert_params_mapping:
        order.setdefault(sid, len(order))
    return order


def build_plan(
    checkpoint: Checkpoint,
    targets: Dict[str, TargetSpec],
    rules: Rules,
    unexpected: str = "error",
    block_size: Tuple[int, int] = (128, 128),
    check_shapes: bool = True,
    partial: bool = False,
    quant: Optional[Recognition] = None,
    requant: bool = False,
) -> Plan:
    """Route, pair, check and place every tensor of ``checkpoint`` into ``targets``.

    ``unexpected``: ``"error"`` (every name with no target listed at once, with did-you-mean
    hints), ``"warn"`` or ``"ignore"``. ``partial``: a plan for some tensors of a stream (no
    coverage check; a scale whose weight is elsewhere is not an error). Raises :class:`PlanError` listing every shape, dtype,
    pairing and coverage problem; a target left unwritten is a problem unless it is tied.
    ``quant``: the checkpoint's formats (:func:`pyloader.format.quant.recognize`); a packed weight
    (FP4, INT4) whose dequantized name routes to a float target is read as that name, its scales
    with it. ``requant``: a float source into an FP8 target is quantized blockwise (transform
    ``"requant"``, the refit of an FP8 rollout model) instead of refused.
    """
    if unexpected not in ("error", "warn", "ignore"):
        raise PyloaderInputError(f"unexpected must be 'error', 'warn' or 'ignore', not {unexpected!r}")
    with gc_paused():  # a route and a piece a tensor: collections would rescan them all, again and again
        return _build_plan(checkpoint, targets, rules, unexpected, block_size, check_shapes, partial, quant, requant)


def _dequantized_view(tensors: Mapping[str, TensorInfo], quant: Optional[Recognition], router: Router,
                      targets: Dict[str, TargetSpec], unstack=()) -> Tuple[Dict[str, TensorInfo], Dict[str, Quantized]]:
    """The checkpoint as a loader of dequantized targets sees it: each packed 2-D weight whose
    dequantized name routes to a float target under that name and its logical shape (its bytes
    where they are), the tensors it consumes (scales, second levels, activation scales) gone; a
    tensor of stacked experts that ``unstack`` (:class:`Rules`) names, as its experts' slices."""
    view, chosen = dict(tensors), {}
    rules = [(re.compile(pattern), repl) for pattern, repl in unstack]

    def per_expert(name: str, kinds=FLOAT_TARGETS) -> Optional[str]:
        """The per-expert name template of a stacked tensor whose experts route to a target of one
        of ``kinds`` (float: dequantized or cast; uint8: packed bytes kept)."""
        for rx, repl in rules:
            if rx.fullmatch(name):
                tmpl = rx.sub(repl, name.replace("{", "{{").replace("}", "}}"))
                r = router.route(tmpl.format(0))
                spec = targets.get(r.target) if r.kind == "weight" else None
                if spec is not None and spec.dtype in kinds and not spec.experts_stacked_in_source:
                    return tmpl
        return None

    def sliced(info: TensorInfo, e: int, count: int, name: str) -> TensorInfo:
        step = info.nbytes // count
        return TensorInfo(name, info.dtype, tuple(info.shape[1:]), info.file, info.start + e * step,
                          info.start + (e + 1) * step)

    if rules:
        for name, info in tensors.items():
            if info.dtype in _FLOAT_SOURCES + ("U8",) and info.shape and info.start >= 0:
                tmpl = per_expert(name, FLOAT_TARGETS if info.dtype != "U8" else (torch.uint8,))
                if tmpl is not None:
                    del view[name]
                    for e in range(info.shape[0]):
                        view[tmpl.format(e)] = sliced(info, e, info.shape[0], tmpl.format(e))
    for q in (quant.quantized.values() if quant is not None else ()):
        if q.packing is None:
            continue
        if len(q.shape) == 3 and q.values.start >= 0 and q.scale is not None and q.global_scale is None:
            tmpl = per_expert(q.name) if rules else None
            if tmpl is None:
                continue
            for n in q.consumed:
                view.pop(n, None)
            count = q.shape[0]
            for e in range(count):  # one [N, K] weight an expert, in the dequantized layout (no transpose)
                v = sliced(q.values, e, count, tmpl.format(e))
                qe = replace(q, name=v.name, values=v, scale=sliced(q.scale, e, count, f"{q.scale.name}[{e}]"),
                             shape=tuple(q.shape[1:]), transpose=False)
                view[v.name] = TensorInfo(v.name, v.dtype, qe.shape, v.file, v.start, v.end)
                chosen[v.name] = qe
            continue
        if len(q.shape) != 2 or q.transpose:
            continue
        r = router.route(q.name)
        if r.kind != "weight" or targets[r.target].dtype not in FLOAT_TARGETS:
            continue
        for n in q.consumed:
            view.pop(n, None)
        v = q.values
        view[q.name] = TensorInfo(q.name, v.dtype, q.shape, v.file, v.start, v.end)
        chosen[q.name] = q
    return view, chosen


def _build_plan(checkpoint: Checkpoint, targets: Dict[str, TargetSpec], rules: Rules, unexpected: str,
                block_size: Tuple[int, int], check_shapes: bool, partial: bool,
                quant: Optional[Recognition] = None, requant: bool = False) -> Plan:
    router = Router(rules, targets)
    tensors, packed = checkpoint.tensors, {}
    if quant is not None or rules.unstack:
        tensors, packed = _dequantized_view(checkpoint.tensors, quant, router, targets, rules.unstack)
    routes = router.route_all(tensors)
    zeroed = {n for n, spec in targets.items() if spec.fill_from == ZEROS}
    if zeroed:
        for r in routes:
            if r.target in zeroed:
                r.kind, r.reason = "skip", "zero on this tensor-parallel rank (the sum adds it once, on rank 0)"
    summary = RoutingSummary.of(routes)
    if summary.unexpected:
        if unexpected == "error":
            raise unexpected_error(router, summary.unexpected)
        if unexpected == "warn":
            logger.warning("pyloader: %d checkpoint tensors have no target and are ignored: %s",
                           len(summary.unexpected), ", ".join(summary.unexpected[:10]))
    problems: List[str] = []
    weights: Dict[Tuple, Route] = {}
    scales: Dict[Tuple, Route] = {}
    ep_skipped: List[Route] = []
    for r in routes:
        if r.kind not in ("weight", "scale"):
            continue
        spec = targets[r.target]
        if r.expert_id is not None and spec.experts is not None and r.expert_id not in spec.experts:
            ep_skipped.append(r)
            continue
        key = (r.target, r.shard_id, r.expert_id)
        table = weights if r.kind == "weight" else scales
        if key in table:
            problems.append(f"{r.name} and {table[key].name} both fill {r.target}"
                            f"{f' shard {r.shard_id!r}' if r.shard_id is not None else ''}"
                            f"{f' expert {r.expert_id}' if r.expert_id is not None else ''}")
            continue
        table[key] = r
    for r in ep_skipped:
        summary.skipped["expert owned by another expert-parallel rank"] = \
            summary.skipped.get("expert owned by another expert-parallel rank", 0) + 1
        summary.routed -= 1

    order = _shard_order(rules)
    pieces: List[Piece] = []
    used_scales = set()
    for key, r in weights.items():
        target, shard_id, expert_id = key
        spec = targets[target]
        src = tensors[r.name]
        scale_route = scales.get(key)
        fp8_src = src.dtype in FP8_SAFETENSORS
        fp8_dst = spec.dtype in FP8_WEIGHT_DTYPES
        q = packed.get(r.name)
        if q is not None:
            transform = "dequant"  # to a float target (the view chose it for that)
        elif fp8_src and not fp8_dst:
            if scale_route is None:
                problems.append(f"{r.name} ({src.dtype}) has no scale tensor ({r.name}_scale_inv or weight_scale_inv); "
                                f"cannot dequantize it into {target} ({spec.dtype})")
                continue
            transform = "dequant"
            used_scales.add(key)
        elif src.dtype == "?":  # index only (inspect without weights): a weight with a scale is FP8
            transform = "dequant" if scale_route is not None and not fp8_dst else "copy"
            if transform == "dequant":
                used_scales.add(key)
        elif spec.dtype == src.torch_dtype:
            transform = "copy"
            if scale_route is not None and fp8_dst:
                used_scales.add(key)  # travels to the FP8 target's scale parameter (executor)
        elif src.dtype in _FLOAT_SOURCES and spec.dtype in FLOAT_TARGETS:
            transform = "cast"
        elif requant and fp8_dst and src.dtype in _FLOAT_SOURCES:
            transform = "requant"
        else:
            problems.append(f"{r.name}: cannot load {src.dtype} into {target} ({spec.dtype})")
            continue
        slot = spec.experts[expert_id] if (spec.experts is not None and expert_id is not None) else None
        placement = spec.shards.get(shard_id)
        if placement is None and spec.shards:
            problems.append(f"{r.name}: {target} has no shard {shard_id!r} (has {sorted(map(str, spec.shards))})")
            continue
        if placement is None:  # inferred below from the source shapes
            placement = ShardPlacement(-1, -1, src_shape=src.shape)
        scale_info = checkpoint.tensors[scale_route.name] if scale_route is not None and transform == "dequant" else None
        block = block_size
        if q is not None:
            scale_info, block = q.scale, q.block
        elif transform == "dequant" and quant is not None and r.name in quant.quantized:
            block = quant.quantized[r.name].block  # the recognized grid (MXFP8 beside NVFP4 in one release)
        for pl in placement.segments or (placement,):  # a segmented source: one piece per row range
            pieces.append(Piece(src, target, shard_id, expert_id, slot, pl, transform, scale_info, block, r.layer,
                                quant=q))
    for key, r in scales.items():
        if key not in used_scales and key in weights:
            continue  # scale of a non-FP8 weight: an FP8 weight with no scale is reported above
        if key not in weights and not partial:
            problems.append(f"{r.name}: a scale with no weight (no {key[0]} weight"
                            f"{f' shard {key[1]!r}' if key[1] is not None else ''}"
                            f"{f' expert {key[2]}' if key[2] is not None else ''} in the checkpoint)")

    _infer_placements(pieces, targets, order, problems)
    if check_shapes and checkpoint.headers_read:
        for p in pieces:
            _check_piece(p, targets[p.target], problems)
    missing = [] if partial else coverage(pieces, targets, problems)
    for p in pieces:
        p.read_range = _read_range(p)
    if problems:
        raise PlanError(problems)
    scale_infos = [p.scale for p in pieces if p.scale is not None]
    scale_infos += [p.quant.global_scale for p in pieces if p.quant is not None and p.quant.global_scale is not None]
    return Plan(targets, pieces, summary, missing, scales=scale_infos)


def _infer_placements(pieces: List[Piece], targets: Dict[str, TargetSpec], order: Dict[Any, int], problems: List[str]):
    """Targets given without a layout (a module's own tensors): shards stack along dim 0 in the
    rules' shard order, sized by their sources; experts fill slots by expert id."""
    by_target: Dict[str, List[Piece]] = {}
    for p in pieces:
        if p.placement.offset < 0:
            by_target.setdefault(p.target, []).append(p)
    for target, group in by_target.items():
        spec = targets[target]
        if any(p.expert_id is not None for p in group) and spec.experts is None:
            spec.experts = {g: g for g in range(spec.shape[0])}
            for p in group:
                if p.expert_id is not None:
                    if p.expert_id >= spec.shape[0]:
                        problems.append(f"{p.source.name}: expert {p.expert_id} has no slot in {target} {spec.shape}")
                    p.slot = p.expert_id
        sids = sorted({p.shard_id for p in group}, key=lambda s: order.get(s, -1))
        offsets, off = {}, 0
        for sid in sids:
            ref = next(p for p in group if p.shard_id == sid)
            shape = ref.source.shape
            if shape is None:  # index only: unknown sizes
                offsets[sid] = ShardPlacement(0, 0)
                continue
            if ref.expert_id is None and spec.experts is not None:
                shape = shape[1:]  # pre-stacked experts [E, ...]
            n = shape[0] if shape else 1
            offsets[sid] = ShardPlacement(off, n, src_shape=tuple(shape))
            off += n
        spec.shards = dict(offsets)
        for p in group:
            p.placement = offsets[p.shard_id]


def _check_piece(p: Piece, spec: TargetSpec, problems: List[str]):
    src_shape = p.source.shape
    pl = p.placement
    plane = spec.shape[1:] if spec.experts is not None else spec.shape
    if spec.experts is not None and p.expert_id is None:  # pre-stacked experts in the source
        if pl.src_shape is not None and tuple(src_shape[1:]) != tuple(pl.src_shape):
            problems.append(f"{p.source.name}: shape {list(src_shape)} does not match {p.target}: expected "
                            f"[E, {', '.join(map(str, pl.src_shape))}]")
        elif pl.src_rows is not None or pl.src_cols is not None:  # rows here would be experts
            problems.append(f"{p.source.name}: every expert in one tensor, and {p.target} takes a slice of each: "
                            "the preset must read it expert by expert (Rules.unstack)")
        return
    if pl.src_shape is not None and tuple(src_shape) != tuple(pl.src_shape):
        problems.append(f"{p.source.name}: shape {list(src_shape)} != {list(pl.src_shape)} expected by {p.target}")
        return
    rows = (pl.src_rows[1] - pl.src_rows[0]) if pl.src_rows else (src_shape[0] if src_shape else 1)
    cols = (pl.src_cols[1] - pl.src_cols[0]) if pl.src_cols else (math.prod(src_shape[1:]) if len(src_shape) > 1 else None)
    want_cols = math.prod(plane[1:]) if len(plane) > 1 else None
    # a source of more dimensions fits a plane of its flattened columns (gpt-oss's [N, K/32, 16] bytes as [N, K/2])
    if pl.offset + rows > plane[0] or (cols is not None and want_cols is not None and cols != want_cols) or \
            ((len(src_shape) >= 2) != (len(plane) >= 2)) or (len(src_shape) < len(plane)):
        problems.append(f"{p.source.name}: shape {list(src_shape)} (taking {rows} rows"
                        f"{f', {cols} cols' if cols is not None else ''}) does not fit {p.target} {list(spec.shape)} "
                        f"at row {pl.offset}")
    if p.quant is not None and pl.src_cols is not None and pl.src_cols[0] % 2:
        problems.append(f"{p.source.name}: a packed {p.quant.scheme} weight sliced from column {pl.src_cols[0]}: "
                        "column slices of packed weights start on a byte (an even column)")
    if p.scale is not None and p.quant is None:  # a packed weight's scale grid was checked when it was recognized
        try:
            p.block_size = scale_block(tuple(src_shape), tuple(p.scale.shape), p.block_size,
                                       f"{p.scale.file}, tensor {p.scale.name!r} (the scale of {p.source.name})")
        except PyloaderInputError as e:
            problems.append(str(e))


def coverage(pieces: List[Piece], targets: Dict[str, TargetSpec], problems: List[str]) -> List[str]:
    """Every target element written exactly once: shards of a plane tile its rows; every owned
    expert slot has every shard. Returns the targets left (wholly or partly) unwritten."""
    seen: Dict[str, Dict[Optional[int], List[Tuple[int, int, str]]]] = {}
    for p in pieces:
        if p.slot is None and targets[p.target].experts is not None:  # pre-stacked: all slots at once
            for slot in targets[p.target].experts.values():
                seen.setdefault(p.target, {}).setdefault(slot, []).append(
                    (p.placement.offset, p.placement.offset + p.placement.size, p.source.name))
            continue
        seen.setdefault(p.target, {}).setdefault(p.slot, []).append(
            (p.placement.offset, p.placement.offset + p.placement.size, p.source.name))
    missing = []
    for name, spec in targets.items():
        if spec.fill_from is not None:
            if spec.fill_from != ZEROS and spec.fill_from not in targets and spec.fill_from not in seen:
                problems.append(f"{name} is tied to {spec.fill_from}, which is not a target")
            continue
        planes = seen.get(name)
        if not planes:
            missing.append(name)
            continue
        if not spec.shape_known:
            continue  # pass-through target seen through an index only: written once, size unknown
        rows = spec.shape[1] if spec.experts is not None and len(spec.shape) > 1 else (spec.shape[0] if spec.shape else 1)
        slots = list(spec.experts.values()) if spec.experts is not None else [None]
        gaps = []
        for slot in slots:
            spans = sorted(planes.get(slot, []))
            pos = 0
            for a, b, src in spans:
                if a < pos:
                    problems.append(f"{name}{'' if slot is None else f' slot {slot}'}: {src} overlaps rows {a}..{pos}")
                pos = max(pos, b)
            covered = sum(b - a for a, b, _ in spans)
            if covered < rows or pos < rows:
                gaps.append(slot)
        if gaps:
            missing.append(name if gaps == [None] else f"{name} (expert slots {gaps[:8]}{' …' if len(gaps) > 8 else ''})")
    return missing


def _read_range(p: Piece) -> Tuple[int, int]:
    """Bytes this rank reads: only its rows when the slice is a row range of a row-major tensor."""
    s = p.source
    if s.shape is None or s.start < 0:
        return (0, 0)
    rows = p.placement.src_rows
    if rows is None or p.placement.src_cols is not None or len(s.shape) == 0 or s.shape[0] == 0:
        return (s.start, s.end)
    row_bytes = s.nbytes // s.shape[0]
    return (s.start + rows[0] * row_bytes, s.start + rows[1] * row_bytes)


def plan_report(plan: Plan, preset: Optional[str] = None) -> Dict[str, Any]:
    """The ``pyloader inspect --json`` object."""
    targets = {}
    for name, spec in plan.targets.items():
        targets[name] = {"shape": list(spec.shape), "dtype": str(spec.dtype).replace("torch.", ""),
                         "sources": plan.sources_of(name) if spec.fill_from is None else [f"tied: {spec.fill_from}"]}
    layers = sorted({p.layer for p in plan.pieces if p.layer is not None})
    if plan.owned_layers is not None:
        layers = list(range(*plan.owned_layers))
    known = all(p.source.shape is not None for p in plan.pieces)
    return {"preset": preset, "routed": plan.summary.routed, "skipped": dict(sorted(plan.summary.skipped.items())),
            "unexpected": plan.summary.unexpected, "missing": plan.missing, "targets": targets, "layers": layers,
            "read_bytes": plan.read_bytes if known else None}
