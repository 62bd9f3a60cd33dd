"""Shard and expert assembly: many checkpoint tensors into fused parameters in one launch.

Engines hold fused parameters (``qkv_proj`` ``[q+k+v, H]``, ``gate_up_proj`` ``[2I, H]``,
``experts.w13_weight`` ``[E, 2I, H]``, ``experts.w2_weight`` ``[E, H, I]``); checkpoints store the
pieces, often in FP8 with block scales. Each function here turns the pieces into a list of
:class:`~pyloader.transform.TransformJob` (copy, cast or blockwise dequant of one 2-D view into
one 2-D view of the destination) and runs the whole list as one multi-tensor launch::

    from pyloader.ops import Shard, stack_shards, assemble_experts, tp_range, ep_expert_map

    # qkv_proj of a column-parallel rank: this rank's rows of each of q, k, v (FP8 + 128x128 scales)
    r = lambda n: tp_range(n, tp_rank, tp_size)
    stack_shards(qkv.weight, [Shard(q, q_s, rows=r(q.shape[0])), Shard(k, k_s, rows=r(k.shape[0])),
                              Shard(v, v_s, rows=r(v.shape[0]))])

    # w13 [E_local, 2I, H] of an expert-parallel rank from per-expert gate (w1) and up (w3)
    emap = ep_expert_map(num_experts=128, ep_rank=1, ep_size=4)     # {32: 0, 33: 1, ...}
    assemble_experts(w13, {e: [Shard(w1[e], s1[e]), Shard(w3[e], s3[e])] for e in emap}, expert_map=emap)

Sources may be views into one staging buffer (tensors at offsets of one allocation); they are
only read. The destination is written exactly once per element; unwritten elements are an error
before any launch.
"""

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from . import _dtypes
from .backend import resolve_backend
from .errors import PyloaderInputError
from .transform import TransformJob, run_jobs

Range = Tuple[int, int]


