"""``pyloader.load``: fill an engine's parameters from a checkpoint.

Inside an engine's own ``load_weights`` (vLLM-style), with its fused parameters already allocated::

    def load_weights(self, weights):          # weights: an iterator of (name, tensor), or ignore it
        report = pyloader.load(self, "/models/DeepSeek-R1", tp=(tp_rank, tp_size), pp=(pp_rank, pp_size))
        return set(report.loaded)

The preset is chosen from the checkpoint's ``config.json`` (``preset=`` overrides; ``rules=``
replaces it with your own :class:`~pyloader.routing.router.Rules`, the layout then being inferred from
your module). BF16/FP16/FP32 targets receive dequantized values; the output dtype is always the
target's own.
"""

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..backend import resolve_backend
from ..errors import PyloaderInputError
from ..format.checkpoint import open_checkpoint
from ..parallel import Parallel
from ..routing.layout import ABSENT, ZEROS, TargetSpec
from ..routing.plan import Plan, PlanError, build_plan, targets_from_tensors
from ..routing.presets import build_preset, load_config
from ..routing.router import Rules
from ..rss import peak_rss, reset_peak_rss
from ..format.quant import recognize_checkpoint
from ..gate import DEFAULT_LIMIT, Gate, GateSlots
from .executor import ExecutorConfig, StreamingExecutor, Timings
from .sources import run_memory, run_stream, tensor_info

logger = logging.getLogger("pyloader")

Source = Union[str, Path, Sequence[Union[str, Path]], Mapping[str, torch.Tensor], Iterable[Tuple[str, torch.Tensor]]]


@dataclass
class LoadReport:
    loaded: List[str] = field(default_factory=list)             # targets written
    skipped: Dict[str, str] = field(default_factory=dict)       # checkpoint name → reason
    unexpected: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)            # targets not written
    bytes_read: int = 0
    bytes_received: int = 0                                     # load(group=…): from the group's other ranks
    bytes_held: int = 0                                         # load(group=…): the most checkpoint bytes held at once
    timings: Timings = field(default_factory=Timings)
    backend: str = ""
    preset: Optional[str] = None
    io: str = ""                                                # the source: "files", "memory" or "stream"
    readers: str = ""                                           # GPU reads: "native" (C++) or "python" readers
    peak_rss: Optional[int] = None                              # bytes: the process's resident peak during the load
    # dequantized checkpoint tensor → (max |value|, max |decoded code|): the sanity gate's evidence
    maxima: Dict[str, Tuple[float, float]] = field(default_factory=dict)
    gate_warnings: List[str] = field(default_factory=list)     # gate="warn": what would have stopped the load

    @property
    def gbps(self) -> float:
        return self.bytes_read / self.timings.wall_s / 1e9 if self.timings.wall_s else 0.0

    def summary(self) -> str:
        t = self.timings
        return (f"loaded {len(self.loaded)} targets, {self.bytes_read / 1e9:.2f} GB in {t.wall_s:.2f} s "
                f"({self.gbps:.1f} GB/s); read {t.read_s:.2f} thread-s (waited {t.wait_read_s:.2f} s), "
                f"H2D {t.h2d_s:.2f} s, transforms {t.transform_s:.2f} s; backend {self.backend}"
                + (f"; peak resident {self.peak_rss / 2**30:.2f} GiB" if self.peak_rss else "")
                + (f"; {self.io}: this rank read {self.bytes_read / 1e9:.2f} GB, received "
                   f"{self.bytes_received / 1e9:.2f} GB" if self.io.startswith("group") else ""))


def target_tensors(target) -> Dict[str, torch.Tensor]:
    if isinstance(target, torch.nn.Module):
        tensors = {n: p.data for n, p in target.named_parameters()}
        tensors.update({n: b for n, b in target.named_buffers()})
        return tensors
    if isinstance(target, Mapping):  # parameters that require grad: written through detached views
        return {n: t.detach() if isinstance(t, torch.Tensor) and t.requires_grad else t for n, t in target.items()}
    raise PyloaderInputError(f"target must be an nn.Module or a dict of tensors, not {type(target).__name__}")


def rank_pair(v, what) -> Tuple[int, int]:
    if v is None:
        return 0, 1
    try:
        r, n = v
        return int(r), int(n)
    except (TypeError, ValueError):
        raise PyloaderInputError(f"{what} must be (rank, size), got {v!r}") from None


