"""Blockwise quantization (DeepSeek recipe): reference properties, backends bitwise against it."""

import pytest
import torch

from pyloader import ops
from pyloader.ops import reference

from pyloader.errors import PyloaderInputError
from pyloader.ops.quantize import QuantizeJob, multi_tensor_quantize

from helpers import HAS_GPU, HAS_TRITON, assert_bitwise_equal, poison_

SHAPES = [(1, 1), (7, 129), (576, 7168), (130, 257)]
BLOCKS = [(128, 128), (1, 32), (32, 32)]


def test_roundtrip_error_is_bounded_by_fp8_precision():
    x = torch.randn(300, 520) * 5
    q, s = ops.quantize_blockwise(x, backend="torch")
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 5) and s.dtype == torch.float32
    back = ops.dequant_blockwise(q, s, out_dtype=torch.float32, backend="torch")
    # e4m3 has 3 mantissa bits: relative error <= 2^-4 for normal values.
    big = x.abs() > s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:300, :520] * 2 ** -6 * 448 / 448
    rel = ((back - x).abs() / x.abs())[big]
    assert rel.max() <= 2 ** -4


def test_block_amax_maps_to_fmax_and_scale_is_amax_over_448():
    x = torch.zeros(128, 256)
    x[3, 5], x[100, 200] = -7.0, 3.0
    q, s = ops.quantize_blockwise(x, backend="torch")
    assert torch.equal(s, torch.tensor([[7.0 / 448, 3.0 / 448]]))
    assert q.float()[3, 5] == -448 and q.float()[100, 200] == 448


def test_all_zero_block_gets_a_finite_scale():
    x = torch.zeros(130, 130)
    x[129, 129] = 1.0
    q, s = ops.quantize_blockwise(x, backend="torch")
    assert torch.isfinite(s).all() and (s[0, 0] == 1.0)
    assert (q.float()[:128, :128] == 0).all()


def test_e5m2_and_3d():
    x = torch.randn(3, 70, 90, dtype=torch.bfloat16)
    q, s = ops.quantize_blockwise(x, (32, 32), torch.float8_e5m2, backend="torch")
    assert q.shape == (3, 70, 90) and s.shape == (3, 3, 3)
    assert (s.amax() * 57344 - x.float().abs().amax()).abs() < 1e-3


