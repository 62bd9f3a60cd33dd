"""Triton blockwise FP8 quantization (DeepSeek recipe), one program per scale block."""

import torch
import triton
import triton.language as tl

from .fp8 import float32_to_fp8_bits

_TILE_M = 32
_TILE_N = 128


@triton.jit
def _quantize_blockwise_kernel(
    x_ptr, q_ptr, s_ptr, rows, cols, x_stride_e, x_stride_r, grid_cols, block_rows, block_cols, fmax,
    E5M2: tl.constexpr, TILE_M: tl.constexpr, TILE_N: tl.constexpr,
):
    # s = amax(|x| over the block) / fmax (1 for an all-zero block); q = rne(x / s), exact IEEE division.
    pid = tl.program_id(0)
    e = tl.program_id(1).to(tl.int64)
    row0 = (pid // grid_cols) * block_rows
    col0 = (pid % grid_cols) * block_cols
    row_end = tl.minimum(row0 + block_rows, rows)
    col_end = tl.minimum(col0 + block_cols, cols)
    x_base = x_ptr + e * x_stride_e
    amax = tl.zeros((TILE_M, TILE_N), dtype=tl.float32)
    for i in range(row0, row_end, TILE_M):
        for j in range(col0, col_end, TILE_N):
            m = i + tl.arange(0, TILE_M)
            n = j + tl.arange(0, TILE_N)
            mask = (m[:, None] < row_end) & (n[None, :] < col_end)
            x = tl.load(x_base + m.to(tl.int64)[:, None] * x_stride_r + n[None, :], mask=mask, other=0.0)
            amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
    block_max = tl.max(tl.max(amax, axis=1), axis=0)
    s = tl.where(block_max > 0, tl.math.div_rn(block_max, fmax), 1.0)
    tl.store(s_ptr + e * tl.num_programs(0) + pid, s)
    q_base = q_ptr + e * rows * cols
    for i in range(row0, row_end, TILE_M):
        for j in range(col0, col_end, TILE_N):
            m = i + tl.arange(0, TILE_M)
            n = j + tl.arange(0, TILE_N)
            mask = (m[:, None] < row_end) & (n[None, :] < col_end)
            x = tl.load(x_base + m.to(tl.int64)[:, None] * x_stride_r + n[None, :], mask=mask, other=0.0)
            v = tl.minimum(tl.maximum(tl.math.div_rn(x.to(tl.float32), s), -fmax), fmax)
            tl.store(q_base + m.to(tl.int64)[:, None] * cols + n[None, :], float32_to_fp8_bits(v, E5M2), mask=mask)


def quantize_blockwise_triton(x, q, scale, block_size):
    """Triton backend of pyloader.ops.quantize_blockwise; q (contiguous FP8) and scale (float32) are filled."""
    x3 = x if x.dim() == 3 else x.unsqueeze(0)
    E, M, N = x3.shape
    bm, bn = block_size
    grid_rows, grid_cols = triton.cdiv(M, bm), triton.cdiv(N, bn)
    e5m2 = q.dtype == torch.float8_e5m2
    _quantize_blockwise_kernel[(grid_rows * grid_cols, E)](
        x3, q.view(torch.uint8), scale, M, N, x3.stride(0), x3.stride(1), grid_cols, bm, bn,
        57344.0 if e5m2 else 448.0, E5M2=e5m2, TILE_M=_TILE_M, TILE_N=_TILE_N,
    )
