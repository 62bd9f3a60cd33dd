"""Jobs of the multi-tensor transform, and running a list of them on a backend.

A job is one 2-D source view, one 2-D destination view of the same shape, and optionally a
scale grid: copy (same dtype), cast, or blockwise dequant into the destination. A packed 4-bit
source (``packing``: FP4 E2M1 or INT4, two values a byte) is a byte view of half the columns. A
second-level scale (NVFP4) multiplies or divides every block scale; a gate slot receives the
largest magnitudes the job saw. ``cuda`` runs a whole list in one launch per 224 jobs;
``triton`` and ``torch`` run the same list job by job.
"""

from array import array
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .. import dtypes
from ..errors import PyloaderInputError
from . import reference

JOB_FIELDS = 19
(F_SRC, F_DST, F_SCALE, F_ROWS, F_COLS, F_SRC_STRIDE, F_DST_STRIDE, F_SCALE_ROW_STRIDE, F_SCALE_COL_STRIDE,
 F_BM, F_BN, F_R0, F_C0, F_SRC_DTYPE, F_DST_DTYPE, F_SCALE_DTYPE, F_GLOBAL, F_GLOBAL_MODE, F_AMAX) = range(JOB_FIELDS)


def packed_bytes(cols: int, packing: str) -> Tuple[int, ...]:
    """Byte widths a packed row of ``cols`` values may have: two values a byte; INT4 words
    (8 values) may pad the last one."""
    half = -(-cols // 2)
    return (half,) if packing == "e2m1" else tuple(sorted({half, 4 * -(-cols // 8)}))


@dataclass
class TransformJob:
    """``dst[i, j] = rne(decode(src)[i, j] * S[(i + r0) // bm, (j + c0) // bn])`` (no scale: copy/cast).

    ``decode``: float32 of the element, or with ``packing`` the 4-bit value of column j (byte
    j // 2 of the row, low nibble for even j): E2M1 (``"e2m1"``) or q - 8 (``"int4"``). ``S``: the
    block scale as float32, times (``global_mode="mul"``) or divided by (``"div"``) the float32
    ``global_scale`` when one is given. ``amax``: a float32 ``[2]`` slot raised to max |result
    before rounding| and max |decoded source| (NaN wins), for the sanity gate."""

    src: torch.Tensor
    dst: torch.Tensor
    scale: Optional[torch.Tensor] = None
    block_size: Tuple[int, int] = (1, 1)
    block_offset: Tuple[int, int] = (0, 0)
    packing: Optional[str] = None
    global_scale: Optional[torch.Tensor] = None
    global_mode: str = "mul"
    amax: Optional[torch.Tensor] = None

    def _validate_extras(self, where: str) -> None:
        g = self.global_scale
        if g is not None:
            if self.scale is None:
                raise PyloaderInputError(f"{where}: a second-level scale needs a block scale")
            if g.dtype != torch.float32 or g.numel() != 1 or g.device != self.dst.device:
                raise PyloaderInputError(
                    f"{where}: second-level scale must be one float32 on {self.dst.device}, got {g.dtype} {tuple(g.shape)} "
                    f"on {g.device}")
            if self.global_mode not in dtypes.GLOBAL_MODES:
                raise PyloaderInputError(f"{where}: global_mode must be 'mul' or 'div', got {self.global_mode!r}")
        a = self.amax
        if a is not None:
            if a.dtype != torch.float32 or a.numel() != 2 or not a.is_contiguous() or a.device != self.dst.device:
                raise PyloaderInputError(f"{where}: gate slot must be a contiguous float32 [2] on {self.dst.device}")
            if self.packing is None and self.scale is None and self.src.dtype == self.dst.dtype:
                raise PyloaderInputError(f"{where}: a same-dtype copy has no gate")

    def validate(self, index: int = 0) -> None:
        src, dst = self.src, self.dst
        where = f"job {index}"
        if src.dim() != 2 or dst.dim() != 2:
            raise PyloaderInputError(f"{where}: source and destination must be 2-D views, got {src.dim()}-D and {dst.dim()}-D")
        if self.packing is not None:
            if self.packing not in dtypes.PACKINGS:
                raise PyloaderInputError(f"{where}: unknown packing {self.packing!r}; expected one of {sorted(dtypes.PACKINGS)}")
            src = dtypes.as_packed_bytes(src)
            widths = packed_bytes(dst.shape[1], self.packing)
            if src.shape[0] != dst.shape[0] or src.shape[1] not in widths:
                raise PyloaderInputError(
                    f"{where}: packed {self.packing} source of {tuple(src.shape)} bytes does not hold destination "
                    f"{tuple(dst.shape)} (expected [{dst.shape[0]}, {' or '.join(map(str, widths))}] bytes)")
            if dst.dtype not in dtypes.FLOAT_OUT_DTYPES:
                raise PyloaderInputError(f"{where}: cannot dequantize packed {self.packing} into {dst.dtype}")
        elif src.shape != dst.shape:
            raise PyloaderInputError(f"{where}: source shape {tuple(src.shape)} != destination shape {tuple(dst.shape)}")
        if src.device != dst.device:
            raise PyloaderInputError(f"{where}: source on {src.device}, destination on {dst.device}")
        if self.packing is None:
            job_codes(src.dtype, dst.dtype, None if self.scale is None else self.scale.dtype, index)
        elif self.scale is not None:
            job_codes(torch.float32, dst.dtype, self.scale.dtype, index)
        self._validate_extras(where)
        if self.scale is None:
            return
        if self.scale.dim() != 2:
            raise PyloaderInputError(f"{where}: scale must be a 2-D grid, got shape {tuple(self.scale.shape)}")
        if self.scale.device != src.device:
            raise PyloaderInputError(f"{where}: scale on {self.scale.device}, weight on {src.device}")
        bm, bn = self.block_size
        r0, c0 = self.block_offset
        if bm <= 0 or bn <= 0 or r0 < 0 or c0 < 0:
            raise PyloaderInputError(f"{where}: block size {self.block_size} and offset {self.block_offset} must be positive")
        rows, cols = dst.shape
        if rows and cols:
            need = (-(-(r0 + rows) // bm), -(-(c0 + cols) // bn))
            if self.scale.shape[0] < need[0] or self.scale.shape[1] < need[1]:
                raise PyloaderInputError(
                    f"{where}: scale grid {tuple(self.scale.shape)} too small for rows {r0}..{r0 + rows}, "
                    f"cols {c0}..{c0 + cols} with blocks {self.block_size} (needs at least {need})"
                )


def _require_unit_column_stride(cols: int, col_stride: int, what: str, index: int, strides) -> None:
    if cols > 1 and col_stride != 1:
        raise PyloaderInputError(
            f"job {index}: {what} must have unit stride along its last dimension for this backend "
            f"(got strides {tuple(strides)}); pass .contiguous() or use backend='torch'"
        )


_CODES: Dict[Tuple[torch.dtype, torch.dtype, Optional[torch.dtype]], Tuple[int, int, int]] = {}


def job_codes(src_dtype: torch.dtype, dst_dtype: torch.dtype, scale_dtype: Optional[torch.dtype],
              index: int = 0) -> Tuple[int, int, int]:
    """Table dtype codes (source, destination, scale) of a job, checked once per dtype combination:
    a same-dtype copy without scale moves bytes (BYTE, BYTE, NONE)."""
    key = (src_dtype, dst_dtype, scale_dtype)
    codes = _CODES.get(key)
    if codes is not None:
        return codes
    where = f"job {index}"
    if scale_dtype is None:
        if src_dtype == dst_dtype:
            codes = (dtypes.BYTE, dtypes.BYTE, dtypes.NONE)
        elif src_dtype in dtypes.VALUE_CODES and dst_dtype in dtypes.FLOAT_OUT_DTYPES:
            codes = (dtypes.value_code(src_dtype), dtypes.value_code(dst_dtype), dtypes.NONE)
        else:
            raise PyloaderInputError(f"{where}: cannot cast {src_dtype} to {dst_dtype}")
    else:
        if src_dtype not in dtypes.VALUE_CODES or dst_dtype not in dtypes.FLOAT_OUT_DTYPES:
            raise PyloaderInputError(f"{where}: cannot dequantize {src_dtype} into {dst_dtype}")
        try:
            scale = dtypes.scale_code(scale_dtype)
        except ValueError as e:
            raise PyloaderInputError(f"{where}: {e}") from None
        codes = (dtypes.value_code(src_dtype), dtypes.value_code(dst_dtype), scale)
    _CODES[key] = codes
    return codes


def append_job_row(table: List[int], index: int, src: int, src_dtype: torch.dtype, src_strides, dst: int,
                   dst_dtype: torch.dtype, dst_strides, rows: int, cols: int, scale=None, packing: Optional[str] = None,
                   global_scale: Optional[Tuple[int, str]] = None, amax: int = 0) -> None:
    """Append one job's fields (csrc/include/pyloader/job_table.h JobField order) to ``table``.

    ``src``/``dst``: addresses of element (0, 0); strides in elements (a packed source: of its
    storage dtype, turned into bytes here). ``scale``: ``(address of the job's first scale block,
    dtype, row stride, col stride, bm, bn, r0, c0)`` or None. ``global_scale``: ``(address of a
    float32, "mul" or "div")``; ``amax``: address of a float32 [2] gate slot (0: none). Callers
    that hold base tensors compute addresses directly: a tensor view costs ~2 µs of host time,
    and a layer of 384 experts made 768 of them."""
    g_ptr, g_mode = (0, 0) if global_scale is None else (global_scale[0], dtypes.GLOBAL_MODES[global_scale[1]])
    if packing is not None:
        if cols > 1 and (src_strides[1] != 1 or dst_strides[1] != 1):
            _require_unit_column_stride(cols, src_strides[1], "packed source", index, src_strides)
            _require_unit_column_stride(cols, dst_strides[1], "destination", index, dst_strides)
        src_code = dtypes.PACKINGS[packing]
        row_bytes = src_strides[0] * src_dtype.itemsize
        if scale is None:
            _, dc, _ = job_codes(torch.float32, dst_dtype, None, index)
            table += (src, dst, 0, rows, cols, row_bytes, dst_strides[0], 0, 0, 0, 0, 0, 0, src_code, dc, dtypes.NONE,
                      0, 0, amax)
            return
        s_ptr, s_dtype, s_rs, s_cs, bm, bn, r0, c0 = scale
        _, dc, scc = job_codes(torch.float32, dst_dtype, s_dtype, index)
        table += (src, dst, s_ptr, rows, cols, row_bytes, dst_strides[0], s_rs, s_cs, bm, bn, r0, c0, src_code, dc, scc,
                  g_ptr, g_mode, amax)
        return
    if cols > 1 and (src_strides[1] != 1 or dst_strides[1] != 1):
        _require_unit_column_stride(cols, src_strides[1], "source", index, src_strides)
        _require_unit_column_stride(cols, dst_strides[1], "destination", index, dst_strides)
    if scale is None:
        sc, dc, _ = job_codes(src_dtype, dst_dtype, None, index)
        if sc == dtypes.BYTE:  # same-dtype copy: move bytes
            size = src_dtype.itemsize
            table += (src, dst, 0, rows, cols * size, src_strides[0] * size, dst_strides[0] * size, 0, 0, 0, 0, 0, 0,
                      sc, dc, dtypes.NONE, 0, 0, 0)
            return
        table += (src, dst, 0, rows, cols, src_strides[0], dst_strides[0], 0, 0, 0, 0, 0, 0, sc, dc, dtypes.NONE,
                  0, 0, amax)
        return
    s_ptr, s_dtype, s_rs, s_cs, bm, bn, r0, c0 = scale
    sc, dc, scc = job_codes(src_dtype, dst_dtype, s_dtype, index)
    table += (src, dst, s_ptr, rows, cols, src_strides[0], dst_strides[0], s_rs, s_cs, bm, bn, r0, c0, sc, dc, scc,
              g_ptr, g_mode, amax)


def job_rows(jobs: Sequence[TransformJob]) -> List[int]:
    """The jobs' fields, 16 a job, flat (the table :func:`launch_table` runs)."""
    table: List[int] = []
    for i, job in enumerate(jobs):
        src, dst, s = job.src, job.dst, job.scale
        rows, cols = dst.shape
        scale = None
        if s is not None:
            scale = (s.data_ptr(), s.dtype, s.stride(0), s.stride(1)) + tuple(job.block_size) + tuple(job.block_offset)
        g = None if job.global_scale is None else (job.global_scale.data_ptr(), job.global_mode)
        append_job_row(table, i, src.data_ptr(), src.dtype, src.stride(), dst.data_ptr(), dst.dtype, dst.stride(),
                       rows, cols, scale, job.packing, g, 0 if job.amax is None else job.amax.data_ptr())
    return table


def pack_jobs(jobs: Sequence[TransformJob]) -> torch.Tensor:
    """Pack jobs into the int64 [n, JOB_FIELDS] table csrc/include/pyloader/job_table.h describes."""
    return torch.tensor(job_rows(jobs), dtype=torch.int64).view(-1, JOB_FIELDS)


def launch_table(table, device: torch.device) -> None:
    """Run packed job rows (a list, or an ``array("q")`` packed once) on ``device``'s current
    stream (one launch per 224 jobs, in the extension)."""
    from .. import _C

    n = len(table) // JOB_FIELDS
    if not n:
        return
    # read on the host during the call: the launches copy it into kernel parameters
    packed = table if isinstance(table, array) else array("q", table)
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device).cuda_stream
        _C.multi_tensor_transform(packed.buffer_info()[0], n, stream)


def run_jobs_cuda(jobs: Sequence[TransformJob]) -> None:
    if jobs:
        launch_table(job_rows(jobs), jobs[0].dst.device)


def run_job_torch(job: TransformJob) -> None:
    if job.scale is None and job.packing is None and job.amax is None:
        reference.cast_2d_torch(job.src, job.dst)
        return
    s = None
    if job.scale is not None:
        s = reference.effective_scale(job.scale, job.global_scale, job.global_mode)
    reference.dequant_2d_torch(job.src, s, job.dst, job.block_size, job.block_offset, packing=job.packing,
                               amax=job.amax)


def run_jobs(jobs: Sequence[TransformJob], backend: str) -> None:
    """Run validated jobs on a resolved backend."""
    if backend == "cuda":
        run_jobs_cuda(jobs)
    elif backend == "triton":
        from ..triton_kernels import multi_tensor_transform_triton

        multi_tensor_transform_triton(jobs)
    else:
        for job in jobs:
            run_job_torch(job)


class CompiledJobs:
    """Jobs packed once and run many times (a refit step): their tensors must stay alive and in
    place. On ``cuda`` a run is one extension call on the packed table, no per-job Python."""

    def __init__(self, jobs: Sequence[TransformJob], backend: str):
        self.jobs = [j for j in jobs if j.src.numel()]
        self.backend = backend
        self.device = self.jobs[0].dst.device if self.jobs else None
        self._packed = array("q", job_rows(self.jobs)) if backend == "cuda" and self.jobs else None

    def run(self) -> None:
        if self._packed is None:
            run_jobs(self.jobs, self.backend)
        else:
            launch_table(self._packed, self.device)
