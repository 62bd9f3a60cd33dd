"""Public kernels. Every op writes into a caller-owned destination when one is given.

    >>> w, s = pyloader.ops.quantize_blockwise(torch.randn(576, 7168, device="cuda"))
    >>> out = pyloader.ops.dequant_blockwise(w, s)              # [576, 7168] bfloat16
    >>> fused = torch.empty(3 * 576, 7168, dtype=torch.bfloat16, device="cuda")
    >>> pyloader.ops.dequant_blockwise(w, s, out=fused[576:1152])  # straight into rows of a fused parameter

Many tensors in one launch (pyloader.assembly): ``stack_shards`` (q/k/v → qkv, gate/up → gate_up),
``assemble_experts`` (experts → ``[E_local, …]``), ``assemble_layer`` (several of those in one
launch), with ``Shard`` for FP8 + scale and tensor-parallel
ranges (``tp_range``), ``ep_expert_map`` for expert-parallel ownership, and the low-level
``multi_tensor_transform`` over ``TransformJob`` lists.
"""

from typing import Optional, Sequence, Tuple

import torch

from . import _dtypes, reference
from .backend import resolve_backend
from .errors import PyloaderInputError
from .transform import TransformJob, run_jobs
from .assembly import (  # noqa: F401  (public API)
    Shard, assemble_experts, assemble_layer, ep_expert_map, multi_tensor_transform, stack_shards, tp_range,
    unstack_experts,
)


def _pair(v, name: str) -> Tuple[int, int]:
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
    bm, bn = _pair(block_size, "block_size")
    r0, c0 = _pair(block_offset, "block_offset")
    if bm <= 0 or bn <= 0:
        raise PyloaderInputError(f"block_size must be positive, got {(bm, bn)}")
    if r0 < 0 or c0 < 0:
        raise PyloaderInputError(f"block_offset must be non-negative, got {(r0, c0)}")
    if weight.dtype not in _dtypes.FP8_WEIGHT_DTYPES:
        raise PyloaderInputError(f"weight must be float8_e4m3fn or float8_e5m2, got {weight.dtype}")
    if weight.dim() not in (2, 3):
        raise PyloaderInputError(f"weight must be 2-D [M, N] or 3-D [E, M, N], got shape {tuple(weight.shape)}")
    if scale.dtype not in _dtypes.SCALE_DTYPES:
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
        if out_dtype not in _dtypes.FLOAT_OUT_DTYPES:
            raise PyloaderInputError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
        out = torch.empty(weight.shape, dtype=out_dtype, device=weight.device)
    else:
        if out.shape != weight.shape:
            raise PyloaderInputError(f"out shape {tuple(out.shape)} != weight shape {tuple(weight.shape)}")
        if out.dtype not in _dtypes.FLOAT_OUT_DTYPES:
            raise PyloaderInputError(f"out must be bfloat16, float16 or float32, got {out.dtype}")
        if out.device != weight.device:
            raise PyloaderInputError(f"out is on {out.device}, weight on {weight.device}")
    if weight.numel() == 0:
        return out
    chosen = resolve_backend(backend, weight.device, "dequant_blockwise")
    if chosen == "torch":
        return reference.dequant_blockwise_torch(weight, scale, out, (bm, bn), (r0, c0))
    if chosen == "triton":
        from .triton_kernels import dequant_blockwise_triton

        return dequant_blockwise_triton(weight, scale, out, (bm, bn), (r0, c0))
    if weight.dim() == 2:
        jobs = [TransformJob(weight, out, scale, (bm, bn), (r0, c0))]
    else:
        jobs = [TransformJob(weight[e], out[e], scale[e], (bm, bn), (r0, c0)) for e in range(weight.shape[0])]
    run_jobs(jobs, chosen)
    return out


def quantize_blockwise(
    x: torch.Tensor,
    block_size: Sequence[int] = (128, 128),
    dtype: torch.dtype = torch.float8_e4m3fn,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Blockwise FP8 quantization by the DeepSeek recipe; returns ``(q, scale_inv)``.

    ``scale_inv = amax(|x| over the block) / fmax`` (fmax 448 for e4m3fn, 57344 for e5m2; an all-zero
    block gets 1.0, never NaN), ``q = saturate(rne(x / scale_inv))``; ragged edge blocks count only
    their real elements. ``x`` is bfloat16/float16/float32 ``[M, N]`` or ``[E, M, N]`` with finite
    values; ``q`` is contiguous, ``scale_inv`` float32 ``[..., ceil(M/bm), ceil(N/bn)]``.
    ``dequant_blockwise(q, scale_inv, block_size)`` inverts it up to FP8 rounding.
    """
    bm, bn = _pair(block_size, "block_size")
    if bm <= 0 or bn <= 0:
        raise PyloaderInputError(f"block_size must be positive, got {(bm, bn)}")
    if dtype not in _dtypes.FP8_WEIGHT_DTYPES:
        raise PyloaderInputError(f"dtype must be float8_e4m3fn or float8_e5m2, got {dtype}")
    if x.dtype not in _dtypes.FLOAT_OUT_DTYPES:
        raise PyloaderInputError(f"x must be bfloat16, float16 or float32, got {x.dtype}")
    if x.dim() not in (2, 3):
        raise PyloaderInputError(f"x must be 2-D or 3-D, got shape {tuple(x.shape)}")
    chosen = resolve_backend(backend, x.device, "quantize_blockwise")
    if chosen == "torch":
        return reference.quantize_blockwise_torch(x, (bm, bn), dtype)
    M, N = x.shape[-2:]
    lead = tuple(x.shape[:-2])
    q = torch.empty(x.shape, dtype=dtype, device=x.device)
    scale = torch.empty(lead + (-(-M // bm), -(-N // bn)), dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return q, scale
    if x.stride(-1) != 1 and N > 1:
        x = x.contiguous()
    if chosen == "triton":
        from .triton_kernels import quantize_blockwise_triton

        quantize_blockwise_triton(x, q, scale, (bm, bn))
        return q, scale
    from . import _C

    x3 = x if x.dim() == 3 else x.unsqueeze(0)
    with torch.cuda.device(x.device):
        _C.quantize_blockwise(
            x3.data_ptr(), _dtypes.value_code(x.dtype), x3.stride(0), x3.stride(1), q.data_ptr(),
            _dtypes.value_code(dtype), scale.data_ptr(), x3.shape[0], M, N, bm, bn,
            torch.cuda.current_stream(x.device).cuda_stream,
        )
    return q, scale
