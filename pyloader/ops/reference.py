"""Pure-torch reference of every kernel: the test oracle, the benchmark baseline, the CPU path.

Numerics are the contract every backend must meet bit for bit on the GPU:

    out[..., i, j] = round_to_nearest_even(decode(w)[..., i, j] * S[..., (i + r0) // bm, (j + c0) // bn])

``decode``: float32 of the element, or of a packed 4-bit code (E2M1 value, or INT4 q - 8);
``S``: the block scale as float32, times or divided by a second-level float32 scale (NVFP4)
in one rounding (:func:`effective_scale`).

The dequant never materializes a full-size expanded scale: rows are processed in chunks, and
inside a chunk each run of columns that shares a scale column is scaled through a broadcast view.
"""

import threading
from typing import Optional, Tuple

import torch

from .. import dtypes

# Rows are processed in chunks of about this many elements with buffers reused across chunks:
# on CPUs, fresh large temporaries cost more in page faults than the arithmetic.
_CHUNK_ELEMS = {"cpu": 1 << 18, "cuda": 1 << 26}
_FLOAT32_OVERFLOW = 2.0 ** 128  # the smallest power of two above float32's largest value


def scale_to_float32(scale: torch.Tensor) -> torch.Tensor:
    """Decode a scale tensor to float32 (E8M0 typed or as raw uint8 exponents: 2^(e-127), 255 = NaN)."""
    if dtypes.is_e8m0(scale.dtype):
        e = scale.view(torch.uint8).to(torch.int32)
        bits = torch.where(e == 0, torch.full_like(e, 0x00400000), e << 23)  # e = 0: 2^-127, a subnormal
        bits = torch.where(e == 255, torch.full_like(e, 0x7FC00000), bits)
        return bits.view(torch.float32)
    return scale.to(torch.float32)


def effective_scale(scale: torch.Tensor, global_scale: Optional[torch.Tensor] = None, mode: str = "mul") -> torch.Tensor:
    """The float32 scale grid with a second-level scale applied: ``s * g`` (ModelOpt's
    weight_scale_2) or ``s / g`` (compressed-tensors' weight_global_scale), rounded once."""
    s = scale_to_float32(scale)
    if global_scale is None:
        return s
    g = global_scale.reshape(()).to(device=s.device, dtype=torch.float32)
    return s * g if mode == "mul" else s / g  # tensor / tensor: a true division, also on CUDA


def _pair_table(packing: str) -> torch.Tensor:
    """float32 [256, 2]: the two values of each packed byte, low nibble first."""
    lo = torch.arange(256) & 15
    hi = torch.arange(256) >> 4
    if packing == "e2m1":
        values = torch.tensor(dtypes.E2M1_VALUES, dtype=torch.float32)
        return torch.stack([values[lo], values[hi]], dim=1)
    return torch.stack([lo, hi], dim=1).to(torch.float32) - 8.0


_PAIR_TABLES = {}