BACKENDS = [("torch", "cpu"),
            pytest.param("triton", "cpu", marks=pytest.mark.skipif(not HAS_TRITON or HAS_GPU, reason="interpreter")),
            pytest.param("triton", "cuda", marks=pytest.mark.gpu), pytest.param("cuda", "cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ue8m0_scale_is_the_least_power_of_two_at_or_above_amax_over_448(backend, device):
    x = torch.zeros(128, 7 * 128)
    amax = [448.0, 448.0 * 1.0000001, 3.0, 1e-30, 1e-43, 0.0, 2.0 ** -140 * 448]
    for k, a in enumerate(amax):
        x[k, k * 128 + 5] = -a
    q, s = ops.quantize_blockwise(x.to(device), scale_fmt="ue8m0", backend=backend)
    q, s = q.cpu(), s.cpu()
    e = torch.frexp(s[0])[1] - 1
    assert torch.equal(s[0], torch.exp2(e.double()).float())  # powers of two
    assert s[0, 0] == 1.0 and s[0, 1] == 2.0  # exactly 448 → 2^0; a hair above → 2^1
    assert s[0, 2] == 2.0 ** -7  # 3/448 = 0.0067 → 2^-7 = 0.0078
    assert s[0, 5] == 1.0  # all zero
    assert s[0, 6].item() == 2.0 ** -127  # clamped at UE8M0's least exponent (an fp32 subnormal)
    y = torch.tensor(amax, dtype=torch.float64) / 448
    live = (y > 2.0 ** -127) & (y > 0)
    assert ((s[0].double() >= y) | ~live).all() and ((s[0].double() / 2 < y) | ~live).all()
    assert q.float()[0, 5] == -448 and q.float()[2, 2 * 128 + 5] == -3.0 / 2.0 ** -7


def test_ue8m0_is_for_e4m3():
    with pytest.raises(PyloaderInputError, match="UE8M0"):
        ops.quantize_blockwise(torch.ones(4, 4), dtype=torch.float8_e5m2, scale_fmt="ue8m0", backend="torch")


def test_bad_jobs_are_refused_before_any_write():
    x = torch.ones(64, 256)
    q = torch.empty(64, 256, dtype=torch.float8_e4m3fn)
    s = torch.empty(1, 2)
    for bad, match in [(QuantizeJob(x, q[:, :128], s), "q must be FP8"),
                       (QuantizeJob(x, q, s[:, :1]), "scale must be float32"),
                       (QuantizeJob(x, q, s.double()), "scale must be float32"),
                       (QuantizeJob(x.t(), q.t(), torch.empty(2, 1)), "unit column stride"),
                       (QuantizeJob(x, q, s, scale_fmt="e8m0"), "scale_fmt"),
                       (QuantizeJob(x.int(), q, s), "2-D bfloat16")]:
        poison_(q)
        with pytest.raises(PyloaderInputError, match=match):
            multi_tensor_quantize([QuantizeJob(x, q, s), bad], backend="torch")
        assert (q.view(torch.uint8) == 0x5A).all()


def _jobs(device, xdtype, many=False):
    """Jobs over views of a few big tensors: strided rows, offsets that break 16-byte alignment,
    ragged and odd shapes, scale rows inside a larger scale tensor, both scale formats."""
    gen = torch.Generator(device=device).manual_seed(7)
    big = (torch.randn(700, 1100, device=device, generator=gen) * 5).to(xdtype)
    big[:64, :64] = 0  # an all-zero block
    big[200, 300] = 3e4 if xdtype != torch.float16 else 6e4
    q_big = poison_(torch.empty(1100, 1200, dtype=torch.uint8, device=device))
    s_big = poison_(torch.empty(500, 64, dtype=torch.float32, device=device))
    specs = [((0, 0, 256, 512), (128, 128), "float", torch.float8_e4m3fn),     # aligned, vector body
             ((256, 8, 130, 264), (128, 128), "ue8m0", torch.float8_e4m3fn),   # ragged rows, offset columns
             ((390, 1, 70, 257), (32, 32), "float", torch.float8_e5m2),        # misaligned source: element body
             ((460, 0, 129, 1024), (256, 128), "float", torch.float8_e4m3fn),  # block over the register budget
             ((600, 16, 1, 1), (128, 128), "ue8m0", torch.float8_e4m3fn),
             ((610, 24, 77, 96), (1, 32), "float", torch.float8_e4m3fn)]
    if many:  # past one launch's table
        specs += [((620 + k % 64, 8 * (k % 100), 1, 128), (128, 128), "float", torch.float8_e4m3fn)
                  for k in range(400)]
    jobs, q_at, s_at = [], 0, 0
    for (r, c, m, n), block, fmt, qd in specs:
        gr, gc = -(-m // block[0]), -(-n // block[1])
        q = q_big.view(-1)[q_at:q_at + m * 1200].view(m, 1200)[:, 3:3 + n].view(qd)
        q_at += m * 1200
        s = s_big.view(-1)[s_at:s_at + gr * 64].view(gr, 64)[:, 1:1 + gc]
        s_at += gr * 64
        jobs.append(QuantizeJob(big[r:r + m, c:c + n], q, s, block, fmt))
    return jobs, q_big, s_big


def _check_jobs(backend, device, xdtype, many=False):
    jobs, q_big, s_big = _jobs(device, xdtype, many)
    multi_tensor_quantize(jobs, backend=backend)
    for i, j in enumerate(jobs):
        q_ref, s_ref = reference.quantize_blockwise_torch(j.src, j.block_size, j.q.dtype, j.scale_fmt)
        assert_bitwise_equal(j.scale, s_ref, f"job {i} scale")
        assert_bitwise_equal(j.q, q_ref, f"job {i} q")
    # nothing outside the jobs' views was written
    q_seen = torch.zeros_like(q_big, dtype=torch.bool)
    s_seen = torch.zeros_like(s_big, dtype=torch.bool)
    for j in jobs:
        q_seen.view(-1)[_flat_index(j.q.view(torch.uint8), q_big)] = True
        s_seen.view(-1)[_flat_index(j.scale, s_big)] = True
    assert (q_big[~q_seen] == 0x5A).all()
    assert (s_big.view(torch.int32)[~s_seen] == 0x7FB5A5A5).all()


def _flat_index(view, base):
    """Flat element indices of ``base`` that ``view`` covers."""
    off = view.storage_offset() - base.storage_offset()
    rows, cols = view.shape
    return off + torch.arange(rows, device=view.device)[:, None] * view.stride(0) + torch.arange(cols, device=view.device)


def test_many_jobs_torch_bitwise():
    _check_jobs("torch", "cpu", torch.float32)


@pytest.mark.skipif(not HAS_TRITON or HAS_GPU, reason="interpreter tests: triton installed, no GPU")
def test_many_jobs_triton_interpreter_bitwise():
    _check_jobs("triton", "cpu", torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16, torch.float16])
def test_many_jobs_gpu_bitwise(backend, xdtype):
    _check_jobs(backend, "cuda", xdtype, many=True)


def _check(backend, x, block, dtype):
    q_ref, s_ref = reference.quantize_blockwise_torch(x, block, dtype)
    q, s = ops.quantize_blockwise(x, block, dtype, backend=backend)
    assert_bitwise_equal(s, s_ref, "scale")
    assert_bitwise_equal(q, q_ref, "q")


@pytest.mark.skipif(not HAS_TRITON or HAS_GPU, reason="interpreter tests: triton installed, no GPU")
@pytest.mark.parametrize("shape", [(1, 1), (7, 129), (70, 90)])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_triton_interpreter_bitwise(shape, dtype):
    x = torch.randn(shape) * 3
    x[0, 0] = 0.0
    _check("triton", x, (32, 32), dtype)
    _check("triton", torch.zeros(shape), (32, 32), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_gpu_bitwise(backend, shape, block, xdtype, dtype):
    gen = torch.Generator(device="cuda").manual_seed(sum(shape))
    x = (torch.randn(shape, device="cuda", generator=gen) * 7).to(xdtype)
    x[..., : min(shape[0], 40), : min(shape[1], 40)] = 0  # an all-zero block where the shape allows
    _check(backend, x, block, dtype)
    _check(backend, x.unsqueeze(0).repeat(2, 1, 1), block, dtype)
    if dtype == torch.float8_e4m3fn:
        q_ref, s_ref = reference.quantize_blockwise_torch(x, block, dtype, "ue8m0")
        q, s = ops.quantize_blockwise(x, block, dtype, backend=backend, scale_fmt="ue8m0")
        assert_bitwise_equal(s, s_ref, "ue8m0 scale")
        assert_bitwise_equal(q, q_ref, "ue8m0 q")