def tp_range(size: int, rank: int, world: int) -> Range:
    """Rows (or columns) ``[start, stop)`` that tensor-parallel ``rank`` of ``world`` owns of ``size``.

    Balanced split: the first ``size % world`` ranks take one extra row, so the sizes differ by at
    most one and every row is owned exactly once (``size=10, world=4`` → 3, 3, 2, 2). When
    ``world`` divides ``size`` this is the even split every engine uses.
    """
    if world <= 0 or not 0 <= rank < world:
        raise PyloaderInputError(f"tensor-parallel rank {rank} is not in [0, {world})")
    if size < 0:
        raise PyloaderInputError(f"cannot split a negative size {size}")
    base, extra = divmod(size, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def ep_expert_map(num_experts: int, ep_rank: int, ep_size: int) -> Dict[int, int]:
    """Global expert id → local slot for a contiguous expert-parallel split (balanced like :func:`tp_range`)."""
    start, stop = tp_range(num_experts, ep_rank, ep_size)
    return {g: g - start for g in range(start, stop)}


@dataclass
class Shard:
    """One checkpoint tensor (optionally FP8 with a block-scale grid) and the part of it to take.

    ``weight`` is 1-D, 2-D ``[M, N]`` or, for pre-stacked experts, 3-D ``[E, M, N]``. ``scale`` is the
    scale grid of the *whole* weight (``[ceil(M/bm), ceil(N/bn)]``, ``[E, ...]`` for 3-D; a single
    element means per-tensor). ``rows``/``cols`` are global ``[start, stop)`` ranges to take (a
    tensor-parallel slice); the scale block of each element is found from its global position, so a
    slice may start inside a block.
    """

    weight: torch.Tensor
    scale: Optional[torch.Tensor] = None
    block_size: Tuple[int, int] = (128, 128)
    rows: Optional[Range] = None
    cols: Optional[Range] = None

    def _matrix(self) -> torch.Tensor:
        w = self.weight
        if w.dim() == 1:
            return w.unsqueeze(0)
        if w.dim() != 2:
            raise PyloaderInputError(f"expected a 1-D or 2-D shard, got shape {tuple(w.shape)} (3-D: use unstack_experts)")
        return w

    @property
    def shape(self) -> Tuple[int, int]:
        """Shape of the part taken, as 2-D (a 1-D weight is one row)."""
        _, (a, b), (c, d) = self._resolved()
        return b - a, d - c

    def _resolved(self):
        """(2-D weight, row range, column range): computed once a job (host time is most of an
        eager call's time for a layer of hundreds of small experts)."""
        w = self._matrix()
        rows, cols = self._span(*w.shape)
        return w, rows, cols

    def _span(self, m: int, n: int) -> Tuple[Range, Range]:
        rows = self.rows if self.rows is not None else (0, m)
        cols = self.cols if self.cols is not None else (0, n)
        if self.weight.dim() == 1:  # one row; a range given either way selects elements
            rows, cols = (0, 1), self.rows or self.cols or (0, n)
        for what, (a, b), size in (("rows", rows, m), ("cols", cols, n)):
            if not 0 <= a <= b <= size:
                raise PyloaderInputError(f"{what} range {(a, b)} is outside the shard's {size} {what}")
        return rows, cols

    def job(self, dst: torch.Tensor, resolved=None) -> TransformJob:
        """The transform job that writes this shard's part into the 2-D view ``dst``."""
        w, (a, b), (c, d) = resolved or self._resolved()
        m, n = w.shape
        src = w if (a, b, c, d) == (0, m, 0, n) else w[a:b, c:d]
        if self.scale is None:
            return TransformJob(src, dst)
        if w.dtype not in _dtypes.FP8_WEIGHT_DTYPES:
            raise PyloaderInputError(f"a scale was given for a {w.dtype} weight; only FP8 weights are dequantized")
        s = self.scale
        if s.numel() == 1:  # per-tensor: one block covers the whole weight
            return TransformJob(src, dst, s.reshape(1, 1), (max(1, w.shape[0]), max(1, w.shape[1])))
        bm, bn = (int(x) for x in self.block_size)
        if bm <= 0 or bn <= 0:
            raise PyloaderInputError(f"block_size must be positive, got {self.block_size}")
        if s.dim() == 1 and self.weight.dim() == 1:
            s = s.unsqueeze(0)
        grid = (-(-w.shape[0] // bm), -(-w.shape[1] // bn))
        if tuple(s.shape) != grid:
            raise PyloaderInputError(
                f"scale shape {tuple(s.shape)} does not match weight {tuple(w.shape)} with blocks {(bm, bn)}: "
                f"expected {grid} (ceil(M/bm), ceil(N/bn))"
            )
        # Index the scale from the slice's first block; the offset inside that block goes to (r0, c0).
        if a >= bm or c >= bn:
            s = s[a // bm:, c // bn:]
        return TransformJob(src, dst, s, (bm, bn), (a % bm, c % bn))


ShardLike = Union[torch.Tensor, Shard]


def _as_shard(x: ShardLike) -> Shard:
    if isinstance(x, Shard):
        return x
    if isinstance(x, torch.Tensor):
        return Shard(x)
    raise PyloaderInputError(f"expected a tensor or a Shard, got {type(x).__name__}")


def unstack_experts(stacked: ShardLike, first_expert: int = 0) -> Dict[int, Shard]:
    """A pre-stacked ``[E, M, N]`` checkpoint tensor (and its ``[E, gm, gn]`` scales) as per-expert shards
    keyed by global expert id ``first_expert + e``; row/column ranges apply to every expert."""
    s = _as_shard(stacked)
    if s.weight.dim() != 3:
        raise PyloaderInputError(f"unstack_experts needs a 3-D [E, M, N] tensor, got shape {tuple(s.weight.shape)}")
    E = s.weight.shape[0]
    scales = None
    if s.scale is not None:
        if s.scale.dim() == 3 and s.scale.shape[0] == E:
            scales = list(s.scale.unbind(0))
        elif s.scale.numel() == 1:
            scales = [s.scale.reshape(1, 1)] * E
        else:
            raise PyloaderInputError(f"scale shape {tuple(s.scale.shape)} does not match stacked weight {tuple(s.weight.shape)}")
    return {first_expert + e: Shard(s.weight[e], scales[e] if scales else None, s.block_size, s.rows, s.cols)
            for e in range(E)}


def _matrix_view(out: torch.Tensor, what: str) -> torch.Tensor:
    if out.dim() == 1:
        return out.unsqueeze(0)
    if out.dim() != 2:
        raise PyloaderInputError(f"{what} must be 1-D or 2-D, got shape {tuple(out.shape)}")
    return out


def stack_jobs(out: torch.Tensor, shards: Sequence[ShardLike], dim: int = 0) -> List[TransformJob]:
    """Jobs that write ``shards`` one after another along ``dim`` of ``out`` (2-D, or 1-D for biases)."""
    dst = _matrix_view(out, "stack_shards destination")
    one_d = out.dim() == 1
    if one_d:
        dim = 1
    elif dim < 0:
        dim += 2
    if dim not in (0, 1):
        raise PyloaderInputError(f"dim must be 0 or 1 for a 2-D destination, got {dim}")
    jobs, offset = [], 0
    for i, x in enumerate(shards):
        shard = _as_shard(x)
        if one_d and shard.weight.dim() != 1:
            raise PyloaderInputError(f"shard {i}: a 1-D destination takes 1-D shards, got shape {tuple(shard.weight.shape)}")
        resolved = shard._resolved()
        _, (a, b), (c, d) = resolved
        m, n = b - a, d - c
        along, across = (m, n) if dim == 0 else (n, m)
        if across != dst.shape[1 - dim]:
            raise PyloaderInputError(
                f"shard {i} of shape {(m, n)} does not fit destination {tuple(out.shape)}: "
                f"size {across} along dim {1 - dim}, destination has {dst.shape[1 - dim]}"
            )
        if offset + along > dst.shape[dim]:
            raise PyloaderInputError(
                f"shards overflow destination {tuple(out.shape)} along dim {dim} at shard {i} "
                f"({offset} + {along} > {dst.shape[dim]})"
            )
        if offset == 0 and along == dst.shape[dim]:
            view = dst
        else:
            view = dst[offset:offset + along] if dim == 0 else dst[:, offset:offset + along]
        jobs.append(shard.job(view, resolved))
        offset += along
    if offset != dst.shape[dim]:
        raise PyloaderInputError(
            f"shards fill {offset} of {dst.shape[dim]} along dim {dim} of destination {tuple(out.shape)}: "
            f"the rest would be left unwritten"
        )
    return jobs


def expert_jobs(
    out: torch.Tensor,
    experts: Union[ShardLike, Mapping[int, Union[ShardLike, Sequence[ShardLike]]]],
    expert_map: Optional[Mapping[int, int]] = None,
    dim: int = 0,
) -> List[TransformJob]:
    """Jobs that fill ``out[E_local, M, N]`` from experts keyed by global id (see :func:`assemble_experts`)."""
    if out.dim() != 3:
        raise PyloaderInputError(f"expert destination must be 3-D [E_local, M, N], got shape {tuple(out.shape)}")
    if isinstance(experts, (torch.Tensor, Shard)):
        experts = unstack_experts(experts)
    if not isinstance(experts, Mapping):
        raise PyloaderInputError("experts must be a mapping {global expert id: shard(s)} or a 3-D tensor/Shard")
    E_local = out.shape[0]
    if expert_map is None:
        expert_map = {g: g for g in range(E_local)}
    written: Dict[int, int] = {}
    jobs: List[TransformJob] = []
    for g in sorted(experts):
        if g not in expert_map:
            continue  # another rank's expert
        slot = expert_map[g]
        if not 0 <= slot < E_local:
            raise PyloaderInputError(f"expert {g} maps to local slot {slot}, outside [0, {E_local})")
        if slot in written:
            raise PyloaderInputError(f"experts {written[slot]} and {g} both map to local slot {slot}")
        written[slot] = g
        parts = experts[g]
        if isinstance(parts, (torch.Tensor, Shard)):
            parts = [parts]
        try:
            jobs += stack_jobs(out[slot], parts, dim)
        except PyloaderInputError as e:
            raise PyloaderInputError(f"expert {g} (local slot {slot}): {e}") from None
    missing = sorted(set(range(E_local)) - set(written))
    if missing:
        owners = {s: g for g, s in expert_map.items()}
        raise PyloaderInputError(
            f"{len(missing)} of {E_local} local expert slots would be left unwritten: slots {missing[:16]}"
            f"{' …' if len(missing) > 16 else ''} (global experts {[owners.get(s) for s in missing[:16]]} not given)"
        )
    return jobs


def multi_tensor_transform(jobs: Sequence[TransformJob], backend: Optional[str] = None) -> None:
    """Run transform jobs (copy / cast / blockwise dequant of 2-D views) in as few launches as possible.

    ``cuda``: one launch per 256 jobs (large jobs are split into chunks across the grid);
    ``triton``: one launch per distinct (source, destination, scale) dtype signature; ``torch``: job by job.
    """
    jobs = [j for j in jobs if j.src.numel() > 0]
    if not jobs:
        return
    device = jobs[0].dst.device
    for i, job in enumerate(jobs):
        job.validate(i)
        if job.dst.device != device:
            raise PyloaderInputError(f"job {i} is on {job.dst.device}, job 0 on {device}: one call runs on one device")
    run_jobs(jobs, resolve_backend(backend, device, "multi_tensor_transform"))


def stack_shards(out: torch.Tensor, shards: Sequence[ShardLike], dim: int = 0,
                 backend: Optional[str] = None) -> torch.Tensor:
    """Write ``shards`` one after another along ``dim`` of ``out`` in one launch; returns ``out``.

    ``out``: the fused parameter (2-D ``[rows, cols]``, any row stride; or 1-D for a fused bias);
    bfloat16/float16/float32 (or any dtype for same-dtype copies). ``shards``: tensors or
    :class:`Shard` (FP8 weight + scale grid, optional tensor-parallel row/column range). Same dtype →
    byte copy; float → float cast; FP8 with scale → dequant. The shards must fill ``out`` exactly.

        stack_shards(layer.qkv_proj.weight, [q, k, v])            # bf16 checkpoint
        stack_shards(layer.gate_up_proj.weight, [Shard(g, g_s), Shard(u, u_s)])   # FP8 → bf16
    """
    multi_tensor_transform(stack_jobs(out, shards, dim), backend)
    return out


def assemble_experts(
    out: torch.Tensor,
    experts: Union[ShardLike, Mapping[int, Union[ShardLike, Sequence[ShardLike]]]],
    expert_map: Optional[Mapping[int, int]] = None,
    dim: int = 0,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Fill ``out[E_local, M, N]`` with experts in one launch; returns ``out``.

    ``experts``: ``{global expert id: shard or [shards stacked along dim of the expert plane]}``
    (``{e: [w1[e], w3[e]]}`` for ``w13``, ``{e: w2[e]}`` for ``w2``), or a pre-stacked 3-D tensor /
    :class:`Shard` (see :func:`unstack_experts`; merge several such dicts for a mix).
    ``expert_map``: global id → local slot (:func:`ep_expert_map` for contiguous expert-parallel
    ranges, or any explicit dict); experts not in it belong to other ranks and are skipped. Default:
    identity over ``E_local``. Every local slot must be written exactly once.
    """
    multi_tensor_transform(expert_jobs(out, experts, expert_map, dim), backend)
    return out
