"""Comparison and data helpers shared by the tests."""

import importlib.util
import os

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_GPU = torch.cuda.is_available()

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
POISON_BITS = {1: 0x5A, 2: 0x7FB5, 4: 0x7FB5A5A5}  # unusual NaN payloads no kernel produces


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT_OF_SIZE[t.element_size()])


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with a bit pattern no backend writes, so unwritten elements show in bitwise compares."""
    size = t.element_size()
    v = POISON_BITS[size]
    if size == 1:
        t.view(torch.uint8).fill_(v)
    else:
        t.view(_INT_OF_SIZE[size]).fill_(v - (1 << (8 * size)) if v >= 1 << (8 * size - 1) else v)
    return t


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a, e = bits(actual).cpu(), bits(expected).cpu()
    diff = (a != e).nonzero()
    if diff.numel():
        idx = tuple(diff[0].tolist())
        raise AssertionError(
            f"{what}: {diff.shape[0]} of {a.numel()} elements differ; first at {idx}: "
            f"got bits {int(a[idx]) & 0xFFFFFFFF:#x}, expected {int(e[idx]) & 0xFFFFFFFF:#x}"
        )


def assert_equal_within_ulp(actual: torch.Tensor, expected: torch.Tensor, ulp: int = 1, what: str = "") -> None:
    """Same NaN positions, other elements at most ``ulp`` units in the last place apart (same sign).

    For the Triton interpreter, which rounds fp32 -> bf16/fp16 toward zero."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    a, e = actual.float().cpu(), expected.float().cpu()
    nan_a, nan_e = a.isnan(), e.isnan()
    assert torch.equal(nan_a, nan_e), f"{what}: NaN positions differ"
    ab, eb = bits(actual).cpu().to(torch.int64), bits(expected).cpu().to(torch.int64)
    keep = ~nan_a
    sign_bit = 1 << (8 * actual.element_size() - 1)
    same_sign = ((ab ^ eb) & sign_bit) == 0
    assert bool(same_sign[keep].all()), f"{what}: sign differs"
    d = (ab - eb).abs()[keep]
    worst = int(d.max()) if d.numel() else 0
    assert worst <= ulp, f"{what}: {worst} ulp apart (allowed {ulp})"


def random_fp8(shape, dtype, gen: torch.Generator, all_bytes: bool = False) -> torch.Tensor:
    """FP8 tensor: uniformly random bytes (all_bytes: NaN, ±0, subnormals included) or scaled normals."""
    if all_bytes:
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen).view(dtype)
    x = torch.randn(shape, generator=gen) * 64
    return x.clamp(-448, 448).to(dtype)


def random_scale(shape, dtype, gen: torch.Generator) -> torch.Tensor:
    if dtype == torch.uint8 or dtype == getattr(torch, "float8_e8m0fnu", None):
        e = torch.randint(100, 140, shape, dtype=torch.uint8, generator=gen)
        return e if dtype == torch.uint8 else e.view(dtype)
    return (torch.rand(shape, generator=gen) * 1e-2 + 1e-4).to(dtype)


def special_fp8_table(dtype) -> torch.Tensor:
    """All 256 byte values of an FP8 dtype as a [16, 16] tensor (NaN, ±0, subnormals, max)."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(16, 16).view(dtype)


def direct_io_supported(path) -> bool:
    """Whether the filesystem holding ``path`` lets it be opened with O_DIRECT (tmpfs does not)."""
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError:
        return False
