"""The rollout engine's side of a refit: a transform plan compiled once from the engine's
parameters and the bucket layout, then each step one launch a bucket for its copies and casts and
one for its requantized tensors, writing the parameters in place (pointers unchanged: captured CUDA graphs stay valid), with a receipt.

The routing is ``pyloader.load``'s (same presets, rules, tensor/pipeline/expert parallelism), so a
model loads and refits with one configuration. A float tensor whose parameter is FP8 is quantized
blockwise by the DeepSeek recipe into the parameter and its scale parameter
(``….weight_scale_inv`` or ``….weight_scale``).
"""

import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from ..backend import resolve_backend
from ..errors import PyloaderError, PyloaderInputError
from ..format.checkpoint import Checkpoint
from ..format.scales import SCALE_SUFFIXES
from ..loading.batching import piece_jobs
from ..loading.loader import check_unwritten, fill_tied, rank_pair, target_specs, target_tensors
from ..loading.sources import source_rows
from ..ops.jobs import CompiledJobs, TransformJob
from ..ops.quantize import CompiledQuantize, QuantizeJob
from ..parallel import Parallel
from ..routing.plan import PlanError, build_plan
from ..routing.presets import build_preset, load_config
from ..routing.router import Rules
from .buckets import BucketLayout, Checksum, header


class RefitError(PyloaderError, RuntimeError):
    """A refit step that would leave parameters stale or wrong: buckets of another version, bytes
    that differ from what the sender packed, buckets not applied."""


@dataclass
class RefitReport:
    version: int
    bytes: int = 0                                          # bucket payload bytes applied
    seconds: float = 0.0                                    # from the first apply to the device being done
    checksums: Dict[int, int] = field(default_factory=dict)  # bucket → payload checksum, as packed and as received
    written: List[str] = field(default_factory=list)        # parameters written (every element once; tied ones copied)
    verified: bool = False                                  # versions and checksums checked before the writes
    host_seconds: float = 0.0                               # Python time of the step before its final sync

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds else 0.0


def _scale_param(name: str, tensors: Dict[str, torch.Tensor]) -> Optional[str]:
    base = name[:-len("weight")] if name.endswith("weight") else name + "_"
    for suffix in SCALE_SUFFIXES:
        if base + suffix in tensors:
            return base + suffix
    return None


