"""Dtype codes shared with csrc/pyloader.h, and the dtype facts the ops need."""

import torch

NONE, BYTE, E4M3, E5M2, BF16, F16, F32, E8M0 = range(8)

_E8M0_TORCH = getattr(torch, "float8_e8m0fnu", None)

FP8_WEIGHT_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FLOAT_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# uint8 scales are raw E8M0 exponents (MX formats, MiniMax, gpt-oss *_scales).
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.uint8) + ((_E8M0_TORCH,) if _E8M0_TORCH else ())

_VALUE_CODES = {
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
        return _VALUE_CODES[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype}") from None


def scale_code(dtype: torch.dtype) -> int:
    if dtype == torch.uint8 or (_E8M0_TORCH is not None and dtype == _E8M0_TORCH):
        return E8M0
    if dtype in (torch.float32, torch.bfloat16, torch.float16):
        return _VALUE_CODES[dtype]
    raise ValueError(
        f"unsupported scale dtype {dtype}; expected float32, bfloat16, float16, float8_e8m0fnu or uint8 (E8M0 exponents)"
    )


def is_e8m0(dtype: torch.dtype) -> bool:
    return dtype == torch.uint8 or (_E8M0_TORCH is not None and dtype == _E8M0_TORCH)
