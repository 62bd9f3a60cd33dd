"""Blockwise FP8 quantization by the DeepSeek recipe (float or UE8M0 scales): ``quantize_blockwise``
for one tensor, ``multi_tensor_quantize`` / ``CompiledQuantize`` for many in one launch (a refit
bucket), ``requant_into`` for an FP8 parameter in place."""

from array import array
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .. import dtypes
from ..backend import resolve_backend
from ..errors import PyloaderInputError
from . import reference
from .dequant import int_pair


SCALE_FMTS = {"float": 0, "ue8m0": 1}  # csrc/include/pyloader/job_table.h ScaleFmt
QUANT_FIELDS = 13


@dataclass
class QuantizeJob:
    """``src`` (float [M, N]) quantized blockwise into ``q`` (FP8 [M, N]) and ``scale`` (float32
    ``[ceil(M/bm), ceil(N/bn)]``): the DeepSeek recipe (``scale_fmt="float"``: ``s = amax / fmax``)
    or power-of-two scales (``"ue8m0"``: the least ``2^e >= amax / 448``, e4m3fn only); an all-zero
    block gets 1. Every view has unit column stride; rows may be strided (slices of parameters)."""

    src: torch.Tensor
    q: torch.Tensor
    scale: torch.Tensor
    block_size: Tuple[int, int] = (128, 128)
    scale_fmt: str = "float"


