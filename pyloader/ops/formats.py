"""One quantized tensor of each format into a caller-owned destination (formats the block-FP8
``dequant_blockwise`` does not cover): FP4 (E2M1) with per-group scales (DeepSeek-V4 experts,
MXFP4, NVFP4 in both of its second-level forms) and INT4 pack-quantized (compressed-tensors W4A16).

    out = pyloader.ops.dequant_fp4(w, s, group_size=32)                  # DeepSeek-V4 expert, E8M0 scales
    out = pyloader.ops.dequant_mxfp4(blocks, scales)                     # gpt-oss [E, N, G, 16] / [E, N, G]
    out = pyloader.ops.dequant_nvfp4(w, s, s2, form="modelopt")          # weight_scale_2 multiplies
    out = pyloader.ops.dequant_int4(packed, s, cols=K, group_size=32)    # weight_shape [N, K]

Every value is ``rne(decode(code) * S)`` with ``S`` the group's scale as float32 (times or divided
by the second-level scale, rounded once): the contract of :mod:`pyloader.ops.reference`.
"""

from typing import Optional, Sequence

import torch

from .. import dtypes
from ..backend import resolve_backend
from ..errors import PyloaderInputError
from .dequant import int_pair
from .jobs import TransformJob, run_jobs


def _check_group_scale(scale: torch.Tensor, lead, rows: int, cols: int, block, offset, what: str) -> None:
    bm, bn = block
    r0, c0 = offset
    need = tuple(lead) + (-(-(r0 + rows) // bm), -(-(c0 + cols) // bn))
    shape = tuple(scale.shape)
    # exact for a whole tensor (a per-16 grid given for per-32 groups is an error); with an offset
    # the grid is the whole tensor's and may extend past the slice
    sliced = (r0 or c0) and len(shape) == len(need) and shape[:-2] == need[:-2] and all(
        a >= b for a, b in zip(shape[-2:], need[-2:]))
    if shape != need and not sliced:
        raise PyloaderInputError(
            f"{what}: scale shape {shape} does not fit {rows}x{cols} values with groups of {bm}x{bn}"
            f"{f' from offset {offset}' if r0 or c0 else ''}: expected {need}")
    if scale.dtype not in dtypes.SCALE_DTYPES:
        raise PyloaderInputError(f"{what}: unsupported scale dtype {scale.dtype}")


def dequant_packed(
    weight: torch.Tensor,
    scale: Optional[torch.Tensor],
    packing: str,
    cols: Optional[int] = None,
    block_size: Sequence[int] = (1, 32),
    global_scale: Optional[torch.Tensor] = None,
    global_mode: str = "mul",
    out: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.bfloat16,
    backend: Optional[str] = None,
    block_offset: Sequence[int] = (0, 0),
    amax: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Dequantize a packed 4-bit weight ``[..., N, bytes]`` (uint8/int8, or int32 words) into
    ``out [..., N, cols]``: ``packing`` ``"e2m1"`` or ``"int4"``; ``scale`` the group grid
    ``[..., ceil(N/bm), ceil(cols/bn)]`` of the whole tensor the weight was sliced from (see
    ``block_offset``); ``global_scale``: a float32 scalar applied to every group scale
    (``global_mode`` ``"mul"`` or ``"div"``). ``cols`` defaults to two values a byte.
    ``amax``: a float32 ``[2]`` gate slot (max |result|, max |code value|), one for all experts."""
    if packing not in dtypes.PACKINGS:
        raise PyloaderInputError(f"unknown packing {packing!r}; expected one of {sorted(dtypes.PACKINGS)}")
    if weight.dtype not in dtypes.PACKED_STORAGE:
        raise PyloaderInputError(f"packed {packing} weight must be uint8, int8 or int32, got {weight.dtype}")
    if weight.dim() not in (2, 3):
        raise PyloaderInputError(f"weight must be 2-D [N, packed] or 3-D [E, N, packed], got shape {tuple(weight.shape)}")
    wb = dtypes.as_packed_bytes(weight)
    lead, rows = tuple(wb.shape[:-2]), wb.shape[-2]
    if cols is None:
        cols = 2 * wb.shape[-1]
    block = int_pair(block_size, "block_size")
    offset = int_pair(block_offset, "block_offset")
    if block[0] <= 0 or block[1] <= 0 or offset[0] < 0 or offset[1] < 0:
        raise PyloaderInputError(f"block_size {block} must be positive and block_offset {offset} non-negative")
    if scale is not None:
        _check_group_scale(scale, lead, rows, cols, block, offset, f"{packing} weight {tuple(weight.shape)}")
        if scale.device != weight.device:
            raise PyloaderInputError(f"scale is on {scale.device}, weight on {weight.device}")
    elif global_scale is not None:
        raise PyloaderInputError("a second-level scale needs a group scale")
    if global_scale is not None:
        global_scale = global_scale.reshape(1)
    shape = lead + (rows, cols)
    if out is None:
        if out_dtype not in dtypes.FLOAT_OUT_DTYPES:
            raise PyloaderInputError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
        out = torch.empty(shape, dtype=out_dtype, device=weight.device)
    elif tuple(out.shape) != shape:
        raise PyloaderInputError(f"out shape {tuple(out.shape)} != {shape} ({packing} weight {tuple(weight.shape)})")
    if out.numel() == 0:
        return out
    chosen = resolve_backend(backend, weight.device, f"dequant_{packing}")
    if weight.dim() == 2:
        jobs = [TransformJob(weight, out, scale, block, offset, packing, global_scale, global_mode, amax)]
    else:
        jobs = [TransformJob(weight[e], out[e], None if scale is None else scale[e], block, offset, packing,
                             global_scale, global_mode, amax) for e in range(weight.shape[0])]
    for i, job in enumerate(jobs):
        job.validate(i)
    run_jobs(jobs, chosen)
    return out


def dequant_fp4(weight: torch.Tensor, scale: torch.Tensor, group_size: int = 32, **kw) -> torch.Tensor:
    """FP4 (E2M1, two codes a byte, low nibble = even column) with one scale per ``group_size``
    columns: DeepSeek-V4 routed experts (I8 ``[N, K/2]``, E8M0 ``[N, K/32]``), MXFP4 (group 32,
    E8M0 as uint8), NVFP4 (group 16, float8_e4m3fn scales; see :func:`dequant_nvfp4`)."""
    return dequant_packed(weight, scale, "e2m1", block_size=(1, group_size), **kw)


def dequant_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, **kw) -> torch.Tensor:
    """gpt-oss MXFP4: ``*_blocks`` uint8 ``[..., N, G, 16]`` and ``*_scales`` uint8 E8M0 ``[..., N, G]``
    into ``[..., N, 32 G]``."""
    if blocks.dim() < 3 or blocks.shape[-1] != 16 or tuple(scales.shape) != tuple(blocks.shape[:-1]):
        raise PyloaderInputError(
            f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)}: expected [..., N, G, 16] and [..., N, G]")
    flat = blocks.reshape(*blocks.shape[:-2], blocks.shape[-2] * 16)
    return dequant_packed(flat, scales, "e2m1", block_size=(1, 32), **kw)


def dequant_nvfp4(weight: torch.Tensor, weight_scale: torch.Tensor, global_scale: torch.Tensor,
                  form: str = "modelopt", **kw) -> torch.Tensor:
    """NVFP4: E2M1 ``[N, K/2]``, float8_e4m3fn scales ``[N, K/16]`` and a float32 second-level scale:
    ModelOpt's ``weight_scale_2`` multiplies (``form="modelopt"``), compressed-tensors'
    ``weight_global_scale`` divides (``form="compressed-tensors"``)."""
    modes = {"modelopt": "mul", "compressed-tensors": "div"}
    if form not in modes:
        raise PyloaderInputError(f"NVFP4 form must be 'modelopt' or 'compressed-tensors', got {form!r}")
    if global_scale.dtype != torch.float32:
        raise PyloaderInputError(f"NVFP4 second-level scale must be float32, got {global_scale.dtype}")
    return dequant_packed(weight, weight_scale, "e2m1", block_size=(1, 16), global_scale=global_scale,
                          global_mode=modes[form], **kw)


def dequant_int4(weight_packed: torch.Tensor, scale: torch.Tensor, cols: Optional[int] = None, group_size: int = 32,
                 **kw) -> torch.Tensor:
    """compressed-tensors pack-quantized INT4 (W4A16): int32 ``[N, ceil(K/8)]`` (eight values a word,
    least significant nibble first, stored as q + 8) with ``[N, ceil(K/group)]`` scales; ``cols``: K
    from ``weight_shape`` (default 8 a word)."""
    if weight_packed.dtype != torch.int32:
        raise PyloaderInputError(f"INT4 pack-quantized weight must be int32, got {weight_packed.dtype}")
    if cols is None:
        cols = 8 * weight_packed.shape[-1]
    return dequant_packed(weight_packed, scale, "int4", cols=cols, block_size=(1, group_size), **kw)