def target_specs(tensors: Dict[str, torch.Tensor], preset_targets: Optional[Dict[str, TargetSpec]], rules: Rules):
    """Target specs with the user's tensors' dtypes (preset layouts checked against the real shapes),
    and the target tensors the preset does not fill (none without a preset: every tensor is a target)."""
    if preset_targets is None:
        return targets_from_tensors(tensors, rules), []
    preset_targets = with_alternatives(tensors, preset_targets)
    problems, padded = [], []
    for name, spec in preset_targets.items():
        t = tensors.get(name)
        if t is not None and tuple(t.shape) != spec.shape and spec.holds_padded(t.shape):
            t = tensors[name] = t[tuple(slice(0, want) for want in spec.shape)]
            padded.append(name)
        if t is None:
            problems.append(f"target {name} {list(spec.shape)} (from the preset) is not in the model")
        elif tuple(t.shape) != spec.shape:
            problems.append(f"target {name}: the model has shape {list(t.shape)}, the preset derives {list(spec.shape)}")
        else:
            spec.dtype = t.dtype
    extra = sorted(set(tensors) - set(preset_targets))
    if problems:
        raise PlanError(problems)
    if padded:
        logger.info("pyloader: %d targets are larger than the checkpoint's tensors (the engine's padding); "
                    "their leading blocks are written, e.g. %s", len(padded), padded[0])
    return preset_targets, extra


def with_alternatives(tensors: Mapping[str, torch.Tensor], preset_targets: Dict[str, TargetSpec]) -> Dict[str, TargetSpec]:
    """The preset's targets in the layout the model holds: where a target kept packed by default
    (integer dtype) has a float tensor of its alternative's shape in the model, every target with an
    alternative takes it (gpt-oss: MXFP4 experts dequantized, their biases laid out to match)."""
    alts = {n: s.alternative for n, s in preset_targets.items() if s.alternative is not None}
    chosen = any(n in tensors and alt != ABSENT and tensors[n].is_floating_point()
                 and not preset_targets[n].dtype.is_floating_point and tuple(tensors[n].shape) == alt.shape
                 for n, alt in alts.items())
    if not chosen:
        return preset_targets
    logger.info("pyloader: the model holds %d targets in their dequantized layout (e.g. %s)", len(alts), next(iter(alts)))
    return {n: alts.get(n, s) for n, s in preset_targets.items() if alts.get(n) != ABSENT}


MISSING_POLICIES = ("error", "warn", "ignore")


def check_unwritten(missing: List[str], policy: str) -> None:
    """Targets that nothing in the source writes (wholly, or rows or expert slots of them): an
    error listing them all under ``missing="error"``, before any byte is written; a warning under
    ``"warn"``; under ``"ignore"`` only the report lists them."""
    if not missing or policy == "ignore":
        return
    if policy == "error":
        raise PlanError([f"{m}: no checkpoint tensor writes it (pass missing='warn' or 'ignore' for parameters "
                         "left uninitialised on purpose)" for m in missing])
    logger.warning("pyloader: %d targets are left unwritten: %s", len(missing), ", ".join(missing[:10]))


