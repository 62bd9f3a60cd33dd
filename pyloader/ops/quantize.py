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


def requant_into(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, block_size: Sequence[int] = (128, 128),
                 scale_fmt: str = "float", backend: Optional[str] = None) -> None:
    """Quantize ``x`` ([M, N] float) blockwise into existing ``q`` (FP8 [M, N], rows contiguous)
    and ``scale`` (float32 [ceil(M/bm), ceil(N/bn)], contiguous): the refit of an FP8 parameter in
    place, pointers unchanged. ``scale_fmt``: ``"float"`` (:func:`quantize_blockwise`, e4m3fn or
    e5m2) or ``"ue8m0"`` (:func:`quantize_fp8_block_pow2`, e4m3fn, on the torch path)."""
    bm, bn = int_pair(block_size, "block_size")
    M, N = x.shape
    grid = (-(-M // bm), -(-N // bn))
    if q.shape != x.shape or q.dtype not in dtypes.FP8_WEIGHT_DTYPES:
        raise PyloaderInputError(f"requant: q must be FP8 {list(x.shape)}, got {q.dtype} {list(q.shape)}")
    if tuple(scale.shape) != grid or scale.dtype != torch.float32:
        raise PyloaderInputError(f"requant: scale must be float32 {list(grid)}, got {scale.dtype} {list(scale.shape)}")
    if scale_fmt not in ("float", "ue8m0"):
        raise PyloaderInputError(f"requant: scale_fmt must be 'float' or 'ue8m0', not {scale_fmt!r}")
    if scale_fmt == "ue8m0" and q.dtype != torch.float8_e4m3fn:
        raise PyloaderInputError("requant: UE8M0 scales are for float8_e4m3fn")
    chosen = "torch" if scale_fmt == "ue8m0" else resolve_backend(backend, x.device, "quantize_blockwise")
    direct = q.is_contiguous() and scale.is_contiguous() and (x.stride(-1) == 1 or N <= 1)
    if chosen == "torch" or not direct:
        qq, ss = quantize_fp8_block_pow2(x, (bm, bn)) if scale_fmt == "ue8m0" else \
            reference.quantize_blockwise_torch(x, (bm, bn), q.dtype) if chosen == "torch" else \
            quantize_blockwise(x, (bm, bn), q.dtype, chosen)
        q.copy_(qq)
        scale.copy_(ss)
        return
    if chosen == "triton":
        from ..triton_kernels import quantize_blockwise_triton

        quantize_blockwise_triton(x, q, scale, (bm, bn))
        return
    from .. import _C

    with torch.cuda.device(x.device):
        _C.quantize_blockwise(
            x.data_ptr(), dtypes.value_code(x.dtype), 0, x.stride(0), q.data_ptr(), dtypes.value_code(q.dtype),
            scale.data_ptr(), 1, M, N, bm, bn, torch.cuda.current_stream(x.device).cuda_stream,
        )


def quantize_fp8_block_pow2(x: torch.Tensor, block_size: Sequence[int] = (128, 128)) -> Tuple[torch.Tensor, torch.Tensor]:
    """Blockwise e4m3fn with UE8M0 scales (DeepSeek-V3.1+ ``scale_fmt: ue8m0``): ``scale_inv =
    2^ceil(log2(amax / 448))`` a block (1.0 for an all-zero block), ``q = saturate(rne(x / scale_inv))``;
    the power of two is exact, so ``q * scale_inv`` loses only the FP8 rounding. 2-D, any device."""
    bm, bn = int_pair(block_size, "block_size")
    M, N = x.shape
    gr, gc = -(-M // bm), -(-N // bn)
    xp = torch.nn.functional.pad(x.to(torch.float32), (0, gc * bn - N, 0, gr * bm - M)).view(gr, bm, gc, bn)
    amax = xp.abs().amax(dim=(1, 3))
    e = torch.ceil(torch.log2(amax / 448.0)).clamp(-127, 127)
    scale = torch.where(amax > 0, torch.exp2(e), torch.ones_like(amax))
    q = (xp / scale[:, None, :, None]).clamp_(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q.view(gr * bm, gc * bn)[:M, :N].contiguous(), scale


def transcode_fp4_e8m0_to_fp8_block(values: torch.Tensor, exponents: torch.Tensor,
                                    block_size: Sequence[int] = (128, 128)) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """MXFP4 / FP4-with-E8M0 → 128x128 block e4m3fn without rounding where possible: a block's scale
    is its largest sub-scale / 2^6, every FP4 value times its sub-scale over that is exact in E4M3
    while the block's sub-scale exponents span at most 14. ``values``: the decoded E2M1 values
    (float32 [M, N]); ``exponents``: the E8M0 bytes of each 1x32 group ([M, ceil(N/32)]).
    Returns ``(q, scale_inv, blocks that were not exact)``."""
    bm, bn = int_pair(block_size, "block_size")
    if bn % 32:
        raise PyloaderInputError(f"block columns {bn} must be a multiple of the 32-value groups")
    M, N = values.shape
    gr, gc = -(-M // bm), -(-N // bn)
    e = exponents.view(torch.uint8).to(torch.int32)
    if (e == 255).any():
        raise PyloaderInputError("an E8M0 sub-scale is NaN (255): no FP8 block holds it")
    G = e.shape[1]
    ep = torch.nn.functional.pad(e, (0, gc * (bn // 32) - G, 0, gr * bm - M), value=0)
    emax = ep.view(gr, bm, gc, bn // 32).amax(dim=(1, 3))  # [gr, gc]
    scale = torch.exp2((emax - 127 - 6).to(torch.float32))  # exact powers of two (float32 subnormals included)
    rel = (e - emax.repeat_interleave(bm, 0)[:M].repeat_interleave(bn // 32, 1)[:, :G] + 6).to(torch.float32)
    factor = torch.exp2(rel).repeat_interleave(32, 1)[:, :N]
    target = values * factor  # what each value must be in units of the block scale
    q = target.to(torch.float8_e4m3fn)
    wrong = (q.to(torch.float32) != target)
    wp = torch.nn.functional.pad(wrong, (0, gc * bn - N, 0, gr * bm - M))
    nonexact = int(wp.view(gr, bm, gc, bn).any(dim=3).any(dim=1).sum())
    return q, scale, nonexact
