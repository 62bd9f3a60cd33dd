"""``quantize_blockwise``: blockwise FP8 quantization by the DeepSeek recipe."""

from typing import Optional, Sequence, Tuple

import torch

from .. import dtypes
from ..backend import resolve_backend
from ..errors import PyloaderInputError
from . import reference
from .dequant import int_pair


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
    bm, bn = int_pair(block_size, "block_size")
    if bm <= 0 or bn <= 0:
        raise PyloaderInputError(f"block_size must be positive, got {(bm, bn)}")
    if dtype not in dtypes.FP8_WEIGHT_DTYPES:
        raise PyloaderInputError(f"dtype must be float8_e4m3fn or float8_e5m2, got {dtype}")
    if x.dtype not in dtypes.FLOAT_OUT_DTYPES:
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
        from ..triton_kernels import quantize_blockwise_triton

        quantize_blockwise_triton(x, q, scale, (bm, bn))
        return q, scale
    from .. import _C

    x3 = x if x.dim() == 3 else x.unsqueeze(0)
    with torch.cuda.device(x.device):
        _C.quantize_blockwise(
            x3.data_ptr(), dtypes.value_code(x.dtype), x3.stride(0), x3.stride(1), q.data_ptr(),
            dtypes.value_code(dtype), scale.data_ptr(), x3.shape[0], M, N, bm, bn,
            torch.cuda.current_stream(x.device).cuda_stream,
        )
    return q, scale
