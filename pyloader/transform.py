"""Jobs of the multi-tensor transform, and running a list of them on a backend.

A job is one 2-D source view, one 2-D destination view of the same shape, and optionally a
scale grid: copy (same dtype), cast, or blockwise dequant into the destination. ``cuda`` runs a
whole list in one launch per 256 jobs; ``triton`` and ``torch`` run the same list job by job.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from . import _dtypes, reference
from .errors import PyloaderInputError

JOB_FIELDS = 16
(F_SRC, F_DST, F_SCALE, F_ROWS, F_COLS, F_SRC_STRIDE, F_DST_STRIDE, F_SCALE_ROW_STRIDE, F_SCALE_COL_STRIDE,
 F_BM, F_BN, F_R0, F_C0, F_SRC_DTYPE, F_DST_DTYPE, F_SCALE_DTYPE) = range(JOB_FIELDS)


@dataclass
class TransformJob:
    """``dst[i, j] = rne(float32(src[i, j]) * scale[(i + r0) // bm, (j + c0) // bn])`` (no scale: copy/cast)."""

    src: torch.Tensor
    dst: torch.Tensor
    scale: Optional[torch.Tensor] = None
    block_size: Tuple[int, int] = (1, 1)
    block_offset: Tuple[int, int] = (0, 0)

    def validate(self, index: int = 0) -> None:
        src, dst = self.src, self.dst
        where = f"job {index}"
        if src.dim() != 2 or dst.dim() != 2:
            raise PyloaderInputError(f"{where}: source and destination must be 2-D views, got {src.dim()}-D and {dst.dim()}-D")
        if src.shape != dst.shape:
            raise PyloaderInputError(f"{where}: source shape {tuple(src.shape)} != destination shape {tuple(dst.shape)}")
        if src.device != dst.device:
            raise PyloaderInputError(f"{where}: source on {src.device}, destination on {dst.device}")
        same = src.dtype == dst.dtype
        if self.scale is None:
            if not same and (src.dtype not in _dtypes._VALUE_CODES or dst.dtype not in _dtypes.FLOAT_OUT_DTYPES):
                raise PyloaderInputError(f"{where}: cannot cast {src.dtype} to {dst.dtype}")
            return
        if src.dtype not in _dtypes._VALUE_CODES or dst.dtype not in _dtypes.FLOAT_OUT_DTYPES:
            raise PyloaderInputError(f"{where}: cannot dequantize {src.dtype} into {dst.dtype}")
        _dtypes.scale_code(self.scale.dtype)
        if self.scale.dim() != 2:
            raise PyloaderInputError(f"{where}: scale must be a 2-D grid, got shape {tuple(self.scale.shape)}")
        if self.scale.device != src.device:
            raise PyloaderInputError(f"{where}: scale on {self.scale.device}, weight on {src.device}")
        bm, bn = self.block_size
        r0, c0 = self.block_offset
        if bm <= 0 or bn <= 0 or r0 < 0 or c0 < 0:
            raise PyloaderInputError(f"{where}: block size {self.block_size} and offset {self.block_offset} must be positive")
        rows, cols = src.shape
        if rows and cols:
            need = (-(-(r0 + rows) // bm), -(-(c0 + cols) // bn))
            if self.scale.shape[0] < need[0] or self.scale.shape[1] < need[1]:
                raise PyloaderInputError(
                    f"{where}: scale grid {tuple(self.scale.shape)} too small for rows {r0}..{r0 + rows}, "
                    f"cols {c0}..{c0 + cols} with blocks {self.block_size} (needs at least {need})"
                )


def _require_unit_column_stride(t: torch.Tensor, what: str, index: int) -> None:
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise PyloaderInputError(
            f"job {index}: {what} must have unit stride along its last dimension for this backend "
            f"(got strides {t.stride()}); pass .contiguous() or use backend='torch'"
        )


def pack_jobs(jobs: Sequence[TransformJob]) -> torch.Tensor:
    """Pack jobs into the int64 [n, 16] table csrc/pyloader.h describes (JobField order)."""
    rows_out: List[List[int]] = []
    for i, job in enumerate(jobs):
        src, dst = job.src, job.dst
        _require_unit_column_stride(src, "source", i)
        _require_unit_column_stride(dst, "destination", i)
        rows, cols = src.shape
        row = [0] * JOB_FIELDS
        row[F_SRC], row[F_DST] = src.data_ptr(), dst.data_ptr()
        row[F_ROWS], row[F_COLS] = rows, cols
        row[F_SRC_STRIDE], row[F_DST_STRIDE] = src.stride(0), dst.stride(0)
        if job.scale is None and src.dtype == dst.dtype:
            size = src.element_size()  # same-dtype copy: move bytes
            row[F_COLS], row[F_SRC_STRIDE], row[F_DST_STRIDE] = cols * size, src.stride(0) * size, dst.stride(0) * size
            row[F_SRC_DTYPE] = row[F_DST_DTYPE] = _dtypes.BYTE
        else:
            row[F_SRC_DTYPE], row[F_DST_DTYPE] = _dtypes.value_code(src.dtype), _dtypes.value_code(dst.dtype)
        if job.scale is not None:
            s = job.scale
            row[F_SCALE] = s.data_ptr()
            row[F_SCALE_ROW_STRIDE], row[F_SCALE_COL_STRIDE] = s.stride(0), s.stride(1)
            row[F_BM], row[F_BN] = job.block_size
            row[F_R0], row[F_C0] = job.block_offset
            row[F_SCALE_DTYPE] = _dtypes.scale_code(s.dtype)
        rows_out.append(row)
    if not rows_out:
        return torch.zeros((0, JOB_FIELDS), dtype=torch.int64)
    return torch.tensor(rows_out, dtype=torch.int64)


def run_jobs_cuda(jobs: Sequence[TransformJob]) -> None:
    from . import _C

    if not jobs:
        return
    table = pack_jobs(jobs)
    stream = torch.cuda.current_stream(jobs[0].dst.device).cuda_stream
    with torch.cuda.device(jobs[0].dst.device):
        _C.multi_tensor_transform(table.data_ptr(), table.shape[0], stream)


def run_job_torch(job: TransformJob) -> None:
    if job.scale is None:
        reference.cast_2d_torch(job.src, job.dst)
    else:
        reference.dequant_2d_torch(
            job.src, reference.scale_to_float32(job.scale), job.dst, job.block_size, job.block_offset
        )


def run_jobs(jobs: Sequence[TransformJob], backend: str) -> None:
    """Run validated jobs on a resolved backend."""
    if backend == "cuda":
        run_jobs_cuda(jobs)
    elif backend == "triton":
        from .triton_kernels import multi_tensor_transform_triton

        multi_tensor_transform_triton(jobs)
    else:
        for job in jobs:
            run_job_torch(job)
