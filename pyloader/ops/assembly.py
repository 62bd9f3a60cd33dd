"""Shard and expert assembly: many checkpoint tensors into fused parameters in one launch.

Engines hold fused parameters (``qkv_proj`` ``[q+k+v, H]``, ``gate_up_proj`` ``[2I, H]``,
``experts.w13_weight`` ``[E, 2I, H]``, ``experts.w2_weight`` ``[E, H, I]``); checkpoints store the
pieces, often in FP8 with block scales. Each function here turns the pieces into a list of
:class:`~pyloader.ops.jobs.TransformJob` (copy, cast or blockwise dequant of one 2-D view into
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

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .. import dtypes
from ..backend import resolve_backend
from ..errors import PyloaderInputError
from ..parallel import Range
from .jobs import (F_AMAX, F_DST, F_GLOBAL, F_SCALE, F_SRC, JOB_FIELDS, TransformJob, append_job_row, launch_table,
                   packed_bytes, run_jobs)

@dataclass
class Shard:
    """One checkpoint tensor (optionally quantized, with its scale grid) and the part of it to take.

    ``weight`` is 1-D, 2-D ``[M, N]`` or, for pre-stacked experts, 3-D ``[E, M, N]``. ``scale`` is the
    scale grid of the *whole* weight (``[ceil(M/bm), ceil(N/bn)]``, ``[E, ...]`` for 3-D; a single
    element means per-tensor). ``rows``/``cols`` are global ``[start, stop)`` ranges to take (a
    tensor-parallel slice); the scale block of each element is found from its global position, so a
    slice may start inside a block.

    Packed 4-bit weights (``packing`` ``"e2m1"`` or ``"int4"``): ``weight`` holds two values a byte
    (uint8/int8 ``[M, N/2]``, or int32 words ``[M, N/8]``); ``N`` is ``packed_cols`` (default two a
    byte), and column ranges start on a byte. ``global_scale``/``global_mode``: NVFP4's second-level
    scale (see :class:`~pyloader.ops.jobs.TransformJob`); ``amax``: a gate slot for this shard.
    """

    weight: torch.Tensor
    scale: Optional[torch.Tensor] = None
    block_size: Tuple[int, int] = (128, 128)
    rows: Optional[Range] = None
    cols: Optional[Range] = None
    packing: Optional[str] = None
    packed_cols: Optional[int] = None
    global_scale: Optional[torch.Tensor] = None
    global_mode: str = "mul"
    amax: Optional[torch.Tensor] = None

    def _matrix(self) -> torch.Tensor:
        w = self.weight
        if self.packing is not None:
            w = dtypes.as_packed_bytes(w)
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
        eager call's time for a layer of hundreds of small experts). A packed weight is its byte
        matrix; the ranges count values."""
        w = self.weight
        if self.packing is not None:
            w = self._matrix()
            n = self.packed_cols if self.packed_cols is not None else 2 * w.shape[1]
            if self.packing not in dtypes.PACKINGS:
                raise PyloaderInputError(f"unknown packing {self.packing!r}; expected one of {sorted(dtypes.PACKINGS)}")
            if w.shape[1] not in packed_bytes(n, self.packing):
                raise PyloaderInputError(
                    f"packed {self.packing} shard of {tuple(w.shape)} bytes does not hold {n} values a row")
            rows, cols = self._span(w.shape[0], n)
            if cols[0] % 2:
                raise PyloaderInputError(f"a packed shard's column range must start on a byte, got {cols}")
            return w, rows, cols
        if w.dim() != 2:
            w = self._matrix()
        elif self.rows is None and self.cols is None:  # the common case: the whole 2-D tensor
            m, n = w.shape
            return w, (0, m), (0, n)
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

    def _scale_grid(self, w: torch.Tensor, a: int, c: int, n: int):
        """``(2-D scale grid, first block row, first block column, (bm, bn), (r0, c0))`` for the part of
        the 2-D weight ``w`` (``n`` values a row) that starts at row ``a``, column ``c``; None without a scale."""
        if self.scale is None:
            if self.global_scale is not None:
                raise PyloaderInputError("a second-level scale was given without a block scale")
            return None
        if self.packing is None and w.dtype not in dtypes.FP8_WEIGHT_DTYPES:
            raise PyloaderInputError(f"a scale was given for a {w.dtype} weight; only FP8 and packed weights are dequantized")
        s = self.scale
        m = w.shape[0]
        shape = s.shape
        if math.prod(shape) == 1:  # per-tensor: one block covers the whole weight
            return s.reshape(1, 1), 0, 0, (max(1, m), max(1, n)), (0, 0)
        bm, bn = self.block_size
        if type(bm) is not int or type(bn) is not int:
            bm, bn = int(bm), int(bn)
        if bm <= 0 or bn <= 0:
            raise PyloaderInputError(f"block_size must be positive, got {self.block_size}")
        if len(shape) == 1 and self.weight.dim() == 1:
            s = s.unsqueeze(0)
            shape = s.shape
        grid = (-(-m // bm), -(-n // bn))
        if shape != grid:
            raise PyloaderInputError(
                f"scale shape {tuple(s.shape)} does not match weight {tuple(w.shape)} with blocks {(bm, bn)}: "
                f"expected {grid} (ceil(M/bm), ceil(N/bn))"
            )
        # Index the scale from the slice's first block; the offset inside that block goes to (r0, c0).
        return s, a // bm, c // bn, (bm, bn), (a % bm, c % bn)

    def _values_a_row(self, w: torch.Tensor) -> int:
        if self.packing is None:
            return w.shape[1]
        return self.packed_cols if self.packed_cols is not None else 2 * w.shape[1]

    def job(self, dst: torch.Tensor, resolved=None) -> TransformJob:
        """The transform job that writes this shard's part into the 2-D view ``dst``."""
        w, (a, b), (c, d) = resolved or self._resolved()
        m, n = w.shape[0], self._values_a_row(w)
        if self.packing is not None:
            whole_rows = c == 0 and d == n  # keeps an INT4 row's padded last word
            src = w[a:b] if whole_rows else w[a:b, c // 2:c // 2 + -(-(d - c) // 2)]
        else:
            src = w if (a, b, c, d) == (0, m, 0, n) else w[a:b, c:d]
        extras = dict(packing=self.packing, global_scale=self.global_scale, global_mode=self.global_mode, amax=self.amax)
        grid = self._scale_grid(w, a, c, n)
        if grid is None:
            return TransformJob(src, dst, **extras)
        s, bi, bj, block, offset = grid
        if bi or bj:
            s = s[bi:, bj:]
        return TransformJob(src, dst, s, block, offset, **extras)

    def append_row(self, table: List[int], index: int, resolved, dst: int, dst_dtype: torch.dtype, dst_strides,
                   device: torch.device) -> None:
        """Append the job-table row of this shard's part written at address ``dst`` (no tensor views)."""
        w, (a, b), (c, d) = resolved
        if w.device != device:
            raise PyloaderInputError(f"job {index}: source on {w.device}, destination on {device}")
        ws = w.stride()
        src = w.data_ptr()
        if self.packing is not None:
            src += a * ws[0] + c // 2  # bytes
        elif a or c:
            src += (a * ws[0] + c * ws[1]) * w.element_size()
        grid = self._scale_grid(w, a, c, self._values_a_row(w))
        scale = None
        if grid is not None:
            s, bi, bj, (bm, bn), (r0, c0) = grid
            if s.device != device:
                raise PyloaderInputError(f"job {index}: scale on {s.device}, weight on {device}")
            ss = s.stride()
            s_ptr = s.data_ptr()
            if bi or bj:
                s_ptr += (bi * ss[0] + bj * ss[1]) * s.element_size()
            scale = (s_ptr, s.dtype, ss[0], ss[1], bm, bn, r0, c0)
        g = None
        if self.global_scale is not None:
            if self.global_scale.device != device or self.global_scale.dtype != torch.float32 or self.global_scale.numel() != 1:
                raise PyloaderInputError(f"job {index}: second-level scale must be one float32 on {device}")
            g = (self.global_scale.data_ptr(), self.global_mode)
        amax = 0
        if self.amax is not None:
            if self.amax.device != device or self.amax.dtype != torch.float32 or self.amax.numel() != 2:
                raise PyloaderInputError(f"job {index}: gate slot must be a float32 [2] on {device}")
            amax = self.amax.data_ptr()
        append_job_row(table, index, src, w.dtype, ws, dst, dst_dtype, dst_strides, b - a, d - c, scale, self.packing, g,
                       amax)


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
    return {first_expert + e: Shard(s.weight[e], scales[e] if scales else None, s.block_size, s.rows, s.cols, s.packing,
                                    s.packed_cols, s.global_scale, s.global_mode, s.amax)
            for e in range(E)}


def _matrix_view(out: torch.Tensor, what: str) -> torch.Tensor:
    if out.dim() == 1:
        return out.unsqueeze(0)
    if out.dim() != 2:
        raise PyloaderInputError(f"{what} must be 1-D or 2-D, got shape {tuple(out.shape)}")
    return out


def _stack_dim(ndim: int, dim: int) -> int:
    if ndim == 1:
        return 1
    if dim < 0:
        dim += 2
    if dim not in (0, 1):
        raise PyloaderInputError(f"dim must be 0 or 1 for a 2-D destination, got {dim}")
    return dim


def _layout(dst_shape: Tuple[int, int], out_shape, one_d: bool, shards: Sequence[ShardLike], dim: int):
    """``(index, shard, resolved, offset)`` of each shard written along ``dim`` of a 2-D destination of
    ``dst_shape`` (``out_shape``: the destination as the caller sees it, for messages); raises unless
    they fill it exactly."""
    placed, offset = [], 0
    for i, x in enumerate(shards):
        shard = _as_shard(x)
        if one_d and shard.weight.dim() != 1:
            raise PyloaderInputError(f"shard {i}: a 1-D destination takes 1-D shards, got shape {tuple(shard.weight.shape)}")
        resolved = shard._resolved()
        _, (a, b), (c, d) = resolved
        m, n = b - a, d - c
        along, across = (m, n) if dim == 0 else (n, m)
        if across != dst_shape[1 - dim]:
            raise PyloaderInputError(
                f"shard {i} of shape {(m, n)} does not fit destination {tuple(out_shape)}: "
                f"size {across} along dim {1 - dim}, destination has {dst_shape[1 - dim]}"
            )
        if offset + along > dst_shape[dim]:
            raise PyloaderInputError(
                f"shards overflow destination {tuple(out_shape)} along dim {dim} at shard {i} "
                f"({offset} + {along} > {dst_shape[dim]})"
            )
        placed.append((i, shard, resolved, offset))
        offset += along
    if offset != dst_shape[dim]:
        raise PyloaderInputError(
            f"shards fill {offset} of {dst_shape[dim]} along dim {dim} of destination {tuple(out_shape)}: "
            f"the rest would be left unwritten"
        )
    return placed


def stack_jobs(out: torch.Tensor, shards: Sequence[ShardLike], dim: int = 0) -> List[TransformJob]:
    """Jobs that write ``shards`` one after another along ``dim`` of ``out`` (2-D, or 1-D for biases)."""
    dst = _matrix_view(out, "stack_shards destination")
    dim = _stack_dim(out.dim(), dim)
    jobs = []
    for _, shard, resolved, offset in _layout(tuple(dst.shape), out.shape, out.dim() == 1, shards, dim):
        _, (a, b), (c, d) = resolved
        along = (b - a) if dim == 0 else (d - c)
        if offset == 0 and along == dst.shape[dim]:
            view = dst
        else:
            view = dst[offset:offset + along] if dim == 0 else dst[:, offset:offset + along]
        jobs.append(shard.job(view, resolved))
    return jobs


def _stack_rows(table: List[int], out: torch.Tensor, dst: int, dst_shape, dst_strides, shards, dim: int,
                one_d: bool = False) -> List[Tuple[int, List[int]]]:
    """Append the job-table rows of :func:`stack_jobs` for a 2-D destination plane of ``out`` at
    address ``dst`` (cuda path: no tensor views). Returns each row's shard index and its fields
    with the addresses made relative (source to the shard's weight, destination to ``dst``, scale
    to the shard's scale): the template :func:`expert_table` reuses for planes whose shards are alike."""
    step = (dst_strides[0] if dim == 0 else dst_strides[1]) * out.element_size()
    template = []
    for k, shard, resolved, offset in _layout(dst_shape, dst_shape if not one_d else out.shape, one_d, shards, dim):
        _, (a, b), (c, d) = resolved
        if b > a and d > c:  # empty parts launch nothing
            at = len(table)
            shard.append_row(table, at // JOB_FIELDS, resolved, dst + offset * step, out.dtype, dst_strides, out.device)
            row = table[at:at + JOB_FIELDS]
            row[F_SRC] -= shard.weight.data_ptr()
            row[F_DST] -= dst
            if row[F_SCALE]:
                row[F_SCALE] -= shard.scale.data_ptr()
            if row[F_GLOBAL]:
                row[F_GLOBAL] -= shard.global_scale.data_ptr()
            if row[F_AMAX]:
                row[F_AMAX] -= shard.amax.data_ptr()
            template.append((k, row))
    return template


def _signature(x):
    """What a shard's job-table rows depend on besides its addresses (None: not cacheable)."""
    if type(x) is Shard:
        w, s = x.weight, x.scale
        extras = (x.packing, x.packed_cols, x.global_mode, x.global_scale is not None, x.amax is not None)
        if s is None:
            return w.shape, w.stride(), w.dtype, w.device, x.block_size, x.rows, x.cols, extras
        return (w.shape, w.stride(), w.dtype, w.device, s.shape, s.stride(), s.dtype, s.device, x.block_size, x.rows,
                x.cols, extras)
    if type(x) is torch.Tensor or type(x) is torch.nn.Parameter:
        return x.shape, x.stride(), x.dtype, x.device
    return None


def stack_table(out: torch.Tensor, shards: Sequence[ShardLike], dim: int = 0) -> List[int]:
    """The job table (flat int64 fields, 16 a job) of :func:`stack_jobs`, from addresses and strides:
    what the cuda backend launches, without making a tensor view per job."""
    dst = _matrix_view(out, "stack_shards destination")
    table: List[int] = []
    _stack_rows(table, out, dst.data_ptr(), tuple(dst.shape), dst.stride(), shards, _stack_dim(out.dim(), dim),
                out.dim() == 1)
    return table


def _expert_planes(out: torch.Tensor, experts, expert_map: Optional[Mapping[int, int]]):
    """``(global id, local slot, shards)`` of each expert this rank owns; raises unless every local
    slot is written exactly once."""
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
    planes = []
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
        planes.append((g, slot, [parts] if isinstance(parts, (torch.Tensor, Shard)) else parts))
    if len(written) != E_local:
        missing = sorted(set(range(E_local)) - set(written))
        owners = {s: g for g, s in expert_map.items()}
        raise PyloaderInputError(
            f"{len(missing)} of {E_local} local expert slots would be left unwritten: slots {missing[:16]}"
            f"{' …' if len(missing) > 16 else ''} (global experts {[owners.get(s) for s in missing[:16]]} not given)"
        )
    return planes


def expert_jobs(
    out: torch.Tensor,
    experts: Union[ShardLike, Mapping[int, Union[ShardLike, Sequence[ShardLike]]]],
    expert_map: Optional[Mapping[int, int]] = None,
    dim: int = 0,
) -> List[TransformJob]:
    """Jobs that fill ``out[E_local, M, N]`` from experts keyed by global id (see :func:`assemble_experts`)."""
    jobs: List[TransformJob] = []
    for g, slot, parts in _expert_planes(out, experts, expert_map):
        try:
            jobs += stack_jobs(out[slot], parts, dim)
        except PyloaderInputError as e:
            raise PyloaderInputError(f"expert {g} (local slot {slot}): {e}") from None
    return jobs


def expert_table(out: torch.Tensor, experts, expert_map: Optional[Mapping[int, int]] = None, dim: int = 0) -> List[int]:
    """The job table of :func:`expert_jobs`, from addresses and strides (see :func:`stack_table`).
    Experts whose shards have the same shapes, strides, dtypes, devices and ranges as an expert
    already checked reuse its rows with their own addresses: a Qwen3-30B-A3B layer is 128 alike
    experts, and checking each again was most of the call's host time."""
    planes = _expert_planes(out, experts, expert_map)
    dim = _stack_dim(2, dim)
    base, (s0, s1, s2) = out.data_ptr(), out.stride()
    plane_bytes, shape = s0 * out.element_size(), (out.shape[1], out.shape[2])
    table: List[int] = []
    templates: Dict[tuple, List[Tuple[int, List[int]]]] = {}
    for g, slot, parts in planes:
        dst = base + slot * plane_bytes
        key = tuple([_signature(x) for x in parts])
        try:
            rows = templates.get(key)
        except TypeError:  # a list as a range or block size: not hashable, checked every time
            key, rows = (None,), None
        if rows is not None:
            for k, row in rows:
                x = parts[k]
                table += row
                if type(x) is Shard:
                    table[-JOB_FIELDS + F_SRC] += x.weight.data_ptr()
                    if x.scale is not None:
                        table[-JOB_FIELDS + F_SCALE] += x.scale.data_ptr()
                    if x.global_scale is not None:
                        table[-JOB_FIELDS + F_GLOBAL] += x.global_scale.data_ptr()
                    if x.amax is not None:
                        table[-JOB_FIELDS + F_AMAX] += x.amax.data_ptr()
                else:
                    table[-JOB_FIELDS + F_SRC] += x.data_ptr()
                table[-JOB_FIELDS + F_DST] += dst
            continue
        try:
            rows = _stack_rows(table, out, dst, shape, (s1, s2), parts, dim)
        except PyloaderInputError as e:
            raise PyloaderInputError(f"expert {g} (local slot {slot}): {e}") from None
        if None not in key:
            templates[key] = rows
    return table


def multi_tensor_transform(jobs: Sequence[TransformJob], backend: Optional[str] = None) -> None:
    """Run transform jobs (copy / cast / blockwise dequant of 2-D views) in as few launches as possible.

    ``cuda``: one launch per 224 jobs (large jobs are split into chunks across the grid);
    ``triton``: one launch per distinct (source, destination, scale) dtype signature; ``torch``: job by job.
    """
    first = next((j for j in jobs if j.src.numel() > 0), None)
    if first is not None:  # nothing to run: no backend to choose
        _run_checked(jobs, resolve_backend(backend, first.dst.device, "multi_tensor_transform"))


def _run(device: torch.device, backend: Optional[str], op: str, table, jobs) -> None:
    """Run one call's work on the chosen backend: ``table()`` (job-table rows from addresses) on
    cuda, ``jobs()`` (jobs over tensor views, checked) on the others."""
    chosen = resolve_backend(backend, device, op)
    if chosen == "cuda":
        launch_table(table(), device)
    else:
        _run_checked(jobs(), chosen)


def _run_checked(jobs: Sequence[TransformJob], chosen: str) -> None:
    jobs = [j for j in jobs if j.src.numel() > 0]
    if not jobs:
        return
    device = jobs[0].dst.device
    for i, job in enumerate(jobs):
        job.validate(i)
        if job.dst.device != device:
            raise PyloaderInputError(f"job {i} is on {job.dst.device}, job 0 on {device}: one call runs on one device")
    run_jobs(jobs, chosen)


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
    _run(out.device, backend, "stack_shards", lambda: stack_table(out, shards, dim), lambda: stack_jobs(out, shards, dim))
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
    # cuda: the job table straight from addresses (host time is most of an eager call for a layer
    # of hundreds of small experts, and a tensor view costs ~2 µs)
    _run(out.device, backend, "assemble_experts", lambda: expert_table(out, experts, expert_map, dim),
         lambda: expert_jobs(out, experts, expert_map, dim))
    return out


def assemble_layer(experts: Sequence[Tuple[torch.Tensor, object]] = (),
                   stacks: Sequence[Tuple[torch.Tensor, Sequence[ShardLike]]] = (),
                   expert_map: Optional[Mapping[int, int]] = None, backend: Optional[str] = None) -> None:
    """A whole layer in one launch: every ``(out, experts)`` of :func:`assemble_experts` (same
    ``expert_map``) and every ``(out, shards)`` of :func:`stack_shards` (dim 0), as one job table::

        assemble_layer(experts=[(w13, {e: [Shard(w1[e], s1[e]), Shard(w3[e], s3[e])] for e in emap}),
                                (w2, {e: Shard(w2_[e], s2[e]) for e in emap})],
                       stacks=[(qkv, [q, k, v])], expert_map=emap)

    The destinations must be on one device. (The cuda backend runs 224 jobs a launch: a layer of
    more jobs is still one call and one pass over the table.)"""
    outs = [o for o, _ in experts] + [o for o, _ in stacks]
    if not outs:
        return
    device = outs[0].device
    for o in outs:
        if o.device != device:
            raise PyloaderInputError(f"assemble_layer: destinations on {device} and {o.device}: one call runs on one device")

    def work(of_experts, of_stack) -> list:
        out = []
        for dst, ex in experts:
            out += of_experts(dst, ex, expert_map)
        for dst, shards in stacks:
            out += of_stack(dst, shards)
        return out

    _run(device, backend, "assemble_layer", lambda: work(expert_table, stack_table), lambda: work(expert_jobs, stack_jobs))