def check_quantize_job(job: QuantizeJob, index: int = 0) -> None:
    bm, bn = job.block_size
    where = f"quantize job {index}"
    x, q, s = job.src, job.q, job.scale
    if bm <= 0 or bn <= 0:
        raise PyloaderInputError(f"{where}: block_size must be positive, got {(bm, bn)}")
    if x.dim() != 2 or x.dtype not in dtypes.FLOAT_OUT_DTYPES:
        raise PyloaderInputError(f"{where}: the source must be 2-D bfloat16/float16/float32, got {x.dtype} "
                                 f"{list(x.shape)}")
    M, N = x.shape
    grid = (-(-M // bm), -(-N // bn))
    if q.shape != x.shape or q.dtype not in dtypes.FP8_WEIGHT_DTYPES:
        raise PyloaderInputError(f"{where}: q must be FP8 {list(x.shape)}, got {q.dtype} {list(q.shape)}")
    if tuple(s.shape) != grid or s.dtype != torch.float32:
        raise PyloaderInputError(f"{where}: scale must be float32 {list(grid)}, got {s.dtype} {list(s.shape)}")
    if job.scale_fmt not in SCALE_FMTS:
        raise PyloaderInputError(f"{where}: scale_fmt must be 'float' or 'ue8m0', not {job.scale_fmt!r}")
    if job.scale_fmt == "ue8m0" and q.dtype != torch.float8_e4m3fn:
        raise PyloaderInputError(f"{where}: UE8M0 scales are for float8_e4m3fn")
    for t, what, n in ((x, "source", N), (q, "q", N), (s, "scale", grid[1])):
        if n > 1 and t.stride(1) != 1:
            raise PyloaderInputError(f"{where}: the {what} needs unit column stride, got strides {tuple(t.stride())}")
        if t.device != x.device:
            raise PyloaderInputError(f"{where}: the {what} is on {t.device}, the source on {x.device}")


def quantize_rows(jobs: Sequence[QuantizeJob]) -> List[int]:
    """The jobs' fields, flat (csrc/include/pyloader/job_table.h QuantField order)."""
    table: List[int] = []
    for j in jobs:
        x, q, s = j.src, j.q, j.scale
        table += (x.data_ptr(), x.stride(0), dtypes.value_code(x.dtype), q.data_ptr(), q.stride(0),
                  dtypes.value_code(q.dtype), s.data_ptr(), s.stride(0), x.shape[0], x.shape[1], j.block_size[0],
                  j.block_size[1], SCALE_FMTS[j.scale_fmt])
    return table


def _launch(packed: array, device: torch.device) -> None:
    from .. import _C

    n = len(packed) // QUANT_FIELDS
    if n:
        with torch.cuda.device(device):
            _C.multi_tensor_quantize(packed.buffer_info()[0], n, torch.cuda.current_stream(device).cuda_stream)


def _run_torch(job: QuantizeJob) -> None:
    q, s = reference.quantize_blockwise_torch(job.src, job.block_size, job.q.dtype, job.scale_fmt)
    job.q.copy_(q)
    job.scale.copy_(s)


class CompiledQuantize:
    """Quantize jobs checked and packed once, run many times (a refit step): their tensors must
    stay alive and in place. ``cuda``: one launch for all of them (up to 320 jobs a launch);
    ``triton``: one launch per source dtype and FP8 kind; ``torch``: job by job."""

    def __init__(self, jobs: Sequence[QuantizeJob], backend: str):
        for i, j in enumerate(jobs):
            check_quantize_job(j, i)
        self.jobs = [j for j in jobs if j.src.numel()]
        self.backend = backend
        self.device = self.jobs[0].src.device if self.jobs else None
        self._packed = array("q", quantize_rows(self.jobs)) if backend == "cuda" and self.jobs else None

    def run(self) -> None:
        if not self.jobs:
            return
        if self.backend == "cuda":
            _launch(self._packed, self.device)
        elif self.backend == "triton":
            from ..triton_kernels import multi_tensor_quantize_triton

            multi_tensor_quantize_triton(self.jobs)
        else:
            for j in self.jobs:
                _run_torch(j)


def multi_tensor_quantize(jobs: Sequence[QuantizeJob], backend: Optional[str] = None) -> None:
    """Quantize many tensors blockwise, each into its own ``q`` and ``scale`` views, in one launch
    (``cuda``)."""
    if not jobs:
        return
    chosen = resolve_backend(backend, jobs[0].src.device, "quantize_blockwise")
    CompiledQuantize(jobs, chosen).run()


def quantize_blockwise(
    x: torch.Tensor,
    block_size: Sequence[int] = (128, 128),
    dtype: torch.dtype = torch.float8_e4m3fn,
    backend: Optional[str] = None,
    scale_fmt: str = "float",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Blockwise FP8 quantization by the DeepSeek recipe; returns ``(q, scale_inv)``.

    ``scale_inv = amax(|x| over the block) / fmax`` (fmax 448 for e4m3fn, 57344 for e5m2; an all-zero
    block gets 1.0, never NaN), ``q = saturate(rne(x / scale_inv))``; ragged edge blocks count only
    their real elements. ``scale_fmt="ue8m0"`` (DeepSeek-V3.1+ ``scale_fmt: ue8m0``, e4m3fn): the
    scale is the least power of two ``>= amax / 448`` (exponent in [-127, 127]), so ``q * scale_inv``
    loses only the FP8 rounding. ``x`` is bfloat16/float16/float32 ``[M, N]`` or ``[E, M, N]`` with
    finite values; ``q`` is contiguous, ``scale_inv`` float32 ``[..., ceil(M/bm), ceil(N/bn)]``.
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
    M, N = x.shape[-2:]
    q = torch.empty(x.shape, dtype=dtype, device=x.device)
    scale = torch.empty(tuple(x.shape[:-2]) + (-(-M // bm), -(-N // bn)), dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return q, scale
    if x.stride(-1) != 1 and N > 1:
        x = x.contiguous()
    if x.dim() == 2:
        jobs = [QuantizeJob(x, q, scale, (bm, bn), scale_fmt)]
    else:
        jobs = [QuantizeJob(x[e], q[e], scale[e], (bm, bn), scale_fmt) for e in range(x.shape[0])]
    CompiledQuantize(jobs, chosen).run()
    return q, scale


def requant_into(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, block_size: Sequence[int] = (128, 128),
                 scale_fmt: str = "float", backend: Optional[str] = None) -> None:
    """Quantize ``x`` ([M, N] float) blockwise into existing ``q`` (FP8 [M, N]) and ``scale``
    (float32 [ceil(M/bm), ceil(N/bn)]): the refit of an FP8 parameter in place, pointers
    unchanged. ``scale_fmt`` as for :func:`quantize_blockwise`."""
    multi_tensor_quantize([QuantizeJob(x, q, scale, int_pair(block_size, "block_size"), scale_fmt)], backend)


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
