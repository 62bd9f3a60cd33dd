"""``dequant_blockwise``: one blockwise-FP8 weight (2-D or 3-D) into a caller-owned destination."""

from typing import Optional, Sequence, Tuple

import torch

from .. import dtypes
from ..backend import resolve_backend
from ..errors import PyloaderInputError
from . import reference
from .jobs import TransformJob, run_jobs


def int_pair(v, name: str) -> Tuple[int, int]:
    try:
        a, b = (int(x) for x in v)
    except (TypeError, ValueError):
        raise PyloaderInputError(f"{name} must be a pair of integers, got {v!r}") from None
    return a, b


def _scale_grid(scale: torch.Tensor, lead: Tuple[int, ...], need: Tuple[int, int], exact: bool) -> torch.Tensor:
    """Scale viewed as lead + [grid_rows, grid_cols]; accepts forms equal up to size-1 dims ([M] for [M, 1], 0-d for [1, 1])."""
    want = tuple(lead) + tuple(need)
    shape = tuple(scale.shape)
    if shape == want or (not exact and len(shape) == len(want) and shape[: len(lead)] == tuple(lead)
                         and shape[-2] >= need[0] and shape[-1] >= need[1]):
        return scale
    squeezed = tuple(d for d in shape if d != 1)
    if squeezed == tuple(d for d in want if d != 1):
        return scale.reshape(want)
    rule = "exactly" if exact else "at least"
    raise PyloaderInputError(
        f"scale shape {shape} does not match the block grid: expected {rule} {want} "
        f"(grid = ceil((offset + size) / block) per dimension)"
    )


def dequant_blockwise(
    weight: torch.Tensor,
    scale: torch.Tensor,
    block_size: Sequence[int] = (128, 128),
    out: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.bfloat16,
    backend: Optional[str] = None,
    block_offset: Sequence[int] = (0, 0),
) -> torch.Tensor:
    """Blockwise FP8 dequantization into ``out``:

        out[..., i, j] = round_to_nearest_even(float32(weight[..., i, j]) * float32(scale[..., (i + r0) // bm, (j + c0) // bn]))

    Args:
        weight: ``float8_e4m3fn`` or ``float8_e5m2``, ``[M, N]`` or ``[E, M, N]`` (any row stride).
        scale: float32, bfloat16, float16, ``float8_e8m0fnu`` or uint8 (E8M0 exponents), shaped
            ``[ceil(M/bm), ceil(N/bn)]`` (``[E, ...]`` for 3-D). With a ``block_offset`` the scale is
            the grid of the whole tensor the weight was sliced from; a grid larger than needed is
            accepted (slices), a smaller one is an error.
        block_size: ``(bm, bn)``: 128×128 (DeepSeek), ``(M, N)`` per-tensor, ``(1, N)`` per-row, ``(1, 32)`` MX.
        out: destination (may be a strided view, e.g. rows of a fused parameter); bfloat16, float16
            or float32. Allocated with ``out_dtype`` when None.
        block_offset: ``(r0, c0)``: where the weight starts in the block grid (tensor-parallel slices
            starting inside a block).
        backend: ``"cuda"``, ``"triton"``, ``"torch"`` or None (``PYLOADER_BACKEND``, else fastest).

    Returns ``out``.
    """
    bm, bn = int_pair(block_size, "block_size")
    r0, c0 = int_pair(block_offset, "block_offset")
    if bm <= 0 or bn <= 0:
        raise PyloaderInputError(f"block_size must be positive, got {(bm, bn)}")
    if r0 < 0 or c0 < 0:
        raise PyloaderInputError(f"block_offset must be non-negative, got {(r0, c0)}")
    if weight.dtype not in dtypes.FP8_WEIGHT_DTYPES:
        raise PyloaderInputError(f"weight must be float8_e4m3fn or float8_e5m2, got {weight.dtype}")
    if weight.dim() not in (2, 3):
        raise PyloaderInputError(f"weight must be 2-D [M, N] or 3-D [E, M, N], got shape {tuple(weight.shape)}")
    if scale.dtype not in dtypes.SCALE_DTYPES:
        raise PyloaderInputError(
            f"scale dtype {scale.dtype} unsupported; expected float32, bfloat16, float16, float8_e8m0fnu or uint8 (E8M0)"
        )
    M, N = weight.shape[-2:]
    lead = tuple(weight.shape[:-2])
    need = (-(-(r0 + M) // bm), -(-(c0 + N) // bn))
    scale = _scale_grid(scale, lead, need, exact=False)  # larger grids: slices of a bigger tensor
    if scale.device != weight.device:
        raise PyloaderInputError(f"scale is on {scale.device}, weight on {weight.device}")
    if out is None:
        if out_dtype not in dtypes.FLOAT_OUT_DTYPES:
            raise PyloaderInputError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
        out = torch.empty(weight.shape, dtype=out_dtype, device=weight.device)
    else:
        if out.shape != weight.shape:
            raise PyloaderInputError(f"out shape {tuple(out.shape)} != weight shape {tuple(weight.shape)}")
        if out.dtype not in dtypes.FLOAT_OUT_DTYPES:
            raise PyloaderInputError(f"out must be bfloat16, float16 or float32, got {out.dtype}")
        if out.device != weight.device:
            raise PyloaderInputError(f"out is on {out.device}, weight on {weight.device}")
    if weight.numel() == 0:
        return out
    chosen = resolve_backend(backend, weight.device, "dequant_blockwise")
    if chosen == "torch":
        return reference.dequant_blockwise_torch(weight, scale, out, (bm, bn), (r0, c0))
    if chosen == "triton":
        from ..triton_kernels import dequant_blockwise_triton

        return dequant_blockwise_triton(weight, scale, out, (bm, bn), (r0, c0))
    if weight.dim() == 2:
        jobs = [TransformJob(weight, out, scale, (bm, bn), (r0, c0))]
    else:
        jobs = [TransformJob(weight[e], out[e], scale[e], (bm, bn), (r0, c0)) for e in range(weight.shape[0])]
    run_jobs(jobs, chosen)
    return out