def decode_packed(w: torch.Tensor, cols: int, packing: str, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """float32 [rows, cols] of a packed source (bytes [rows, >= ceil(cols / 2)], or int32 words).
    ``out``: a float32 [rows, 2 * bytes] buffer to decode into (its first ``cols`` columns are returned)."""
    wb = dtypes.as_packed_bytes(w)
    rows, nbytes = wb.shape
    key = (packing, wb.device)
    table = _PAIR_TABLES.get(key)
    if table is None:
        table = _PAIR_TABLES[key] = _pair_table(packing).to(wb.device)
    if out is None:
        out = torch.empty((rows, 2 * nbytes), dtype=torch.float32, device=wb.device)
    flat = out.view(rows * nbytes, 2)
    torch.index_select(table, 0, wb.reshape(-1).to(torch.int32), out=flat)
    return out[:, :cols]


def _column_runs(cols: int, c0: int, bn: int):
    """Yield (start, stop, scale_col, nblocks): runs of columns; a run of nblocks > 0 is a whole number of blocks."""
    j, sc = 0, c0 // bn
    head = min(cols, (bn - c0 % bn) % bn)
    if head:
        yield 0, head, sc, 0
        j, sc = head, sc + 1
    nfull = (cols - j) // bn
    if nfull:
        yield j, j + nfull * bn, sc, nfull
        j, sc = j + nfull * bn, sc + nfull
    if j < cols:
        yield j, cols, sc, 0


class _Fp8Decoder:
    """FP8 -> float32 by integer ops, several times faster on CPUs than torch's own FP8 cast
    (docs/decisions.md#cpu-dequant). ``factor``: the power of two still to apply.

    e4m3fn: the byte sign-extended to int32, times 2^20 (a shift left by 20), & 0x87F00000 is the
    float32 of x * 2^-120 (subnormal bytes become exact float32 subnormals), written into the
    float32 buffer itself. e5m2: the byte times 256 is the float16 of x (NaN and inf included),
    then one float16 -> float32 pass. e4m3fn's NaN bytes 0x7F/0xFF would read as finite values and
    are set to NaN where the tensor has any."""

    def __init__(self, weight: torch.Tensor, chunk_shape):
        self.e4m3 = weight.dtype == torch.float8_e4m3fn
        self.factor = 2.0 ** 120 if self.e4m3 else 1.0
        self.has_nan = None if weight.device.type == "cpu" else self.e4m3  # a check would wait for a GPU
        self.weight = weight
        if self.e4m3:
            self.bits = None  # decoded in the float32 output itself
        elif weight.device.type == "cpu":
            self.bits = _scratch(chunk_shape[0] * chunk_shape[1], torch.int16).view(chunk_shape)
        else:
            self.bits = torch.empty(chunk_shape, dtype=torch.int16, device=weight.device)

    def decode(self, w: torch.Tensor, out: torch.Tensor) -> None:
        """Write float32(w) * 2^-k into ``out`` (float32; w: rows of the tensor this decoder was made for)."""
        if not self.e4m3:
            bits = self.bits[: w.shape[0]]
            bits.copy_(w.view(torch.int8))
            bits.mul_(256)
            out.copy_(bits.view(torch.float16))
            return
        bits = out.view(torch.int32)
        bits.copy_(w.view(torch.int8))
        if self.has_nan is None:
            # NaN bytes are rare (none in real checkpoints): one check of the whole tensor spares a
            # mask a chunk. 0xFF is the largest uint8 and 0x7F the largest int8: two max reductions,
            # no temporary; after the first pass over the bytes, so the first chunk's are in cache.
            u = self.weight.view(torch.uint8)
            self.has_nan = int(u.max()) == 0xFF or int(u.view(torch.int8).max()) == 0x7F
        bits.mul_(1 << 20).bitwise_and_(0x87F00000 - (1 << 32))
        if self.has_nan:
            out.masked_fill_(torch.bitwise_and(w.view(torch.uint8), 0x7F).eq(0x7F), float("nan"))


# float32 chunk a thread: 1 MiB, inside a core's L2; smaller chunks pay each op's fixed cost more often
CPU_CHUNK_ELEMS_PER_THREAD = 1 << 18


_SCRATCH = threading.local()
_SCRATCH_MAX_BYTES = 64 << 20


def _scratch(n: int, dtype: torch.dtype) -> torch.Tensor:
    """A CPU buffer of this dtype reused call after call by this thread (a fresh one of tens of MB
    costs its page faults on every call: most of a small tensor's time); larger ones are not kept."""
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = {}
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < n:
        buf = torch.empty(n, dtype=dtype)
        if n * buf.element_size() <= _SCRATCH_MAX_BYTES:
            bufs[dtype] = buf
    return buf[:n]


def _mul_block_scales(wf: torch.Tensor, s: torch.Tensor, g0: int, bm: int, bn: int, runs) -> None:
    """wf[i, j] *= its block's scale, for rows g0.. of the block grid: the chunk's per-row scales
    ([rows, grid cols], small), then one op a column run, [rows, blocks, bn] by [rows, blocks, 1]
    (faster than broadcast views of the grid: docs/decisions.md#cpu-dequant)."""
    n = wf.shape[0]
    sr0, sr1 = g0 // bm, (g0 + n - 1) // bm + 1
    if (sr1 - sr0) * bm <= 2 * n:  # the scale rows repeated bm times, then sliced: one small copy
        per_row = s[sr0:sr1, None, :].expand(sr1 - sr0, bm, s.shape[1]).reshape(-1, s.shape[1])
        per_row = per_row[g0 - sr0 * bm:g0 - sr0 * bm + n]
    else:  # blocks much taller than the chunk: index its rows
        per_row = s.index_select(0, torch.arange(g0, g0 + n, device=s.device) // bm)
    for start, stop, sc, nblocks in runs:
        if nblocks:
            wf[:, start:stop].view(n, nblocks, bn).mul_(per_row[:, sc:sc + nblocks, None])
        else:
            wf[:, start:stop].mul_(per_row[:, sc:sc + 1])


def _abs_max(x: torch.Tensor) -> torch.Tensor:
    """max |x| as a float32 0-d tensor (NaN if any; 0 for an empty x)."""
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    lo, hi = torch.aminmax(x)  # one pass; on CPUs ~12x faster than vector_norm(inf) (a NaN stays)
    return torch.maximum(-lo, hi).abs().to(torch.float32)


def dequant_2d_torch(
    w: torch.Tensor, s: Optional[torch.Tensor], out: torch.Tensor, block_size: Tuple[int, int] = (1, 1),
    block_offset: Tuple[int, int] = (0, 0), packing: Optional[str] = None, amax: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """out[i, j] = rne(decode(w)[i, j] * s[(i + r0) // bm, (j + c0) // bn]) for 2-D w, out; s already
    float32 2-D, or None (decode and round only).

    w may be FP8 (decoded by integer ops), any float dtype, or packed 4-bit codes (``packing``;
    bytes or int32 words, half the columns). ``amax``: a float32 [2] gate slot raised to
    max |result before rounding| and max |decoded w|.
    """
    bm, bn = block_size
    r0, c0 = block_offset
    rows, cols = out.shape
    if rows == 0 or cols == 0:
        return out
    fp8 = packing is None and w.dtype in dtypes.FP8_WEIGHT_DTYPES
    on_cpu = w.device.type == "cpu" and out.device.type == "cpu" and (s is None or s.device.type == "cpu")
    runs = list(_column_runs(cols, c0, bn)) if s is not None else []
    width = cols
    if packing is not None:
        w = dtypes.as_packed_bytes(w)
        width = 2 * w.shape[1]  # decoded in whole bytes, then sliced to cols
    if on_cpu:
        # a chunk is split over torch's threads: each thread's part of the float32 buffer stays in its L2
        chunk_rows = max(1, min(rows, CPU_CHUNK_ELEMS_PER_THREAD * max(1, torch.get_num_threads()) // width))
        wf_buf = _scratch(chunk_rows * width, torch.float32).view(chunk_rows, width)
    else:
        chunk_rows = max(1, min(rows, _CHUNK_ELEMS.get(w.device.type, 1 << 20) // width))
        wf_buf = torch.empty((chunk_rows, width), dtype=torch.float32, device=w.device)
    decoder = _Fp8Decoder(w, (chunk_rows, cols)) if fp8 else None
    scale_data = False
    if s is not None and decoder is not None and decoder.factor != 1.0:
        # wf holds x * 2^-k: fold 2^k into the (small) scales; the product is the same real
        # number, so it rounds the same. Where a scale would overflow, the data is scaled instead.
        lo, hi = torch.aminmax(s)  # one op: small ops each pay a fixed cost near a data pass's
        limit = _FLOAT32_OVERFLOW / decoder.factor
        scale_data = not (float(hi) < limit and float(lo) > -limit)  # NaN: scale the data
        if not scale_data:
            s = s * decoder.factor
    if decoder is not None and s is None:
        scale_data = decoder.factor != 1.0  # no scale to fold the factor into
    maxima = []
    for i0 in range(0, rows, chunk_rows):
        i1 = min(rows, i0 + chunk_rows)
        if packing is not None:
            wf = decode_packed(w[i0:i1], cols, packing, wf_buf[: i1 - i0])
        elif decoder is None:
            wf = wf_buf[: i1 - i0]
            wf.copy_(w[i0:i1])
        else:
            wf = wf_buf[: i1 - i0]
            decoder.decode(w[i0:i1], wf)
            if scale_data:
                wf.mul_(decoder.factor)
        if amax is not None:
            src_max = _abs_max(wf)
            if decoder is not None and not scale_data:
                src_max = src_max * decoder.factor  # a power of two: exact
        if s is not None:
            _mul_block_scales(wf, s, i0 + r0, bm, bn, runs)
        if amax is not None:
            maxima.append(torch.stack([_abs_max(wf), src_max]))
        out[i0:i1].copy_(wf)
    if amax is not None:
        per_chunk = torch.stack(maxima).to(amax.device)
        new = torch.stack([per_chunk[:, 0].max(), per_chunk[:, 1].max()])
        amax.copy_(torch.maximum(amax, new))  # NaN propagates
    return out


def dequant_blockwise_torch(
    weight: torch.Tensor,
    scale: torch.Tensor,
    out: torch.Tensor,
    block_size: Tuple[int, int] = (128, 128),
    block_offset: Tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """Reference blockwise dequant of 2-D [M, N] or 3-D [E, M, N] weights into ``out`` (any strides)."""
    s = scale_to_float32(scale)
    if weight.dim() == 2:
        return dequant_2d_torch(weight, s, out, block_size, block_offset)
    for e in range(weight.shape[0]):
        dequant_2d_torch(weight[e], s[e], out[e], block_size, block_offset)
    return out


def cast_2d_torch(src: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Plain copy, or cast with one rounding to nearest even (every source value is exact in fp32)."""
    out.copy_(src)
    return out


def quantize_blockwise_torch(
    x: torch.Tensor, block_size: Tuple[int, int] = (128, 128), dtype: torch.dtype = torch.float8_e4m3fn,
    scale_fmt: str = "float",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-recipe blockwise quantization of [M, N] or [E, M, N]: returns (q, scale_inv) with

    scale_inv[b] = amax(|x| over block b) / fmax (1.0 for an all-zero block, so it stays finite),
    or with ``scale_fmt="ue8m0"`` the least power of two >= amax / 448 (exponent clamped to
    [-127, 127]), q = saturate(rne(float32(x) / scale_inv)); ragged edge blocks are padded with zeros.
    """
    fmax = dtypes.FP8_MAX[dtype]
    squeeze = x.dim() == 2
    xs = x.unsqueeze(0) if squeeze else x
    E, M, N = xs.shape
    bm, bn = block_size
    gr, gc = -(-M // bm), -(-N // bn)
    xp = torch.nn.functional.pad(xs.to(torch.float32), (0, gc * bn - N, 0, gr * bm - M))
    blocks = xp.view(E, gr, bm, gc, bn)
    amax = blocks.abs().amax(dim=(2, 4))
    # Tensor / tensor: torch on CUDA turns division by a Python scalar into a reciprocal multiply.
    y = amax / torch.full_like(amax, fmax)
    if scale_fmt == "ue8m0":
        m, ex = torch.frexp(y)  # y = m * 2^ex, m in [0.5, 1): the least 2^e >= y, exactly (no log2 rounding)
        e = torch.where(m == 0.5, ex - 1, ex).clamp(-127, 127).to(torch.int32)
        # 2^e from its bits (exact on every device): biased exponent, or 2^-127 as the subnormal 2^22 ulp
        y = torch.where(e >= -126, (e + 127) << 23, torch.full_like(e, 1 << 22)).view(torch.float32)
    scale = torch.where(amax > 0, y, torch.ones_like(amax))
    q = (blocks / scale[:, :, None, :, None]).clamp_(-fmax, fmax).to(dtype)
    q = q.view(E, gr * bm, gc * bn)[:, :M, :N].contiguous()
    if squeeze:
        return q[0], scale[0]
    return q, scale


def dequant_reference_float64(weight: torch.Tensor, scale: torch.Tensor, block_size, block_offset=(0, 0)) -> torch.Tensor:
    """Independent float64 formula with a fully expanded scale (tests only: slow, exact product)."""
    s = scale_to_float32(scale).to(torch.float64)
    bm, bn = block_size
    r0, c0 = block_offset
    M, N = weight.shape[-2:]
    ri = (torch.arange(M) + r0) // bm
    ci = (torch.arange(N) + c0) // bn
    expanded = s[..., ri, :][..., :, ci]
    return weight.to(torch.float64) * expanded


def dequant_expanded_scales_torch(weight: torch.Tensor, scale: torch.Tensor, block_size, out_dtype=torch.bfloat16,
                                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The common engine path (transformers-style): repeat_interleave the scale to full size, multiply.

    A benchmark baseline only; 2-D, no offsets.
    """
    bm, bn = block_size
    M, N = weight.shape
    s = scale_to_float32(scale).repeat_interleave(bm, 0).repeat_interleave(bn, 1)[:M, :N]
    res = (weight.to(torch.float32) * s).to(out_dtype)
    if out is not None:
        out.copy_(res)
        return out
    return res
