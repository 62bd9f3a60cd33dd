"""Pure-torch reference of every kernel: the test oracle, the benchmark baseline, the CPU path.

Numerics are the contract every backend must meet bit for bit on the GPU:

    out[..., i, j] = round_to_nearest_even(float32(w[..., i, j]) * float32(s[..., (i + r0) // bm, (j + c0) // bn]))

The dequant never materializes a full-size expanded scale: rows are processed in chunks, and
inside a chunk each run of columns that shares a scale column is scaled through a broadcast view.
"""

import threading
from typing import Optional, Tuple

import torch

from . import _dtypes

# Rows are processed in chunks of about this many elements with buffers reused across chunks:
# on CPUs, fresh large temporaries cost more in page faults than the arithmetic.
_CHUNK_ELEMS = {"cpu": 1 << 18, "cuda": 1 << 26}
_FLOAT32_OVERFLOW = 2.0 ** 128  # the smallest power of two above float32's largest value


def scale_to_float32(scale: torch.Tensor) -> torch.Tensor:
    """Decode a scale tensor to float32 (E8M0 typed or as raw uint8 exponents: 2^(e-127), 255 = NaN)."""
    if _dtypes.is_e8m0(scale.dtype):
        e = scale.view(torch.uint8).to(torch.int32)
        bits = torch.where(e == 0, torch.full_like(e, 0x00400000), e << 23)  # e = 0: 2^-127, a subnormal
        bits = torch.where(e == 255, torch.full_like(e, 0x7FC00000), bits)
        return bits.view(torch.float32)
    return scale.to(torch.float32)


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
    """FP8 -> float32 by integer ops (torch's own FP8 -> float32 cast took 13x as long as an
    fp16 -> float32 pass on the AVX512 host, several times these passes in all). ``factor``: the
    power of two still to apply. The shifts below are multiplies of the sign-extended byte (no
    product leaves its integer type): torch's int16 multiply ran 0.15-0.22 ms over [576, 7168]
    where its shift ran 0.20-0.30 on the AVX512 host (bench/NOTES.md, session 9).

    int16 (``bits`` 16, a reused int16 buffer, then an fp16 -> float32 pass): e4m3fn, the byte
    sign-extended and shifted left by 7 has the sign in bit 15 and exponent and mantissa in bits
    13..7; with bit 14 cleared (& 0xBF80) it is an fp16 of value x * 2^-8, exact for subnormals
    too. e5m2: the byte shifted left by 8 is an fp16 of x (NaN and inf included).
    int32 (``bits`` 32, e4m3fn only): shifted left by 20, & 0x87F00000, straight into the float32
    buffer: x * 2^-120. No int16 buffer and no fp16 pass; but the 14 subnormal bytes become float32
    subnormals, which the scale multiply takes slowly (every byte value equally often: 27-35 %
    slower than int16; blockwise-quantized weights have about one in 10^4).
    Both: the NaN bytes 0x7F/0xFF would read as finite values and are set to NaN where the tensor
    has any."""

    def __init__(self, weight: torch.Tensor, chunk_shape, bits: int = 16):
        self.e4m3 = weight.dtype == torch.float8_e4m3fn
        self.int32 = bits == 32 and self.e4m3
        self.factor = 2.0 ** 120 if self.int32 else 256.0 if self.e4m3 else 1.0
        self.has_nan = None if weight.device.type == "cpu" else self.e4m3  # a check would wait for a GPU
        self.weight = weight
        if self.int32:
            self.bits = None  # decoded in the float32 output itself
        elif weight.device.type == "cpu":
            self.bits = _scratch(chunk_shape[0] * chunk_shape[1], torch.int16).view(chunk_shape)
        else:
            self.bits = torch.empty(chunk_shape, dtype=torch.int16, device=weight.device)

    def decode(self, w: torch.Tensor, out: torch.Tensor) -> None:
        """Write float32(w) * 2^-k into ``out`` (float32; w: rows of the tensor this decoder was made for)."""
        bits = out.view(torch.int32) if self.int32 else self.bits[: w.shape[0]]
        bits.copy_(w.view(torch.int8))
        if not self.e4m3:
            bits.mul_(256)
            out.copy_(bits.view(torch.float16))
            return
        if self.has_nan is None:
            # NaN bytes are rare (none in real checkpoints): one check of the whole tensor spares a
            # mask a chunk. 0xFF is the largest uint8 and 0x7F the largest int8: two max reductions,
            # no temporary (eq and any over bytes are several times slower on CPUs); after the first
            # pass over the bytes, so the first chunk's are in cache.
            u = self.weight.view(torch.uint8)
            self.has_nan = int(u.max()) == 0xFF or int(u.view(torch.int8).max()) == 0x7F
        if self.int32:
            bits.mul_(1 << 20).bitwise_and_(0x87F00000 - (1 << 32))
        else:
            bits.mul_(128).bitwise_and_(0xBF80 - 0x10000)
            out.copy_(bits.view(torch.float16))
        if self.has_nan:
            out.masked_fill_(torch.bitwise_and(w.view(torch.uint8), 0x7F).eq(0x7F), float("nan"))


