"""The formats against the library that writes them: compressed-tensors' own decompression of
INT4 pack-quantized and NVFP4 tensors (packed by its own packers) and pyloader's dequant agree
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
