"""Triton blockwise dequant / cast / copy of 2-D and 3-D tensors into strided destinations."""

import os

import torch
import triton
import triton.language as tl

from .. import dtypes

from .fp8 import e2m1_bits_to_float32, e4m3_bits_to_float32, e5m2_bits_to_float32, e8m0_bits_to_float32

# Tuning knobs (one place).
_BLOCK_M = 32
_BLOCK_N = 256
_NUM_WARPS = 8

# How FP8 weights are read: "native" (tl.float8e4nv casts, sm_89+), "bitcast" (exact bit
# manipulation, any GPU and the interpreter), "auto" (native where the GPU has FP8 casts).
# Packed 4-bit sources are always decoded from their bits.
_SRC_NATIVE, _SRC_E4M3_BITS, _SRC_E5M2_BITS, _SRC_E2M1, _SRC_INT4 = 0, 1, 2, 3, 4
_SRC_PACKED = {"e2m1": _SRC_E2M1, "int4": _SRC_INT4}
# How scales are read: a float cast, E8M0 exponent bits, or E4M3 bits (where the GPU has no FP8 casts).
_SCALE_CAST, _SCALE_E8M0, _SCALE_E4M3_BITS = 0, 1, 2


def fp8_upcast_mode(device: torch.device) -> str:
    mode = os.environ.get("PYLOADER_TRITON_FP8_UPCAST", "auto").lower()
    if mode not in ("auto", "native", "bitcast"):
        raise ValueError(f"PYLOADER_TRITON_FP8_UPCAST must be auto, native or bitcast, not {mode!r}")
    if mode != "auto":
        return mode
    if device.type != "cuda":
        return "bitcast"  # the interpreter
    return "native" if torch.cuda.get_device_capability(device) >= (8, 9) else "bitcast"


@triton.jit
def _decode(src, offs_n, SRC_MODE: tl.constexpr):
    """float32 of a loaded tile; packed modes get the byte holding each column."""
    if SRC_MODE == 1:
        v = e4m3_bits_to_float32(src)
    elif SRC_MODE == 2:
        v = e5m2_bits_to_float32(src)
    elif SRC_MODE >= 3:
        nib = (src.to(tl.int32) >> ((offs_n[None, :] & 1) * 4)) & 15
        if SRC_MODE == 3:
            v = e2m1_bits_to_float32(nib)
        else:
            v = (nib - 8).to(tl.float32)
    else:
        v = src.to(tl.float32)
    return v


@triton.jit
def _abs_bits_max(v, mask):
    """max of |v|'s bits over the tile's valid elements (a NaN sorts above +inf)."""
    bits = tl.where(mask, v.to(tl.int32, bitcast=True) & 0x7FFFFFFF, 0)
    return tl.max(tl.max(bits, axis=1), axis=0)


@triton.jit
def _convert_tile(
    src, scale_ptr, global_ptr, amax_ptr, offs_m, offs_n, mask, r0, c0, block_rows, block_cols, scale_stride_r,
    scale_stride_c, DST_TY: tl.constexpr, SRC_MODE: tl.constexpr, HAS_SCALE: tl.constexpr, SCALE_MODE: tl.constexpr,
    GLOBAL_MODE: tl.constexpr, AMAX: tl.constexpr, CONVERT: tl.constexpr,
):
    # rne(decode(src)[i, j] * S[(i + r0) // bm, (j + c0) // bn]) as DST_TY, S = scale (* or / global)
    # (no scale: the cast alone; no conversion: the bits as loaded)
    if CONVERT:
        x = _decode(src, offs_n, SRC_MODE)
        v = x
        if HAS_SCALE:
            srow = (offs_m + r0) // block_rows
            scol = (offs_n + c0) // block_cols
            s_off = srow.to(tl.int64)[:, None] * scale_stride_r + scol.to(tl.int64)[None, :] * scale_stride_c
            s = tl.load(scale_ptr + s_off, mask=mask)  # no fill value: FP8 scales take none, and masked lanes are never stored
            if SCALE_MODE == 1:
                s = e8m0_bits_to_float32(s)
            elif SCALE_MODE == 2:
                s = e4m3_bits_to_float32(s)
            else:
                s = s.to(tl.float32)
            if GLOBAL_MODE == 1:
                s = s * tl.load(global_ptr)
            elif GLOBAL_MODE == 2:
                s = tl.div_rn(s, tl.load(global_ptr) + tl.zeros_like(s))
            v = v * s
        if AMAX:
            tl.atomic_max(amax_ptr, _abs_bits_max(v, mask))
            tl.atomic_max(amax_ptr + 1, _abs_bits_max(x, mask))
        out = v.to(DST_TY)
    else:
        out = src
    return out  # one return: Triton's compiler checks every return's type, constexpr branches too


