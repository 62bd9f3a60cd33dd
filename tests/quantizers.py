"""The tests' own quantizers for every format of the formats table, and the independent numpy
float32 formula the dequantized values are checked against (no pyloader code on either side)."""

import numpy as np
import torch

E2M1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32)
E8M0 = getattr(torch, "float8_e8m0fnu", None)


def e4m3_value(b: np.ndarray) -> np.ndarray:
    """float32 of E4M3 (fn) bytes from the format's fields: bias 7, subnormals m/8 * 2^-6, 0x7F/0xFF NaN."""
    b = b.astype(np.int64)
    sign = np.where(b & 0x80, -1.0, 1.0)
    e, m = (b >> 3) & 15, b & 7
    mag = np.where(e == 0, m / 8.0 * 2.0 ** -6, (1 + m / 8.0) * 2.0 ** (e - 7))
    return np.where((b & 0x7F) == 0x7F, np.nan, sign * mag).astype(np.float32)


def scale_value(s: torch.Tensor) -> np.ndarray:
    if s.dtype == torch.uint8 or (E8M0 is not None and s.dtype == E8M0):
        e = s.view(torch.uint8).numpy().astype(np.int64)
        return np.where(e == 255, np.nan, np.ldexp(1.0, e - 127)).astype(np.float32)
    if s.dtype == torch.float8_e4m3fn:
        return e4m3_value(s.view(torch.uint8).numpy())
    return s.to(torch.float64).numpy().astype(np.float32)  # bf16/f16/f32 widen exactly


def codes_of(w: torch.Tensor, cols: int) -> np.ndarray:
    b = w.contiguous().view(torch.uint8).numpy().astype(np.int64)
    return np.stack([b & 15, b >> 4], axis=-1).reshape(*b.shape[:-1], -1)[..., :cols]


def formula(w, cols, packing, scale, block, offset=(0, 0), g=None, mode="mul", out_dtype=torch.bfloat16):
    """rne(decode(w) * S) in numpy float32 for packed ("e2m1", "int4") or FP8 (packing None)
    values; S = the block scale (* or / g, one float32 rounding)."""
    if packing is None:
        vals = e4m3_value(w.view(torch.uint8).numpy()) if w.dtype == torch.float8_e4m3fn else \
            w.to(torch.float32).numpy()
    else:
        codes = codes_of(w, cols)
        vals = E2M1[codes] if packing == "e2m1" else (codes - 8).astype(np.float32)
    with np.errstate(all="ignore"):
        if scale is None:
            v = vals
        else:
            s = scale_value(scale)
            if g is not None:
                gv = np.float32(g.item())
                s = (s * gv if mode == "mul" else s / gv).astype(np.float32)
            rows = vals.shape[-2]
            ri = (np.arange(rows) + offset[0]) // block[0]
            ci = (np.arange(vals.shape[-1]) + offset[1]) // block[1]
            v = vals * s[..., ri, :][..., :, ci]
    return torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)).to(out_dtype)


def _nearest_e2m1(x: np.ndarray) -> np.ndarray:
    """Codes of the E2M1 values nearest x (ties to the lower code)."""
    return np.abs(x[..., None] - E2M1[None, :]).argmin(-1)


def pack_nibbles(codes: np.ndarray) -> torch.Tensor:
    """[..., K] codes 0..15 → uint8 [..., ceil(K/2)], low nibble = even column."""
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (1,), dtype=codes.dtype)], -1)
    c = codes.astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(c[..., 0::2] | (c[..., 1::2] << 4)))


