"""Dtypes, named once: the kernels' dtype codes (shared with csrc/include/pyloader/job_table.h), the
safetensors dtype names with their sizes and torch equivalents, and which of them are FP8."""

from typing import Dict, Optional, Tuple

import torch

from .errors import PyloaderInputError

NONE, BYTE, E4M3, E5M2, BF16, F16, F32, E8M0, E2M1, I4 = range(10)

_E8M0_TORCH = getattr(torch, "float8_e8m0fnu", None)

FP8_WEIGHT_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FLOAT_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# uint8 scales are raw E8M0 exponents (MX formats, MiniMax, gpt-oss *_scales); float8_e4m3fn
# scales are NVFP4's per-16 scales.
SCALE_DTYPES = ((torch.float32, torch.bfloat16, torch.float16, torch.uint8, torch.float8_e4m3fn)
                + ((_E8M0_TORCH,) if _E8M0_TORCH else ()))

# Packed 4-bit sources: two values a byte, the low nibble first (the even column). "e2m1" is FP4
# (MXFP4, NVFP4, DeepSeek-V4 experts; U8 or I8 storage); "int4" is signed INT4 stored as q + 8
# (compressed-tensors pack-quantized, I32 words, least significant nibble first: on a
# little-endian machine the same byte order).
PACKINGS = {"e2m1": E2M1, "int4": I4}
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
PACKED_STORAGE = (torch.uint8, torch.int8, torch.int32)

# The second-level scale of NVFP4: ModelOpt's weight_scale_2 multiplies the block scale,
# compressed-tensors' weight_global_scale divides it.
GLOBAL_MODES = {"mul": 1, "div": 2}


def as_packed_bytes(src: torch.Tensor) -> torch.Tensor:
    """A packed source as bytes: uint8/int8 as they are, int32 words as their 4 bytes (little-endian)."""
    if src.dtype == torch.uint8:
        return src
    if src.dtype in (torch.int8, torch.int32):
        if src.dim() and src.shape[-1] > 1 and src.stride(-1) != 1:
            raise PyloaderInputError(f"a packed source needs unit stride along its last dimension, got strides {src.stride()}")
        return src.view(torch.uint8)
    raise PyloaderInputError(f"a packed source must be uint8, int8 or int32, got {src.dtype}")

VALUE_CODES = {
    torch.float8_e4m3fn: E4M3,
    torch.float8_e5m2: E5M2,
    torch.bfloat16: BF16,
    torch.float16: F16,
    torch.float32: F32,
}

FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def value_code(dtype: torch.dtype) -> int:
    """Code of a weight/output dtype the transform converts; raises for others."""
    try:
        return VALUE_CODES[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype}") from None


def scale_code(dtype: torch.dtype) -> int:
    if dtype == torch.uint8 or (_E8M0_TORCH is not None and dtype == _E8M0_TORCH):
        return E8M0
    if dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn):
        return VALUE_CODES[dtype]
    raise ValueError(
        f"unsupported scale dtype {dtype}; expected float32, bfloat16, float16, float8_e4m3fn, float8_e8m0fnu "
        f"or uint8 (E8M0 exponents)"
    )


def is_e8m0(dtype: torch.dtype) -> bool:
    return dtype == torch.uint8 or (_E8M0_TORCH is not None and dtype == _E8M0_TORCH)


# safetensors dtype name → (bits per element, torch dtype or None where torch has none).
DTYPES: Dict[str, Tuple[int, Optional[torch.dtype]]] = {
    "BOOL": (8, torch.bool), "U8": (8, torch.uint8), "I8": (8, torch.int8),
    "I16": (16, torch.int16), "U16": (16, getattr(torch, "uint16", None)), "F16": (16, torch.float16),
    "BF16": (16, torch.bfloat16), "I32": (32, torch.int32), "U32": (32, getattr(torch, "uint32", None)),
    "F32": (32, torch.float32), "F64": (64, torch.float64), "I64": (64, torch.int64),
    "U64": (64, getattr(torch, "uint64", None)), "C64": (64, torch.complex64),
    "F8_E4M3": (8, torch.float8_e4m3fn), "F8_E5M2": (8, torch.float8_e5m2),
    "F8_E8M0": (8, getattr(torch, "float8_e8m0fnu", None)),
    "F4": (4, None), "F6_E2M3": (6, None), "F6_E3M2": (6, None),
}
TORCH_TO_SAFETENSORS = {t: name for name, (_, t) in DTYPES.items() if t is not None}
FP8_SAFETENSORS = tuple(name for name, (_, t) in DTYPES.items() if t in FP8_WEIGHT_DTYPES)  # as safetensors names them