def load(target, source: Source, *, config=None, preset: Optional[str] = None, rules: Optional[Rules] = None,
         tp=None, pp=None, ep=None, device=None, backend: Optional[str] = None, progress: bool = True,
         unexpected: str = "error", missing: str = "error", executor: Optional[ExecutorConfig] = None,
         hooks: Optional[Callable[[Optional[int]], None]] = None, gate: str = "error",
         gate_limit: float = DEFAULT_LIMIT, group=None, node: Optional[str] = None) -> LoadReport:
    """Load ``source`` into ``target`` (an ``nn.Module`` or a dict of tensors, already allocated).

    ``source``: a checkpoint directory, an index file or a list of ``.safetensors`` files (the fast
    path: pyloader's own ranged reads); a dict of tensors (e.g. a trainer's, on a GPU: device to
    device); or an iterator of ``(name, tensor)`` (each tensor is consumed before the iterator
    advances, so sources that reuse one buffer are safe). ``tp``/``pp``/``ep``: ``(rank, size)``.
    ``hooks(layer)`` runs after each layer's last transform is enqueued (``None``: non-layer tensors).
    ``missing``: targets (or rows, or expert slots of them) that nothing in the source writes, and
    target tensors the preset does not know: ``"error"`` (raised before any byte is written),
    ``"warn"`` or ``"ignore"`` (listed in ``report.missing``). A stream can only tell when it ends.
    ``gate``: every dequantized tensor's largest magnitude is taken in the transform that writes it
    (``report.maxima``); ``"error"`` raises, once the load is done, listing each tensor whose
    values no weight has (beyond ``gate_limit``, NaN, or all zero from non-zero codes: a misread
    scale format); ``"warn"`` lists them in ``report.gate_warnings``; ``"off"`` skips it.
    ``group``: a ``torch.distributed`` process group whose ranks all load this checkpoint directory,
    each with its own ``tp``/``pp``/``ep``: each tensor is read by one rank and sent, still
    quantized, to the ranks that need it, over NVLink with NCCL (:mod:`pyloader.loading.group`;
    ``node``: this rank's machine, by default its host name: each node reads what its ranks need
    once). ``report.bytes_read`` is then this rank's reads, ``report.bytes_received`` what it got.
    Returns a :class:`LoadReport`; raises :class:`~pyloader.errors.PyloaderInputError` (with every
    problem listed) before any byte is written if the plan does not check out.
    """
    t0 = time.perf_counter()
    measured = reset_peak_rss()
    checker = Gate(gate, gate_limit)
    if missing not in MISSING_POLICIES:
        raise PyloaderInputError(f"missing must be one of {', '.join(map(repr, MISSING_POLICIES))}, not {missing!r}")
    tensors = target_tensors(target)
    if not tensors:
        raise PyloaderInputError("the target has no parameters or buffers")
    dev = torch.device(device) if device is not None else next(iter(tensors.values())).device
    (tpr, tps), (ppr, pps), (epr, eps) = rank_pair(tp, "tp"), rank_pair(pp, "pp"), rank_pair(ep, "ep")
    is_files = isinstance(source, (str, Path)) or (isinstance(source, (list, tuple)) and source and
                                                     isinstance(source[0], (str, Path)))
    if group is not None and not is_files:
        raise PyloaderInputError("load(group=…) reads a checkpoint directory (each tensor once, over the group)")
    checkpoint = open_checkpoint(source) if is_files else None
    t_headers = time.perf_counter()
    if config is None and checkpoint is not None and checkpoint.config_path is not None:
        config = checkpoint.config_path
    preset_name, block = None, (128, 128)
    cfg = load_config(config)
    if rules is None:
        if config is None:
            raise PyloaderInputError("no config: pass config= (a config.json path or dict), preset=, or rules=")
        p = build_preset(cfg, preset, Parallel(tpr, tps, ppr, pps, epr, eps))
        if checkpoint is not None:
            p.add_passthrough(checkpoint.tensors)
        elif isinstance(source, Mapping):
            p.add_passthrough({n: tensor_info(n, t) for n, t in source.items()})
        rules, preset_targets, preset_name, block = p.rules, p.targets, p.name, p.block_size
    else:
        preset_targets = None
        q = cfg.get("quantization_config")
        if isinstance(q, dict) and isinstance(q.get("weight_block_size"), (list, tuple)) and len(q["weight_block_size"]) == 2:
            block = (int(q["weight_block_size"][0]), int(q["weight_block_size"][1]))
    specs, unknown = target_specs(tensors, preset_targets, rules)
    report = LoadReport(preset=preset_name)
    slots = GateSlots(dev) if checker.on else None
    if checkpoint is not None:
        t_preset = time.perf_counter()
        quant = recognize_checkpoint(checkpoint, cfg)
        plan = build_plan(checkpoint, specs, rules, unexpected=unexpected, block_size=block, quant=quant)
        check_unwritten(plan.missing + unknown, missing)
        t_plan = time.perf_counter()
        if group is not None:
            import torch.distributed as dist

            from .group import run_group

            report.backend = resolve_backend(backend, dev, "load")
            report.bytes_read, report.bytes_received, report.bytes_held, report.timings.wall_s = run_group(
                plan, checkpoint, group, tensors, dev, report.backend, hooks, slots, node)
            report.io = f"group of {dist.get_world_size(group)}"
        else:
            ex = StreamingExecutor(tensors, dev, backend, executor, progress, hooks, slots)
            report.timings = ex.run(plan)
            report.bytes_read, report.backend, report.io = ex.bytes_read, ex.backend, "files"
            report.readers = ex.readers_used
        report.timings.prepare_parts = {"headers": round(t_headers - t0, 6), "preset": round(t_preset - t_headers, 6),
                                        "plan": round(t_plan - t_preset, 6)}
        t_finish = time.perf_counter()
    elif isinstance(source, Mapping):
        plan = run_memory(source, specs, rules, tensors, dev, backend, unexpected, block, hooks, report,
                          lambda p: check_unwritten(p.missing + unknown, missing), slots, cfg)
    else:
        plan = run_stream(iter(source), specs, rules, tensors, dev, backend, unexpected, block, hooks, report, slots)
        check_unwritten(plan.missing + unknown, missing)
    fill_tied(plan, tensors)
    report.loaded = sorted({p.target for p in plan.pieces} | {n for n, s in plan.targets.items() if s.fill_from})
    report.skipped = {r.name: r.reason for r in plan.summary.routes if r.kind == "skip"}
    report.unexpected = plan.summary.unexpected
    report.missing = plan.missing + unknown
    report.peak_rss = peak_rss() if measured else None
    if slots is not None and slots.rows:
        report.maxima = slots.maxima()
        report.gate_warnings = checker.enforce(report.maxima, {p.source.name: p.source for p in plan.pieces})
    if report.timings.wall_s == 0:
        report.timings.wall_s = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    if checkpoint is not None:
        report.timings.finish_s = time.perf_counter() - t_finish
    logger.info("pyloader: %s", report.summary())
    if progress and checkpoint is not None:  # the bar is gone: what it measured, and where the time went
        print(f"pyloader: {report.summary()}", file=sys.stderr)
    return report


def fill_tied(plan: Plan, tensors: Dict[str, torch.Tensor]):
    for name, spec in plan.targets.items():
        if spec.fill_from == ZEROS and name in tensors:
            tensors[name].zero_()
        elif spec.fill_from is not None and name in tensors and spec.fill_from in tensors:
            dst, src = tensors[name], tensors[spec.fill_from]
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src)