@triton.jit
def _transform_2d_kernel(
    src_ptr, scale_ptr, dst_ptr,
    rows, cols,
    src_stride_e, src_stride_r, dst_stride_e, dst_stride_r,
    scale_stride_e, scale_stride_r, scale_stride_c,
    block_rows, block_cols, r0, c0,
    SRC_MODE: tl.constexpr, HAS_SCALE: tl.constexpr, SCALE_MODE: tl.constexpr, CONVERT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # dst[e, i, j] = rne(float32(src[e, i, j]) * float32(scale[e, (i + r0) // bm, (j + c0) // bn]))
    tiles_n = tl.cdiv(cols, BLOCK_N)
    pid = tl.program_id(0)
    e = tl.program_id(1).to(tl.int64)
    offs_m = (pid // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < rows) & (offs_n[None, :] < cols)
    m64 = offs_m.to(tl.int64)[:, None]
    src = tl.load(src_ptr + e * src_stride_e + m64 * src_stride_r + offs_n[None, :], mask=mask)
    out = _convert_tile(src, scale_ptr + e * scale_stride_e, scale_ptr, scale_ptr, offs_m, offs_n, mask, r0, c0,
                        block_rows, block_cols, scale_stride_r, scale_stride_c, dst_ptr.dtype.element_ty, SRC_MODE,
                        HAS_SCALE, SCALE_MODE, 0, False, CONVERT)
    tl.store(dst_ptr + e * dst_stride_e + m64 * dst_stride_r + offs_n[None, :], out, mask=mask)


def _launch(src, scale, dst, block_size, block_offset):
    """src/dst/scale are 3-D [E, rows, cols] views (unit column stride for src and dst)."""
    E, rows, cols = src.shape
    if src.numel() == 0:
        return
    convert = scale is not None or src.dtype != dst.dtype
    mode = _SRC_NATIVE
    if convert and src.dtype in dtypes.FP8_WEIGHT_DTYPES and fp8_upcast_mode(src.device) == "bitcast":
        mode = _SRC_E4M3_BITS if src.dtype == torch.float8_e4m3fn else _SRC_E5M2_BITS
        src = src.view(torch.uint8)
    if not convert and src.dtype in dtypes.FP8_WEIGHT_DTYPES:
        src, dst = src.view(torch.uint8), dst.view(torch.uint8)  # plain copy: move bytes
    scale_mode = _SCALE_CAST
    if scale is not None:
        scale, scale_mode = _scale_as_loaded(scale, src.device)
    sc = scale if scale is not None else src  # placeholder pointer, never read
    grid = (triton.cdiv(rows, _BLOCK_M) * triton.cdiv(cols, _BLOCK_N), E)
    _transform_2d_kernel[grid](
        src, sc, dst, rows, cols,
        src.stride(0), src.stride(1), dst.stride(0), dst.stride(1),
        sc.stride(0), sc.stride(1), sc.stride(2),
        block_size[0], block_size[1], block_offset[0], block_offset[1],
        SRC_MODE=mode, HAS_SCALE=scale is not None, SCALE_MODE=scale_mode, CONVERT=convert,
        BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, num_warps=_NUM_WARPS,
    )


def _scale_as_loaded(scale: torch.Tensor, device: torch.device):
    """(the scale as the kernel loads it, its SCALE_MODE)."""
    if dtypes.is_e8m0(scale.dtype):
        return scale.view(torch.uint8), _SCALE_E8M0
    if scale.dtype == torch.float8_e4m3fn and fp8_upcast_mode(device) == "bitcast":
        return scale.view(torch.uint8), _SCALE_E4M3_BITS
    return scale, _SCALE_CAST


def _check_unit_stride(t: torch.Tensor, what: str):
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{what} must have unit stride along its last dimension for the triton backend (strides {t.stride()})")


def dequant_blockwise_triton(weight, scale, out, block_size, block_offset):
    """Triton backend of pyloader.ops.dequant_blockwise (arguments already validated)."""
    _check_unit_stride(weight, "weight")
    _check_unit_stride(out, "out")
    if weight.dim() == 2:
        _launch(weight.unsqueeze(0), scale.unsqueeze(0), out.unsqueeze(0), block_size, block_offset)
    else:
        _launch(weight, scale, out, block_size, block_offset)
    return out


# Job table of the one-launch kernel: 15 int64 per job, pointers as addresses, strides in elements
# (a packed source's in bytes): src, dst, scale, rows, cols, src_row_stride, dst_row_stride,
# scale_row_stride, scale_col_stride, bm, bn, r0, c0, second-level scale, gate slot.
_TABLE_FIELDS = 15
_MAX_GRID_Y = 65535
_BITS_TYPES = {1: tl.uint8, 2: tl.uint16, 4: tl.uint32, 8: tl.uint64}
_TL_TYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32,
             torch.float8_e4m3fn: tl.float8e4nv, torch.float8_e5m2: tl.float8e5}


@triton.jit
def _multi_tensor_transform_kernel(
    table_ptr,
    SRC_TY: tl.constexpr, DST_TY: tl.constexpr, SCALE_TY: tl.constexpr,
    SRC_MODE: tl.constexpr, HAS_SCALE: tl.constexpr, SCALE_MODE: tl.constexpr, GLOBAL_MODE: tl.constexpr,
    AMAX: tl.constexpr, CONVERT: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Grid (tiles of the largest job, jobs): program (t, j) is tile t of job j; tiles past a job's
    # end return at once. A binary search over tile prefixes (multi_tensor_apply's block map)
    # costs a chain of dependent global loads per program in Triton, each on the critical path.
    t = tl.program_id(0)
    row = table_ptr + tl.program_id(1).to(tl.int64) * 15
    rows = tl.load(row + 3)
    cols = tl.load(row + 4)
    tiles_n = tl.cdiv(cols, BLOCK_N)
    if t >= tl.cdiv(rows, BLOCK_M) * tiles_n:
        return
    offs_m = (t // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (t % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < rows) & (offs_n[None, :] < cols)
    src_ptr = tl.load(row + 0).to(tl.pointer_type(SRC_TY))
    dst_ptr = tl.load(row + 1).to(tl.pointer_type(DST_TY))
    src_stride = tl.load(row + 5)
    dst_stride = tl.load(row + 6)
    if ALIGNED:  # the host checked: pointers 16-byte aligned, row strides multiples of 16 elements
        src_ptr = tl.multiple_of(src_ptr, 16)
        dst_ptr = tl.multiple_of(dst_ptr, 16)
        src_stride = tl.multiple_of(src_stride, 16)
        dst_stride = tl.multiple_of(dst_stride, 16)
    m64 = offs_m.to(tl.int64)[:, None]
    if SRC_MODE >= 3:  # packed: the byte holding each column
        src = tl.load(src_ptr + m64 * src_stride + (offs_n // 2)[None, :], mask=mask)
    else:
        src = tl.load(src_ptr + m64 * src_stride + offs_n[None, :], mask=mask)
    scale_ptr = tl.load(row + 2).to(tl.pointer_type(SCALE_TY))  # null without a scale: never read then
    global_ptr = tl.load(row + 13).to(tl.pointer_type(tl.float32))
    amax_ptr = tl.load(row + 14).to(tl.pointer_type(tl.int32))
    out = _convert_tile(src, scale_ptr, global_ptr, amax_ptr, offs_m, offs_n, mask, tl.load(row + 11),
                        tl.load(row + 12), tl.load(row + 9), tl.load(row + 10), tl.load(row + 7), tl.load(row + 8),
                        DST_TY, SRC_MODE, HAS_SCALE, SCALE_MODE, GLOBAL_MODE, AMAX, CONVERT)
    tl.store(dst_ptr + m64 * dst_stride + offs_n[None, :], out, mask=mask)


def _signature(job, device):
    """Constexpr signature of a job: jobs sharing one run in the same launch."""
    src, dst, scale = job.src, job.dst, job.scale
    amax = job.amax is not None
    convert = job.packing is not None or scale is not None or src.dtype != dst.dtype or amax
    if not convert:  # plain copy: move bits of the element size
        bits = _BITS_TYPES[src.element_size()]
        return (bits, bits, tl.float32, _SRC_NATIVE, False, _SCALE_CAST, 0, False, False)
    if job.packing is not None:
        mode, src_ty = _SRC_PACKED[job.packing], tl.uint8
    else:
        mode, src_ty = _SRC_NATIVE, _TL_TYPES[src.dtype]
        if src.dtype in dtypes.FP8_WEIGHT_DTYPES and fp8_upcast_mode(device) == "bitcast":
            mode = _SRC_E4M3_BITS if src.dtype == torch.float8_e4m3fn else _SRC_E5M2_BITS
            src_ty = tl.uint8
    scale_ty, scale_mode = tl.float32, _SCALE_CAST
    if scale is not None:
        loaded, scale_mode = _scale_as_loaded(scale, device)
        scale_ty = tl.uint8 if loaded.dtype == torch.uint8 else _TL_TYPES[loaded.dtype]
    global_mode = 0 if job.global_scale is None else dtypes.GLOBAL_MODES[job.global_mode]
    return (src_ty, _TL_TYPES[dst.dtype], scale_ty, mode, scale is not None, scale_mode, global_mode, amax, True)


def multi_tensor_transform_triton(jobs):
    """Triton backend of the multi-tensor transform: one launch per distinct dtype signature
    (a layer's experts share one), a (tiles, jobs) grid over all its jobs."""
    groups = {}
    for job in jobs:
        _check_unit_stride(job.src, "source")
        _check_unit_stride(job.dst, "destination")
        if job.dst.numel():
            groups.setdefault(_signature(job, job.dst.device), []).append(job)
    for sig, group in groups.items():
        src_ty, dst_ty, scale_ty, mode, has_scale, scale_mode, global_mode, amax, convert = sig
        table, most, aligned = [], 0, True
        for job in group:
            src = dtypes.as_packed_bytes(job.src) if job.packing is not None else job.src
            aligned = aligned and all(t.data_ptr() % 16 == 0 and (t.shape[0] <= 1 or t.stride(0) % 16 == 0)
                                      for t in (src, job.dst))
            rows, cols = job.dst.shape
            s = job.scale
            table.append([src.data_ptr(), job.dst.data_ptr(), s.data_ptr() if s is not None else 0, rows, cols,
                          src.stride(0), job.dst.stride(0), s.stride(0) if s is not None else 0,
                          s.stride(1) if s is not None else 0, job.block_size[0], job.block_size[1],
                          job.block_offset[0], job.block_offset[1],
                          job.global_scale.data_ptr() if job.global_scale is not None else 0,
                          job.amax.data_ptr() if job.amax is not None else 0])
            most = max(most, triton.cdiv(rows, _BLOCK_M) * triton.cdiv(cols, _BLOCK_N))
        device = group[0].dst.device
        table_t = torch.tensor(table, dtype=torch.int64).to(device, non_blocking=True)
        for first in range(0, len(group), _MAX_GRID_Y):  # grid dimension 1 holds at most 65535 jobs
            _multi_tensor_transform_kernel[(most, min(_MAX_GRID_Y, len(group) - first))](
                table_t[first:],
                SRC_TY=src_ty, DST_TY=dst_ty, SCALE_TY=scale_ty, SRC_MODE=mode, HAS_SCALE=has_scale,
                SCALE_MODE=scale_mode, GLOBAL_MODE=global_mode, AMAX=amax, CONVERT=convert, ALIGNED=aligned,
                BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, num_warps=_NUM_WARPS,
            )