def quantize_fp4_e8m0(x: torch.Tensor, group: int = 32, int8: bool = False):
    """MX-style FP4: E8M0 scale per group (2^ceil(log2(amax / 6))), codes nearest x / scale.
    Returns (U8 or I8 [N, K/2], U8 exponents [N, K/group])."""
    a = x.float().numpy()
    N, K = a.shape
    g = a.reshape(N, K // group, group)
    amax = np.abs(g).max(-1)
    e = np.clip(np.ceil(np.log2(np.maximum(amax, 1e-30) / 6.0)), -127, 127).astype(np.int64) + 127
    s = np.ldexp(1.0, e - 127)
    codes = _nearest_e2m1(g / s[..., None]).reshape(N, K)
    w = pack_nibbles(codes)
    return (w.view(torch.int8) if int8 else w), torch.from_numpy(e.astype(np.uint8))


def quantize_nvfp4(x: torch.Tensor, divisor: bool = False):
    """NVFP4: E4M3 per-16 scales and an F32 second level (ModelOpt multiplier, or its
    compressed-tensors divisor). Returns (U8 [N, K/2], E4M3 [N, K/16], F32 [1])."""
    a = x.float().numpy()
    N, K = a.shape
    g2 = float(np.abs(a).max()) / (448.0 * 6.0) or 1.0
    grp = a.reshape(N, K // 16, 16)
    s = torch.from_numpy((np.abs(grp).max(-1) / 6.0 / g2).astype(np.float32)).to(torch.float8_e4m3fn)
    sv = scale_value(s).astype(np.float32) * np.float32(g2)
    codes = _nearest_e2m1(grp / np.where(sv == 0, 1, sv)[..., None]).reshape(N, K)
    gs = torch.tensor([1.0 / g2 if divisor else g2], dtype=torch.float32)
    return pack_nibbles(codes), s, gs


def quantize_int4(x: torch.Tensor, group: int = 32):
    """compressed-tensors pack-quantized W4A16: BF16 scale per group (amax / 7), q = round(x / s)
    in -8..7, stored as q + 8, eight a little-endian int32 word (least significant nibble first).
    Returns (I32 [N, ceil(K/8)], BF16 [N, ceil(K/group)], I32 weight_shape [2])."""
    a = x.float().numpy()
    N, K = a.shape
    G = -(-K // group)
    pad = np.zeros((N, G * group), dtype=np.float32)
    pad[:, :K] = a
    s = torch.from_numpy((np.abs(pad.reshape(N, G, group)).max(-1) / 7.0 + 1e-8).astype(np.float32)).to(torch.bfloat16)
    sv = s.float().numpy()
    q = np.clip(np.rint(pad.reshape(N, G, group) / sv[..., None]), -8, 7).reshape(N, -1)[:, :K].astype(np.int64) + 8
    words = -(-K // 8)
    qq = np.full((N, words * 8), 8, dtype=np.int64)
    qq[:, :K] = q
    packed = (qq.reshape(N, words, 8) << (4 * np.arange(8))).sum(-1)
    packed = np.where(packed >= 2 ** 31, packed - 2 ** 32, packed).astype(np.int32)
    return torch.from_numpy(packed), s, torch.tensor([N, K], dtype=torch.int32)


def quantize_fp8(x: torch.Tensor, block=(128, 128), scale_dtype=torch.float32, e8m0: bool = False):
    """Block FP8 (DeepSeek recipe; ``e8m0``: power-of-two scales stored as F8_E8M0, DeepSeek-V4,
    or U8 for MX groups). Returns (F8_E4M3 weight, scale grid)."""
    a = x.float()
    N, K = a.shape
    bm, bn = block
    gr, gc = -(-N // bm), -(-K // bn)
    pad = torch.nn.functional.pad(a, (0, gc * bn - K, 0, gr * bm - N))
    amax = pad.view(gr, bm, gc, bn).abs().amax(dim=(1, 3))
    s = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    if e8m0:
        e = torch.clamp(torch.ceil(torch.log2(s)), -127, 127) + 127
        s = torch.pow(2.0, e - 127)
    q = (pad.view(gr, bm, gc, bn) / s[:, None, :, None]).clamp(-448, 448).view(gr * bm, gc * bn)[:N, :K]
    q = q.contiguous().to(torch.float8_e4m3fn)
    if e8m0:
        exps = e.to(torch.uint8)
        return q, (exps.view(E8M0) if E8M0 is not None and scale_dtype != torch.uint8 else exps)
    return q, s.to(scale_dtype)


def quantize_ct(w: torch.Tensor, fmt: str):
    """One weight as compressed-tensors stores it: ``"int4"`` (pack-quantized, group 32) or
    ``"nvfp4"`` (nvfp4-pack-quantized, divisor form). Returns ``({suffix: tensor}, the dequantized
    values by the independent formula)``; suffixes replace the weight's ``weight``."""
    if fmt == "int4":
        q, s, ws = quantize_int4(w.float())
        return {"weight_packed": q, "weight_scale": s, "weight_shape": ws}, formula(q, w.shape[1], "int4", s, (1, 32))
    q, s, g = quantize_nvfp4(w.float(), divisor=True)
    return ({"weight_packed": q, "weight_scale": s, "weight_global_scale": g},
            formula(q, w.shape[1], "e2m1", s, (1, 16), g=g, mode="div"))