_FP8_LUT = {}
_TAKE_MIN_THREADS = 8
# float32 chunk of the cast and decode paths, a thread: 1 MiB, inside a 2 MiB L2 (Sapphire Rapids);
# on the 2-core CI machine 256-512K ran 2.4 ms for [576, 7168] against 5.3 at 64K and 14.8 at 16K
# (each chunk pays its ops' fixed cost)
_CPU_CHUNK_ELEMS_PER_THREAD = 1 << 18
CPU_FP8_METHODS = ("table", "cast", "decode", "decode_int32")
_CPU_FP8_METHOD = "auto"  # or one of CPU_FP8_METHODS (tests and bench/bench_dequant.py --cpu set it)
_PER_SCALE_ROW_MIN = 1 << 19  # elements of a scale row above which its offsets are a broadcast row


def cpu_fp8_method() -> str:
    """How the CPU reference turns FP8 into scaled values. All are bit-identical (float32 product,
    one rounding); they differ in speed (bench/NOTES.md, sessions 8 and 9): ``table`` (rounded
    products of a block's 256 bytes, one index add and one gather an element), ``cast`` (torch's
    FP8 -> float32 cast, then the scales, then the rounding; that cast is the slow part on both
    hosts measured), ``decode`` (integer decoding in int16 passes; 1.7-2.9x as fast as either),
    ``decode_int32`` (e4m3fn decoded straight into float32 bits, see _Fp8Decoder)."""
    return "decode_int32" if _CPU_FP8_METHOD == "auto" else _CPU_FP8_METHOD


def _fp8_values(dtype: torch.dtype) -> torch.Tensor:
    """float32 value of each of the 256 FP8 bytes (NaN bytes as the decoder writes them)."""
    if dtype not in _FP8_LUT:
        b = torch.arange(256, dtype=torch.uint8).view(dtype).view(256, 1)
        f = torch.empty(256, 1, dtype=torch.float32)
        decoder = _Fp8Decoder(b, (256, 1))
        decoder.decode(b, f)
        _FP8_LUT[dtype] = (f * decoder.factor).view(256)  # x * 2^-k * 2^k: exact
    return _FP8_LUT[dtype]


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


def _add_table_offsets(idx, wu, a0: int, b0: int, r0: int, bm: int, sr: int, colbase, stride: int) -> None:
    """idx[rows a0..b0] = byte + offset of its block's table (``colbase`` a row of column offsets,
    ``stride`` entries a scale row). A run of whole blocks is one add over ``[k, bm, cols]`` with a
    ``[k, 1, cols]`` offset: one pass over the bytes, where an add per scale row was k passes of
    a few thousand elements a thread, each paying its own fork and join on a many-core host."""
    a = a0
    while a < b0:
        rel = (a + r0) // bm - sr
        k = (b0 - a) // bm
        if (a + r0) % bm == 0 and k >= 2:
            offs = (torch.arange(rel, rel + k, dtype=colbase.dtype) * stride).view(k, 1, 1) + colbase
            rows = slice(a, a + k * bm)
            torch.add(wu[rows].unflatten(0, (k, bm)), offs,
                      out=idx[rows.start - a0:rows.stop - a0].unflatten(0, (k, bm)))
            a += k * bm
        else:
            b = min(b0, (sr + rel + 1) * bm - r0)
            torch.add(wu[a:b], colbase + rel * stride, out=idx[a - a0:b - a0])
            a = b