class Refitter:
    """Compile once: ``Refitter(model, layout, buckets, config=...)``; then every step
    ``refitter.step(version)`` (or ``apply(k, version)`` per bucket as each arrives, then
    ``finish(version)``).

    ``target``: the rollout engine's ``nn.Module`` or dict of parameters. ``layout``/``buckets``:
    the :class:`~pyloader.refit.buckets.BucketLayout` and this process's buckets (opened with
    :func:`~pyloader.refit.transport.open_shared`, or allocated and filled by
    :func:`~pyloader.refit.transport.broadcast`), on the parameters' device. ``config``/``preset``/
    ``rules``/``tp``/``pp``/``ep``: as for ``pyloader.load``. ``scale_fmt``: the FP8 parameters'
    scales, ``"float"`` (amax / 448) or ``"ue8m0"`` (powers of two). ``verify``: check every
    bucket's version and checksum before writing anything (one extra read of the buckets).
    """

    def __init__(self, target, layout: BucketLayout, buckets: Sequence[torch.Tensor], *, config=None,
                 preset: Optional[str] = None, rules: Optional[Rules] = None, tp=None, pp=None, ep=None,
                 backend: Optional[str] = None, unexpected: str = "error", missing: str = "error",
                 scale_fmt: str = "float", verify: bool = True):
        layout.check()
        if len(buckets) != layout.num_buckets or any(b.numel() != n for b, n in zip(buckets, layout.sizes)):
            raise PyloaderInputError(f"refit: {len(buckets)} buckets given, the layout has {layout.num_buckets} "
                                     f"of {layout.sizes} bytes")
        self.tensors = target_tensors(target)
        if not self.tensors:
            raise PyloaderInputError("refit: the target has no parameters or buffers")
        self.device = next(iter(self.tensors.values())).device
        if any(b.device != self.device for b in buckets):
            raise PyloaderInputError(f"refit: the buckets must be on the parameters' device ({self.device})")
        self.layout, self.buckets, self.verify, self.scale_fmt = layout, list(buckets), verify, scale_fmt
        self.backend = resolve_backend(backend, self.device, "load")
        (tpr, tps), (ppr, pps), (epr, eps) = rank_pair(tp, "tp"), rank_pair(pp, "pp"), rank_pair(ep, "ep")
        infos = layout.infos()
        block = (128, 128)
        if rules is None:
            if config is None:
                raise PyloaderInputError("refit: no config: pass config= (a config.json path or dict), preset=, or rules=")
            p = build_preset(load_config(config), preset, Parallel(tpr, tps, ppr, pps, epr, eps))
            p.add_passthrough(infos)
            rules, preset_targets, block = p.rules, p.targets, p.block_size
        else:
            preset_targets = None
        self.block = block
        specs, unknown = target_specs(self.tensors, preset_targets, rules)
        plan = build_plan(Checkpoint(None, [], infos), specs, rules, unexpected=unexpected, block_size=block,
                          requant=True)
        self.plan = plan
        problems: List[str] = []
        self.scale_of: Dict[str, str] = {}  # FP8 parameter written by requant → its scale parameter
        for p in plan.pieces:
            if p.transform == "requant" and p.target not in self.scale_of:
                s = _scale_param(p.target, self.tensors)
                if s is None:
                    base = p.target[:-len("weight")] if p.target.endswith("weight") else p.target + "_"
                    problems.append(f"{p.source.name} → {p.target} (FP8): the model has no scale parameter for it "
                                    f"({' or '.join(base + x for x in SCALE_SUFFIXES)})")
                    continue
                self.scale_of[p.target] = s
        if problems:
            raise PlanError(problems)
        check_unwritten(plan.missing + [u for u in unknown if u not in self.scale_of.values()], missing)
        self._compile(plan)

    def _compile(self, plan) -> None:
        views: Dict[str, torch.Tensor] = {}
        for k in range(self.layout.num_buckets):
            views.update(self.layout.views(self.buckets, k))
        bucket_of = {e.name: e.bucket for e in self.layout.entries}
        jobs: List[List[TransformJob]] = [[] for _ in self.buckets]
        requants: List[List[QuantizeJob]] = [[] for _ in self.buckets]
        targets: List[set] = [set() for _ in self.buckets]
        problems: List[str] = []
        self.entries = []  # the plan as data (plan_json)
        for p in plan.pieces:
            k = bucket_of[p.source.name]
            src = source_rows(p, views[p.source.name])
            scales = {p.scale.name: views[p.scale.name]} if p.scale is not None else {}
            param = self.tensors[p.target]
            spec = plan.targets[p.target]
            targets[k].add(p.target)
            for job in piece_jobs(p, src, 0, param, scales, spec.experts):
                if not job.src.numel():
                    continue
                entry = {"source": p.source.name, "bucket": k, "target": p.target, "transform": p.transform,
                         "src_offset": job.src.data_ptr() - self.buckets[k].data_ptr(),
                         "dst": _byte_range(job.dst, param)}
                if p.transform == "requant":
                    s_name = self.scale_of[p.target]
                    try:
                        rows = scale_rows(param, self.tensors[s_name], job.dst, self.block)
                    except PyloaderInputError as e:
                        problems.append(f"{p.source.name} → {p.target}: {e}")
                        continue
                    requants[k].append(QuantizeJob(job.src, job.dst, rows, self.block, self.scale_fmt))
                    targets[k].add(s_name)
                    entry["scale_target"], entry["scale_dst"] = s_name, _byte_range(rows, self.tensors[s_name])
                else:
                    jobs[k].append(job)
                self.entries.append(entry)
        if problems:
            raise PlanError(problems)
        self._jobs = [CompiledJobs(j, self.backend) for j in jobs]
        try:
            self._requants = [CompiledQuantize(r, self.backend) for r in requants]
            # step() with every bucket at hand: all buckets' jobs in one table each (two calls a step)
            self._all_jobs = CompiledJobs([j for js in jobs for j in js], self.backend)
            self._all_requants = CompiledQuantize([r for rs in requants for r in rs], self.backend)
        except PyloaderInputError as e:
            raise PlanError([str(e)]) from None
        self._targets = targets
        tied = {n for n, spec in plan.targets.items() if spec.fill_from and n in self.tensors}
        self._written = sorted(set().union(*targets, tied))
        self._checks = [Checksum(b) for b in self.buckets]
        self._applied: Dict[int, int] = {}
        self._t0: Optional[float] = None
        self._sums: Dict[int, torch.Tensor] = {}

    @property
    def kernel_calls(self) -> int:
        """Backend calls :meth:`step` makes for its writes: one for all copies and casts, one for all
        requantized tensors (:meth:`apply` makes these per bucket)."""
        return bool(self._all_jobs.jobs) + bool(self._all_requants.jobs)

    # -- every step ------------------------------------------------------------------------
    def check_buckets(self, version: int, ks: Sequence[int]) -> Dict[int, int]:
        """Each bucket's header version and checksum against its bytes (one sync for all)."""
        ks = list(ks)
        got = torch.stack([torch.cat([header(self.buckets[k]), self._checks[k](self.buckets[k]).view(1)])
                           for k in ks]).cpu().tolist()
        bad = []
        for k, (v, sent, seen) in zip(ks, got):
            if v != version:
                bad.append(f"bucket {k} carries version {v}, not {version}")
            elif sent != seen:
                bad.append(f"bucket {k}: its bytes differ from what the sender packed (checksum {seen}, sent {sent})")
        if bad:
            raise RefitError(f"refit: bucket{'s' if len(ks) > 1 else ''} {ks if len(ks) > 1 else ks[0]} not written; "
                             + "; ".join(bad))
        return {k: int(s) for k, (_, s, _) in zip(ks, got)}

    def apply(self, k: int, version: int) -> None:
        """Write bucket ``k``'s tensors into their parameters (its version and checksum checked
        first when ``verify``)."""
        if not 0 <= k < len(self.buckets):
            raise PyloaderInputError(f"refit: no bucket {k} (the layout has {len(self.buckets)})")
        if self._t0 is None:
            self._t0 = time.perf_counter()
        if self.verify and k not in self._sums:
            self._sums[k] = self.check_buckets(version, [k])[k]
        self._jobs[k].run()
        self._requants[k].run()
        self._applied[k] = version

    def finish(self, version: int) -> RefitReport:
        """The receipt of this version: every bucket applied with it, or a :class:`RefitError`
        naming the parameters left stale."""
        stale_buckets = [k for k in range(len(self.buckets)) if self._applied.get(k) != version]
        if stale_buckets:
            stale = sorted(set().union(*(self._targets[k] for k in stale_buckets)))
            self._reset()
            raise RefitError(f"refit version {version}: buckets {stale_buckets} were not applied, so "
                             f"{len(stale)} parameters are stale: {', '.join(stale[:10])}"
                             + (" …" if len(stale) > 10 else ""))
        fill_tied(self.plan, self.tensors)
        t0 = self._t0 if self._t0 is not None else time.perf_counter()
        host = time.perf_counter() - t0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        report = RefitReport(version, self.layout.payload_bytes, time.perf_counter() - t0, dict(self._sums),
                             list(self._written), self.verify, host)
        self._reset()
        return report

    def step(self, version: int) -> RefitReport:
        """Apply every bucket (the checks of all buckets first, in one sync) and return the receipt:
        all buckets' copies and casts in one backend call and all their requantized tensors in
        another (the per-bucket launches of :meth:`apply`, merged)."""
        self._t0 = time.perf_counter()
        if self.verify:
            self._sums = self.check_buckets(version, range(len(self.buckets)))
        self._all_jobs.run()
        self._all_requants.run()
        self._applied = {k: version for k in range(len(self.buckets))}
        return self.finish(version)

    def _reset(self) -> None:
        self._applied, self._sums, self._t0 = {}, {}, None

    def plan_json(self) -> List[dict]:
        """The compiled plan as data: for every piece, the bucket and byte offset it reads, the
        parameter and byte ranges it writes (``offset``, ``rows``, ``row_bytes``, ``row_stride``), the
        transform, and for requantized pieces the scale parameter's range."""
        return [dict(e) for e in self.entries]


