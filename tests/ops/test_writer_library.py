"""The formats against the library that writes them: compressed-tensors' own decompression of
INT4 pack-quantized, NVFP4 and MXFP4 tensors (packed by its own packers) and pyloader's dequant agree
bit for bit; its packers lay nibbles out as pyloader reads them."""

import pytest
import torch

from pyloader import ops

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import NVFP4PackedCompressor, PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402

from helpers import assert_bitwise_equal  # noqa: E402


def scheme(**weights):
    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(symmetric=True, **weights))


@pytest.mark.parametrize("shape,group", [((64, 256), 32), ((37, 96), 32), ((16, 512), 128)])
def test_int4_pack_quantized_as_compressed_tensors_writes_and_reads_it(shape, group):
    gen = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(*shape, generator=gen).to(torch.bfloat16)
    s = (w.float().abs().reshape(shape[0], -1, group).amax(-1) / 7 + 1e-6).to(torch.bfloat16)
    sch = scheme(num_bits=4, type="int", strategy="group", group_size=group)
    packed = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": s}, sch)
    theirs = PackedQuantizationCompressor.decompress(packed, sch)["weight"]
    mine = ops.dequant_int4(packed["weight_packed"], packed["weight_scale"], cols=int(packed["weight_shape"][1]),
                            group_size=group, backend="torch")
    assert_bitwise_equal(mine, theirs.to(torch.bfloat16))


def test_nvfp4_compressed_tensors_divisor_form():
    gen = torch.Generator().manual_seed(3)
    for rows, cols in ((64, 256), (33, 160)):
        codes = torch.randint(0, 256, (rows, cols // 2), dtype=torch.uint8, generator=gen)
        scale = (torch.rand(rows, cols // 16, generator=gen) * 4 + 0.01).to(torch.float8_e4m3fn)
        g = torch.tensor([3.7], dtype=torch.float32)
        sch = scheme(num_bits=4, type="float", strategy="tensor_group", group_size=16)
        theirs = NVFP4PackedCompressor.decompress({"weight_packed": codes, "weight_scale": scale,
                                                   "weight_global_scale": g}, sch)["weight"]
        mine = ops.dequant_nvfp4(codes, scale, g, form="compressed-tensors", backend="torch")
        assert_bitwise_equal(mine, theirs.to(torch.bfloat16))


def test_mxfp4_pack_quantized_every_code_and_scale():
    """compressed-tensors ``mxfp4-pack-quantized`` (Kimi-K3's experts): U8 codes, U8 E8M0 exponents
    per 32 — the layout of DeepSeek-V4's experts. Every byte value and exponents 0..254 agree bit for
    bit; exponent 255 is NaN in the OCP MX format and in pyloader, where compressed-tensors
    computes 2^128 (±inf, NaN for code 0)."""
    from compressed_tensors.compressors import BaseCompressor

    gen = torch.Generator().manual_seed(5)
    rows, cols = 48, 512
    codes = torch.arange(rows * cols // 2, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(rows, cols // 2)
    codes = codes[torch.randperm(rows, generator=gen)]
    exps = torch.randint(0, 255, (rows, cols // 32), dtype=torch.uint8, generator=gen)
    exps[0, :2] = torch.tensor([0, 254], dtype=torch.uint8)
    exps[1, 3] = 255
    sch = scheme(num_bits=4, type="float", strategy="group", group_size=32, scale_dtype=torch.uint8,
                 zp_dtype=torch.uint8)
    theirs = BaseCompressor.load_from_registry("mxfp4-pack-quantized").decompress(
        {"weight_packed": codes, "weight_scale": exps}, sch)["weight"].to(torch.bfloat16)
    mine = ops.dequant_fp4(codes, exps.view(torch.float8_e8m0fnu), backend="torch")
    nan_group = (slice(1, 2), slice(96, 128))
    assert torch.isnan(mine[nan_group]).all() and not torch.isfinite(theirs[nan_group]).any()
    mine[nan_group], theirs[nan_group] = 0, 0
    assert_bitwise_equal(mine, theirs)
