"""Blockwise quantization (DeepSeek recipe): reference properties, backends bitwise against it."""

import pytest
import torch

from pyloader import ops
from pyloader.ops import reference

from helpers import HAS_GPU, HAS_TRITON, assert_bitwise_equal

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
