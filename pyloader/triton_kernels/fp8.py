"""Exact FP8 <-> fp32 conversions by bit manipulation, for GPUs whose Triton cannot cast e4m3fn
(sm_80/sm_86) and for the interpreter. Both directions are exact / round to nearest even."""

import triton
import triton.language as tl


@triton.jit
def e4m3_bits_to_float32(b):
    """uint8 e4m3fn bits -> fp32. |b| << 7 is an fp16 of value |x| * 2^-8 (subnormals included); 0x7F/0xFF are NaN."""
    b16 = b.to(tl.uint16)
    mag = ((b16 & 0x7F) << 7).to(tl.float16, bitcast=True).to(tl.float32) * 256.0
    mag = tl.where((b16 & 0x7F) == 0x7F, float("nan"), mag)
    # The sign goes in as a bit: Triton's unary minus is 0 - x, which turns -0.0 into +0.0.
    sign = (b16 & 0x80).to(tl.uint32) << 24
    return (mag.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def e5m2_bits_to_float32(b):
    """uint8 e5m2 bits -> fp32: an e5m2 byte is the top byte of an fp16."""
    return (b.to(tl.uint16) << 8).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def e2m1_bits_to_float32(n):
    """4-bit E2M1 code (int32 0..15) -> fp32: the 3-bit magnitude at fp16 bits 9..11 reads as the
    value times 2^-14 (code 1, 0.5, is the fp16 subnormal 2^-15); the sign goes in as a bit."""
    h = ((n & 7) << 9).to(tl.uint16)
    mag = h.to(tl.float16, bitcast=True).to(tl.float32) * 16384.0
    sign = (n & 8).to(tl.uint32) << 28
    return (mag.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def e8m0_bits_to_float32(e):
    """E8M0 exponent byte -> fp32 2^(e-127); e = 0 is the subnormal 2^-127, e = 255 is NaN."""
    e32 = e.to(tl.int32)
    bits = tl.where(e32 == 0, 0x00400000, e32 << 23)
    bits = tl.where(e32 == 255, 0x7FC00000, bits)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def float32_to_fp8_bits(v, E5M2: tl.constexpr):
    """fp32 (|v| <= fmax) -> e4m3fn/e5m2 bits, round to nearest even. Subnormals round through
    the fp32 adder ((t + 2^23) - 2^23); normals round the mantissa with the carry trick."""
    a = tl.abs(v)
    u = a.to(tl.uint32, bitcast=True)
    if E5M2:
        sub = (a * 65536.0 + 8388608.0) - 8388608.0
        norm = (u + 0xFFFFF + ((u >> 21) & 1)) >> 21
        bits = tl.where(a < 6.103515625e-05, sub.to(tl.uint32), norm - 448)
    else:
        sub = (a * 512.0 + 8388608.0) - 8388608.0
        norm = (u + 0x7FFFF + ((u >> 20) & 1)) >> 20
        bits = tl.where(a < 0.015625, sub.to(tl.uint32), norm - 960)
    sign = (v.to(tl.uint32, bitcast=True) >> 31) << 7
    return (bits | sign).to(tl.uint8)
