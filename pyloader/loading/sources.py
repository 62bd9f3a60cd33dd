"""Sources that are not checkpoint files: a dict of tensors already in memory (the RL refit case,
device to device) and a ``(name, tensor)`` iterator, planned and transformed with the same rules."""

from pathlib import Path
from typing import Callable, Iterator, Mapping, Tuple

import torch

from ..backend import resolve_backend
from ..dtypes import FP8_WEIGHT_DTYPES, TORCH_TO_SAFETENSORS
from ..errors import PyloaderInputError
from ..format.checkpoint import Checkpoint
from ..format.safetensors import TensorInfo
from ..ops.jobs import run_jobs
from ..routing.plan import Plan, PlanError, build_plan, coverage
from ..routing.router import Router, RoutingSummary, unexpected_error
from .batching import piece_jobs


def tensor_info(name: str, t: torch.Tensor) -> TensorInfo:
    dtype = TORCH_TO_SAFETENSORS.get(t.dtype)
    if dtype is None:
        raise PyloaderInputError(f"source tensor {name}: dtype {t.dtype} has no safetensors equivalent")
    return TensorInfo(name, dtype, tuple(t.shape), Path("<memory>"), 0, t.numel() * t.element_size())


def source_rows(piece, t: torch.Tensor) -> torch.Tensor:
    pl = piece.placement
    if pl.src_rows is not None and pl.src_cols is None and t.dim() >= 1:
        return t[pl.src_rows[0]:pl.src_rows[1]]
    return t


def run_memory(source: Mapping[str, torch.Tensor], specs, rules, tensors, dev, backend, unexpected, block, hooks,
               report, check: Callable[[Plan], None], slots=None, config=None) -> Plan:
    """Tensors already in memory (the RL refit case, device to device): one launch per layer, once
    ``check(plan)`` passes. Packed weights (FP4, INT4) are recognized as in a checkpoint directory
    (``config``'s quantization config, each tensor's layout) and dequantized into float targets."""
    from ..format.quant import check_methods, recognize

    ck = Checkpoint(None, [], {n: tensor_info(n, t) for n, t in source.items()})
    check_methods(config or {})
    quant = recognize(ck.tensors, config or {}, None, lambda info: [int(v) for v in source[info.name].reshape(-1)])
    plan = build_plan(ck, specs, rules, unexpected=unexpected, block_size=block, quant=quant)
    check(plan)
    chosen = resolve_backend(backend, dev, "load")
    scales = {p.scale.name: source[p.scale.name].to(dev) for p in plan.pieces if p.scale is not None}
    scales.update({p.quant.global_scale.name: source[p.quant.global_scale.name].to(dev) for p in plan.pieces
                   if p.quant is not None and p.quant.global_scale is not None})
    if slots is not None:
        slots.reserve(p.source.name for p in plan.pieces if p.transform == "dequant")
    for layer, group in plan.by_layer():
        jobs = []
        for p in group:
            if p.quant is not None:  # packed: its bytes, a row each (INT4 words are little-endian nibbles)
                values = source[p.quant.values.name]
                raw = values.contiguous().view(torch.uint8).reshape(values.shape[0], -1)
            else:
                raw = source[p.source.name]
            src = source_rows(p, raw).to(dev)
            jobs += piece_jobs(p, src, 0, tensors[p.target], scales, plan.targets[p.target].experts, slots)
        run_jobs([j for j in jobs if j.src.numel()], chosen)
        report.bytes_read += sum(p.read_bytes for p in group)
        if hooks is not None:
            hooks(layer)
    report.backend, report.io = chosen, "memory"
    return plan


_PACKED_LEAVES = (".weight_packed", ".weight_global_scale", ".weight_shape", "_blocks", "_scales")


def run_stream(items: Iterator[Tuple[str, torch.Tensor]], specs, rules, tensors, dev, backend, unexpected, block,
                hooks, report, slots=None) -> Plan:
    """A ``(name, tensor)`` iterator. Every yielded tensor is copied out (to the device, or into
    its target) before the iterator advances: sources that reuse one buffer (run:ai's streamer)
    cannot corrupt earlier tensors. An FP8 weight waits on the device for its scale (and a scale
    for its weight); everything else goes straight into its target."""
    chosen = resolve_backend(backend, dev, "load")
    router = Router(rules, specs)
    fused = {p for p, _, _ in rules.stacked_params_mapping} | {p for p, _, _, _ in rules.expert_params_mapping}
    for name, spec in specs.items():
        if not spec.shards and not spec.fill_from and any(p in name for p in fused):
            raise PyloaderInputError(f"target {name} is stacked from several checkpoint tensors: a streamed source "
                                     "needs its layout from a preset (pass config= or preset=)")
    pieces, routes = [], []
    pairs = {}
    for name, t in items:
        route = router.route(name)
        routes.append(route)
        if route.kind not in ("weight", "scale"):
            continue
        copy = t.to(dev, copy=True)  # the source may overwrite its buffer once we advance
        key = (route.target, route.shard_id, route.expert_id)
        entry = pairs.setdefault(key, {})
        entry[route.kind] = (name, copy)
        needs_scale = route.kind == "weight" and t.dtype in FP8_WEIGHT_DTYPES and \
            specs[route.target].dtype not in FP8_WEIGHT_DTYPES
        if route.kind == "scale" and "weight" not in entry:
            continue  # wait for the weight
        if needs_scale and "scale" not in entry:
            continue  # wait for the scale
        wname, w = entry["weight"]
        mini = {wname: w}
        if "scale" in entry:
            mini[entry["scale"][0]] = entry["scale"][1]
        ck = Checkpoint(None, [], {n: tensor_info(n, x) for n, x in mini.items()})
        plan = build_plan(ck, specs, rules, unexpected="ignore", block_size=block, partial=True)
        scales = {p.scale.name: mini[p.scale.name] for p in plan.pieces if p.scale is not None}
        jobs = []
        if slots is not None:
            slots.reserve(p.source.name for p in plan.pieces if p.transform == "dequant")
        for p in plan.pieces:
            jobs += piece_jobs(p, source_rows(p, mini[p.source.name]), 0, tensors[p.target], scales,
                               specs[p.target].experts, slots)
        run_jobs([j for j in jobs if j.src.numel()], chosen)
        report.bytes_read += sum(x.numel() * x.element_size() for x in mini.values())
        pieces += plan.pieces
        del pairs[key]
    summary = RoutingSummary.of(routes)
    packed = [n for n in summary.unexpected if n.endswith(_PACKED_LEAVES)]
    if packed:
        raise PyloaderInputError(f"{packed[0]} ({len(packed)} such tensors): packed FP4/INT4 weights are read from a "
                                 "checkpoint directory or a dict of tensors, not a stream (their format is recognized "
                                 "from all the tensors at once)")
    if summary.unexpected and unexpected == "error":
        raise unexpected_error(router, summary.unexpected)
    problems = [f"{n}: its {'scale' if kind == 'weight' else 'weight'} never arrived"
                for entry in pairs.values() for kind, (n, _) in entry.items()]
    missing = coverage(pieces, specs, problems)
    if problems:
        raise PlanError(problems)
    report.backend, report.io = chosen, "stream"
    return Plan(specs, pieces, summary, missing)
