"""Triton blockwise FP8 quantization (DeepSeek recipe, float or UE8M0 scales) over a table of
jobs: one launch per source dtype and FP8 kind, one program per scale block."""

import torch
import triton
import triton.language as tl

from .fp8 import float32_to_fp8_bits

_TILE_M = 32
_TILE_N = 128
_MAX_GRID_Y = 65535


@triton.jit
def _pow2_at_least(y):
    # The least 2^e >= y (y > 0), e clamped to [-127, 127], from y's bits: exact, no log2 rounding.
    bits = y.to(tl.int32, bitcast=True)
    biased = (bits >> 23) & 0xFF
    mant = bits & 0x7FFFFF
    e = tl.where(biased > 0, tl.where(mant == 0, biased - 127, biased - 126), tl.where(mant > (1 << 22), -126, -127))
    e = tl.minimum(e, 127)
    return tl.where(e >= -126, (e + 127) << 23, 1 << 22).to(tl.float32, bitcast=True)


@triton.jit
def _multi_tensor_quantize_kernel(table_ptr, SRC_TY: tl.constexpr, E5M2: tl.constexpr, TILE_M: tl.constexpr,
                                  TILE_N: tl.constexpr):
    # Grid (scale blocks of the largest job, jobs): program (b, j) is block b of job j.
    # s = amax(|x| over the block) / fmax (1 for an all-zero block), or the least power of two
    # >= amax / 448; q = rne(x / s), exact IEEE division.
    pid = tl.program_id(0)
    row = table_ptr + tl.program_id(1).to(tl.int64) * 11  # columns a job (the table below)
    rows = tl.load(row + 3)
    cols = tl.load(row + 4)
    bm = tl.load(row + 8)
    bn = tl.load(row + 9)
    grid_cols = tl.cdiv(cols, bn)
    if pid >= tl.cdiv(rows, bm) * grid_cols:
        return
    gr = pid // grid_cols
    gc = pid % grid_cols
    x_ptr = tl.load(row + 0).to(tl.pointer_type(SRC_TY))
    q_ptr = tl.load(row + 1).to(tl.pointer_type(tl.uint8))
    s_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    x_stride = tl.load(row + 5)
    q_stride = tl.load(row + 6)
    row0 = gr * bm
    col0 = gc * bn
    row_end = tl.minimum(row0 + bm, rows)
    col_end = tl.minimum(col0 + bn, cols)
    fmax = 57344.0 if E5M2 else 448.0
    amax = tl.zeros((TILE_M, TILE_N), dtype=tl.float32)
    for i in range(row0, row_end, TILE_M):
        for j in range(col0, col_end, TILE_N):
            m = i + tl.arange(0, TILE_M)
            n = j + tl.arange(0, TILE_N)
            mask = (m[:, None] < row_end) & (n[None, :] < col_end)
            x = tl.load(x_ptr + m.to(tl.int64)[:, None] * x_stride + n[None, :], mask=mask, other=0.0)
            amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
    block_max = tl.max(tl.max(amax, axis=1), axis=0)
    y = tl.math.div_rn(block_max, fmax)
    if tl.load(row + 10) != 0:
        y = _pow2_at_least(y)
    s = tl.where(block_max > 0, y, 1.0)
    tl.store(s_ptr + gr * tl.load(row + 7) + gc, s)
    for i in range(row0, row_end, TILE_M):
        for j in range(col0, col_end, TILE_N):
            m = i + tl.arange(0, TILE_M)
            n = j + tl.arange(0, TILE_N)
            mask = (m[:, None] < row_end) & (n[None, :] < col_end)
            x = tl.load(x_ptr + m.to(tl.int64)[:, None] * x_stride + n[None, :], mask=mask, other=0.0)
            v = tl.minimum(tl.maximum(tl.math.div_rn(x.to(tl.float32), s), -fmax), fmax)
            tl.store(q_ptr + m.to(tl.int64)[:, None] * q_stride + n[None, :], float32_to_fp8_bits(v, E5M2), mask=mask)


_TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def multi_tensor_quantize_triton(jobs):
    """Triton backend of pyloader.ops.quantize.multi_tensor_quantize (jobs already checked)."""
    groups = {}
    for job in jobs:
        if job.src.numel():
            groups.setdefault((job.src.dtype, job.q.dtype), []).append(job)
    for (src_dtype, q_dtype), group in groups.items():
        table, most = [], 0
        for j in group:
            (rows, cols), (bm, bn) = j.src.shape, j.block_size
            table.append([j.src.data_ptr(), j.q.data_ptr(), j.scale.data_ptr(), rows, cols, j.src.stride(0),
                          j.q.stride(0), j.scale.stride(0), bm, bn, int(j.scale_fmt == "ue8m0")])
            most = max(most, triton.cdiv(rows, bm) * triton.cdiv(cols, bn))
        table_t = torch.tensor(table, dtype=torch.int64).to(group[0].src.device, non_blocking=True)
        for first in range(0, len(group), _MAX_GRID_Y):
            _multi_tensor_quantize_kernel[(most, min(_MAX_GRID_Y, len(group) - first))](
                table_t[first:], SRC_TY=_TL[src_dtype], E5M2=q_dtype == torch.float8_e5m2, TILE_M=_TILE_M,
                TILE_N=_TILE_N,
            )