def _dequant_2d_table_cpu(w, s, out, block_size, block_offset) -> torch.Tensor:
    """CPU FP8 path by table: for each block, a table of its 256 possible outputs,
    ``rne(value[b] * scale)`` (the same float32 product and rounding as every backend), then one
    index add and one gather an element, over chunks of whole scale rows (bench/NOTES.md)."""
    bm, bn = block_size
    r0, c0 = block_offset
    rows, cols = w.shape
    values = _fp8_values(w.dtype)
    scale_col = (torch.arange(cols) + c0) // bn
    first = int(scale_col[0])
    ncols = int(scale_col[-1]) - first + 1
    # torch's index_select (int32 indices) runs on one thread; take (int64) splits over threads but
    # is 3-4x slower a thread: index_select on small machines, take on large ones
    many_threads = torch.get_num_threads() >= _TAKE_MIN_THREADS
    colbase = ((scale_col - first) * 256).to(torch.int64 if many_threads else torch.int32)
    wu = w.view(torch.uint8)
    # index offsets: a [cols] row per scale row, broadcast over its rows, when a scale row is large
    # enough to split over threads; otherwise a per-element offset tensor reused by every chunk
    # (narrow tensors: [24576, 1536] did 3.1-3.5x with it, 2.4x without; bench/NOTES.md)
    per_scale_row = bm * cols >= _PER_SCALE_ROW_MIN
    # more threads take larger chunks (each op's parallel split must stay worth its cost): 128K
    # elements a thread; 256K where take splits the gather and offsets are broadcast rows (16
    # threads: 4M, so a [576, 7168] tensor is one chunk; a larger per-element offset tensor
    # would be allocated, and fault its pages, on every call)
    per_thread = _CHUNK_ELEMS["cpu"] if (many_threads and per_scale_row) else _CHUNK_ELEMS["cpu"] // 2
    chunk_rows = max(1, min(rows, per_thread * max(1, torch.get_num_threads()) // cols))
    index = _scratch(chunk_rows * cols, colbase.dtype).view(chunk_rows, cols)

    def gather(idx, dst):
        if many_threads:
            torch.take(table, idx, out=dst)
        else:
            torch.index_select(table, 0, idx, out=dst)

    staging = None
    bases = {}  # (row within its block, rows) -> per-element offsets of the chunk's tables
    i = 0
    while i < rows:
        sr = (i + r0) // bm
        # One gather covers whole scale rows when a chunk holds several (small blocks or narrow
        # tensors would otherwise split one thread's worth of work over every thread), and the
        # rest of the tensor when it fits one chunk (a ragged last block, [576, 7168]: 4 + 1 scale
        # rows, was a second table and gather).
        end = rows if rows - i <= chunk_rows else min(rows, (sr + max(1, chunk_rows // bm)) * bm - r0)
        nsr = (end - 1 + r0) // bm - sr + 1
        table = (s[sr:sr + nsr, first:first + ncols, None] * values[None, None, :]).to(out.dtype).reshape(-1)
        for a0 in range(i, end, chunk_rows):
            b0 = min(end, a0 + chunk_rows)
            n = b0 - a0
            idx = index[:n]
            if per_scale_row:  # index = byte + offset of its block's table
                _add_table_offsets(idx, wu, a0, b0, r0, bm, sr, colbase, ncols * 256)
            else:
                key = ((a0 + r0) - sr * bm, n)
                if key not in bases:
                    rel = (torch.arange(a0, b0) + r0) // bm - sr
                    bases[key] = (rel * (ncols * 256)).to(colbase.dtype)[:, None] + colbase[None, :]
                    if len(bases) > 4:
                        bases.pop(next(iter(bases)))
                torch.add(bases[key], wu[a0:b0], out=idx)
            dst = out[a0:b0]
            if dst.is_contiguous():
                gather(idx.view(-1), dst.view(-1))
            else:
                if staging is None:
                    staging = torch.empty(chunk_rows * cols, dtype=out.dtype)
                part = staging[: n * cols]
                gather(idx.view(-1), part)
                dst.copy_(part.view(n, cols))
        i = end
    return out


def _mul_block_scales(wf: torch.Tensor, s: torch.Tensor, g0: int, bm: int, bn: int, runs) -> None:
    """wf[i, j] *= its block's scale, for rows g0.. of the block grid: the chunk's per-row scales
    ([rows, grid cols], small), then one op a column run, [rows, blocks, bn] by [rows, blocks, 1].
    (Broadcast views of the scale grid over [k, bm, blocks, bn] took 1.8x as long a pass on the
    16-thread host; bench/NOTES.md, session 8.)"""
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


def dequant_2d_torch(
    w: torch.Tensor, s: torch.Tensor, out: torch.Tensor, block_size: Tuple[int, int], block_offset: Tuple[int, int] = (0, 0)
) -> torch.Tensor:
    """out[i, j] = rne(float32(w[i, j]) * s[(i + r0) // bm, (j + c0) // bn]) for 2-D w, out; s already float32 2-D.

    w may be FP8 (decoded by bit manipulation, or on CPUs by table) or any float dtype.
    """
    bm, bn = block_size
    r0, c0 = block_offset
    rows, cols = w.shape
    if rows == 0 or cols == 0:
        return out
    fp8 = w.dtype in _dtypes.FP8_WEIGHT_DTYPES
    on_cpu = w.device.type == "cpu" and out.device.type == "cpu" and s.device.type == "cpu"
    method = cpu_fp8_method() if (fp8 and on_cpu) else "decode"
    if (method == "table" and min(bm, rows) * cols >= (1 << 14) and min(bm, rows) * min(bn, cols) >= 1024):
        # tables of 256 entries a block: worth it when a block holds many more elements
        return _dequant_2d_table_cpu(w, s, out, block_size, block_offset)
    runs = list(_column_runs(cols, c0, bn))
    if on_cpu:
        # a chunk is split over torch's threads: each thread's part of the float32 buffer stays in its L2
        chunk_rows = max(1, min(rows, _CPU_CHUNK_ELEMS_PER_THREAD * max(1, torch.get_num_threads()) // cols))
        wf_buf = _scratch(chunk_rows * cols, torch.float32).view(chunk_rows, cols)
    else:
        chunk_rows = max(1, min(rows, _CHUNK_ELEMS.get(w.device.type, 1 << 20) // cols))
        wf_buf = torch.empty((chunk_rows, cols), dtype=torch.float32, device=w.device)
    # "cast": torch's own FP8 -> float32 conversion (exact)
    decoder = None
    if fp8 and method != "cast":
        decoder = _Fp8Decoder(w, (chunk_rows, cols), bits=32 if method == "decode_int32" else 16)
    scale_data = False
    if decoder is not None and decoder.factor != 1.0:
        # wf holds x * 2^-k: fold 2^k into the (small) scales; the product is the same real
        # number, so it rounds the same. Where a scale would overflow, the data is scaled instead.
        lo, hi = torch.aminmax(s)  # one op: a check of three small ops cost as much as a data pass
        limit = _FLOAT32_OVERFLOW / decoder.factor
        scale_data = not (float(hi) < limit and float(lo) > -limit)  # NaN: scale the data
        if not scale_data:
            s = s * decoder.factor
    for i0 in range(0, rows, chunk_rows):
        i1 = min(rows, i0 + chunk_rows)
        wf = wf_buf[: i1 - i0]
        if decoder is None:
            wf.copy_(w[i0:i1])
        else:
            decoder.decode(w[i0:i1], wf)
            if scale_data:
                wf.mul_(decoder.factor)
        _mul_block_scales(wf, s, i0 + r0, bm, bn, runs)
        out[i0:i1].copy_(wf)
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
    x: torch.Tensor, block_size: Tuple[int, int] = (128, 128), dtype: torch.dtype = torch.float8_e4m3fn
) -> Tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-recipe blockwise quantization of [M, N] or [E, M, N]: returns (q, scale_inv) with

    scale_inv[b] = amax(|x| over block b) / fmax (1.0 for an all-zero block, so it stays finite),
    q = saturate(rne(float32(x) / scale_inv)); ragged edge blocks are padded with zeros.
    """
    fmax = _dtypes.FP8_MAX[dtype]
    squeeze = x.dim() == 2
    xs = x.unsqueeze(0) if squeeze else x
    E, M, N = xs.shape
    bm, bn = block_size
    gr, gc = -(-M // bm), -(-N // bn)
    xp = torch.nn.functional.pad(xs.to(torch.float32), (0, gc * bn - N, 0, gr * bm - M))
    blocks = xp.view(E, gr, bm, gc, bn)
    amax = blocks.abs().amax(dim=(2, 4))
    # Tensor / tensor: torch on CUDA turns division by a Python scalar into a reciprocal multiply.
    scale = torch.where(amax > 0, amax / torch.full_like(amax, fmax), torch.ones_like(amax))
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