def scale_rows(param: torch.Tensor, scale: torch.Tensor, dst: torch.Tensor, block) -> torch.Tensor:
    """The rows of ``scale`` (an FP8 parameter's block scales) that cover ``dst`` (whole rows of
    ``param``, or of one expert plane of it); refused where a scale block would mix rows written
    by two sources."""
    bm, bn = block
    plane_shape = param.shape[1:] if param.dim() == 3 else param.shape
    elem = dst.storage_offset() - param.storage_offset()
    slot, rem = divmod(elem, param.stride(0)) if param.dim() == 3 else (None, elem)
    row0 = rem // dst.stride(0)
    rows, cols = dst.shape
    M, N = plane_shape[0], (math.prod(plane_shape[1:]) if len(plane_shape) > 1 else 1)
    plane = scale[slot] if slot is not None else scale
    if param.dim() not in (2, 3) or cols != N or tuple(plane.shape) != (-(-M // bm), -(-N // bn)):
        raise PyloaderInputError(f"an FP8 parameter {list(param.shape)} with scale {list(scale.shape)} is not a "
                                 f"blockwise ({bm}x{bn}) layout pyloader can requantize into")
    if row0 % bm or (rows % bm and row0 + rows != M):
        raise PyloaderInputError(f"rows {row0}..{row0 + rows} of the parameter are not whole {bm}-row blocks, so a "
                                 "scale block would mix two sources")
    return plane[row0 // bm:row0 // bm + -(-rows // bm)]


def _byte_range(view: torch.Tensor, base: torch.Tensor) -> dict:
    size = view.element_size()
    rows, _ = view.shape if view.dim() == 2 else (1, view.numel())
    return {"offset": (view.data_ptr() - base.data_ptr()), "rows": int(rows),
            "row_bytes": int(view.shape[-1]) * size, "row_stride": int(view.stride(0)) * size if view.dim() == 2 else 0}
