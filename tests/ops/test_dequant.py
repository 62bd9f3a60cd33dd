"""Blockwise FP8 dequant: reference against an independent float64 formula (CPU), every backend
against the reference (bitwise on the GPU, within 1 bf16 ulp under the Triton interpreter)."""

import itertools

import pytest
import torch

from pyloader import ops
from pyloader.ops import reference
from pyloader.errors import PyloaderInputError

from helpers import (
    HAS_GPU, HAS_TRITON, assert_bitwise_equal, assert_equal_within_ulp, poison_, random_fp8, random_scale,
    special_fp8_table,
)

E8M0 = getattr(torch, "float8_e8m0fnu", torch.uint8)
SCALE_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.uint8, E8M0]
OUT_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
W_DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2]


def grid(shape, block, offset=(0, 0)):
    return (-(-(offset[0] + shape[-2]) // block[0]), -(-(offset[1] + shape[-1]) // block[1]))


def make_case(shape, block, wdtype, sdtype, seed, all_bytes=False, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    w = random_fp8(shape, wdtype, gen, all_bytes=all_bytes)
    s = random_scale(tuple(shape[:-2]) + grid(shape, block), sdtype, gen)
    return w.to(device), s.to(device)


def expected_float64(w, s, block, out_dtype, offset=(0, 0)):
    return reference.dequant_reference_float64(w.cpu(), s.cpu(), block, offset).to(torch.float32).to(out_dtype)


def run(backend, w, s, block, out=None, out_dtype=torch.bfloat16, offset=(0, 0), monkeypatch=None):
    if backend == "triton-bitcast":
        monkeypatch.setenv("PYLOADER_TRITON_FP8_UPCAST", "bitcast")
        backend = "triton"
    return ops.dequant_blockwise(w, s, block, out=out, out_dtype=out_dtype, backend=backend, block_offset=offset)


def block_for(shape, kind):
    M, N = shape[-2:]
    return {"128": (128, 128), "mx": (1, 32), "row": (1, N), "tensor": (M, N), "32": (32, 32), "odd": (3, 80)}[kind]


# A rotation through scale/out/weight dtypes over shapes and block kinds: every value of each
# axis appears with every shape, without the full cartesian product.
SHAPES = [(1, 1), (7, 129), (129, 7), (576, 7168), (1, 18432), (18432, 7), (130, 257)]
BLOCKS = ["128", "mx", "row", "tensor", "32", "odd"]
CASES = []
for i, (shape, kind) in enumerate(itertools.product(SHAPES, BLOCKS)):
    CASES.append((shape, kind, W_DTYPES[i % 2], SCALE_DTYPES[i % 5], OUT_DTYPES[i % 3], i % 4 == 0))


def case_id(c):
    shape, kind, w, s, o, allb = c
    return f"{shape[0]}x{shape[1]}-{kind}-{str(w)[-5:]}-{str(s)[6:]}-{str(o)[6:]}{'-bytes' if allb else ''}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_reference_matches_float64_formula(case):
    shape, kind, wdtype, sdtype, out_dtype, all_bytes = case
    block = block_for(shape, kind)
    w, s = make_case(shape, block, wdtype, sdtype, seed=len(str(case)), all_bytes=all_bytes)
    out = poison_(torch.empty(shape, dtype=out_dtype))
    reference.dequant_blockwise_torch(w, s, out, block)
    # ulp=0: bitwise except NaN payloads, which differ between float64 and float32 paths on CPUs.
    assert_equal_within_ulp(out, expected_float64(w, s, block, out_dtype), ulp=0, what=case_id(case))


@pytest.mark.parametrize("wdtype", W_DTYPES)
@pytest.mark.parametrize("sdtype", SCALE_DTYPES)
def test_reference_special_values(wdtype, sdtype):
    w = special_fp8_table(wdtype)  # every byte: NaN, ±0, subnormals, ±max
    if sdtype in (torch.uint8, E8M0):
        e = torch.tensor([[0, 1], [127, 254]], dtype=torch.uint8)  # 2^-127 (subnormal), 2^-126, 1, 2^127
        s = e if sdtype == torch.uint8 else e.view(sdtype)
    else:
        s = torch.tensor([[1.0, 0.0], [-2.5, 3e38 if sdtype == torch.float32 else 1e4]]).to(sdtype)
    for out_dtype in OUT_DTYPES:
        out = poison_(torch.empty(16, 16, dtype=out_dtype))
        reference.dequant_blockwise_torch(w, s, out, (8, 8))
        assert_equal_within_ulp(out, expected_float64(w, s, (8, 8), out_dtype), ulp=0, what=f"{sdtype} {out_dtype}")


def check_every_byte_special_scales_strided_out(wdtype, sdtype, check_path, what):
    """Every FP8 byte ([96, 1200], strided) against special scales, a block offset and a strided,
    poisoned destination of each output dtype: bitwise to the float64 formula, the rest of the
    destination untouched; ``check_path()`` after each call asserts which path ran."""
    w = special_fp8_table(wdtype).reshape(1, 256).repeat(96, 5)[:, 3:1203]
    if sdtype == torch.uint8:  # grid of rows 40..136 and columns 300..1500 in 64x512 blocks: 3 x 3
        s = torch.tensor([[0, 1, 127], [254, 255, 126], [3, 200, 128]], dtype=torch.uint8)
    else:
        big_scale = 3e38 if sdtype == torch.float32 else 1e4
        s = torch.tensor([[1.0, 0.0, -2.5], [big_scale, 1e-40, float("inf")], [float("nan"), -0.0, 7.0]]).to(sdtype)
    for out_dtype in OUT_DTYPES:
        big = poison_(torch.empty(100, 1300, dtype=out_dtype))
        out = big[2:98, 50:1250]
        reference.dequant_blockwise_torch(w, s, out, (64, 512), block_offset=(40, 300))
        check_path()
        assert_equal_within_ulp(out, expected_float64(w, s, (64, 512), out_dtype, (40, 300)), ulp=0,
                                what=f"{what} {out_dtype}")
        rest = big.clone()
        rest[2:98, 50:1250] = out
        assert_bitwise_equal(big, rest)


@pytest.mark.parametrize("wdtype", W_DTYPES)
@pytest.mark.parametrize("sdtype", [torch.float32, torch.bfloat16, torch.float16, torch.uint8])
def test_reference_cpu_chunks_special_values_offsets_strided_out(wdtype, sdtype, monkeypatch):
    """The CPU path over several chunks (a chunk here is 8 rows): every byte against special
    scales, a block offset and a strided destination, bitwise to the float64 formula; the
    untouched rest of the destination keeps its poison."""
    monkeypatch.setattr(reference, "CPU_CHUNK_ELEMS_PER_THREAD", 9600 // max(1, torch.get_num_threads()))
    check_every_byte_special_scales_strided_out(wdtype, sdtype, lambda: None, f"{wdtype} {sdtype}")


@pytest.mark.parametrize("nan_byte", [0x7F, 0xFF])
def test_reference_cpu_decode_nan_only_in_a_later_chunk(nan_byte, monkeypatch):
    """The NaN-byte check covers the whole tensor, not the first chunk it is made on."""
    monkeypatch.setattr(reference, "CPU_CHUNK_ELEMS_PER_THREAD", 4096 // max(1, torch.get_num_threads()))
    w = torch.full((64, 256), 0x38, dtype=torch.uint8)  # 1.0
    w[60, 200] = nan_byte
    out = poison_(torch.empty(64, 256, dtype=torch.bfloat16))
    reference.dequant_blockwise_torch(w.view(torch.float8_e4m3fn), torch.ones(1, 2), out, (64, 128))
    nan = out.float().isnan()
    assert bool(nan[60, 200]) and int(nan.sum()) == 1
    assert bool((out.float()[~nan] == 1.0).all())


def test_reference_e8m0_nan_scale_gives_nan():
    w = torch.ones(2, 2).to(torch.float8_e4m3fn)
    s = torch.tensor([[255]], dtype=torch.uint8)
    assert ops.dequant_blockwise(w, s, (2, 2), backend="torch").float().isnan().all()


def test_reference_e4m3_nan_stays_nan():
    w = torch.tensor([[0x7F, 0xFF, 0x00, 0x80]], dtype=torch.uint8).view(torch.float8_e4m3fn)
    out = ops.dequant_blockwise(w, torch.ones(1, 1), (1, 4), backend="torch")
    f = out.float()
    assert f[0, :2].isnan().all()
    assert (out.view(torch.int16)[0, 2:] == torch.tensor([0, -32768], dtype=torch.int16)).all()  # +0, -0


@pytest.mark.parametrize("offset", [(0, 0), (5, 77), (130, 3)])
def test_reference_block_offset_is_a_slice_of_the_whole(offset):
    gen = torch.Generator().manual_seed(1)
    whole = random_fp8((300, 400), torch.float8_e4m3fn, gen)
    s = random_scale(grid((300, 400), (128, 128)), torch.float32, gen)
    full = ops.dequant_blockwise(whole, s, backend="torch")
    r0, c0 = offset
    part = ops.dequant_blockwise(whole[r0:r0 + 150, c0:c0 + 200], s, backend="torch", block_offset=offset)
    assert_bitwise_equal(part, full[r0:r0 + 150, c0:c0 + 200])


def test_expanded_scales_baseline_matches_the_reference():
    # The two paths bench/bench_dequant.py --cpu compares agree (speed is measured there, not here).
    w, s = make_case((256, 384), (128, 128), torch.float8_e4m3fn, torch.float32, 3)
    a = ops.dequant_blockwise(w, s, backend="torch")
    b = reference.dequant_expanded_scales_torch(w, s, (128, 128))
    assert_bitwise_equal(a, b)


# ---------------------------------------------------------------- validation (any machine)

def test_errors_are_clear():
    w = torch.zeros(576, 7168).to(torch.float8_e4m3fn)
    with pytest.raises(PyloaderInputError, match="scale shape .* does not match the block grid"):
        ops.dequant_blockwise(w, torch.ones(56, 5))  # transposed scale, same numel
    with pytest.raises(PyloaderInputError, match="scale shape"):
        ops.dequant_blockwise(w, torch.ones(4, 56))  # floor instead of ceil
    with pytest.raises(PyloaderInputError, match="weight must be float8"):
        ops.dequant_blockwise(torch.zeros(4, 4), torch.ones(1, 1))
    with pytest.raises(PyloaderInputError, match="scale dtype"):
        ops.dequant_blockwise(w, torch.ones(5, 56, dtype=torch.float64))
    with pytest.raises(PyloaderInputError, match="out shape"):
        ops.dequant_blockwise(w, torch.ones(5, 56), out=torch.empty(576, 7167, dtype=torch.bfloat16))
    with pytest.raises(PyloaderInputError, match="out must be"):
        ops.dequant_blockwise(w, torch.ones(5, 56), out=torch.empty(576, 7168, dtype=torch.int32))
    with pytest.raises(PyloaderInputError, match="block_size must be positive"):
        ops.dequant_blockwise(w, torch.ones(5, 56), block_size=(0, 128))
    with pytest.raises(PyloaderInputError, match="2-D"):
        ops.dequant_blockwise(w.view(-1), torch.ones(5, 56))


def test_accepts_squeezable_scale_forms():
    w = torch.ones(4, 6).to(torch.float8_e4m3fn)
    per_tensor = ops.dequant_blockwise(w, torch.tensor(2.0), (4, 6), backend="torch")
    assert (per_tensor.float() == 2).all()
    per_row = ops.dequant_blockwise(w, torch.arange(1.0, 5.0), (1, 6), backend="torch")
    assert torch.equal(per_row.float()[:, 0], torch.arange(1.0, 5.0))


def test_zero_size():
    w = torch.empty(0, 128).to(torch.float8_e4m3fn)
    out = ops.dequant_blockwise(w, torch.empty(0, 1), backend="torch")
    assert out.shape == (0, 128)


def test_cuda_backend_without_gpu_is_a_clear_error():
    from pyloader.errors import BackendUnavailableError

    w = torch.ones(4, 4).to(torch.float8_e4m3fn)
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
        ops.dequant_blockwise(w, torch.ones(1, 1), backend="cuda")


# ---------------------------------------------------------------- backends against the reference

CPU_BACKENDS = ["triton"] if HAS_TRITON else []
GPU_BACKENDS = ["cuda", "triton", "triton-bitcast"]
SMALL_CASES = [c for c in CASES if c[0][0] * c[0][1] <= 40000]


def check_backend(backend, w, s, block, out_dtype, offset=(0, 0), out=None, monkeypatch=None, what=""):
    """Run backend into a poisoned destination; compare with the torch reference on the same device."""
    if out is None:
        out = torch.empty(w.shape, dtype=out_dtype, device=w.device)
    poison_(out)
    expected = reference.dequant_blockwise_torch(w, s, torch.empty(w.shape, dtype=out.dtype, device=w.device),
                                                 block, offset)
    got = run(backend, w, s, block, out=out, offset=offset, monkeypatch=monkeypatch)
    assert got is out
    if w.is_cuda:
        assert_bitwise_equal(got, expected, what)
    else:
        assert_equal_within_ulp(got, expected, ulp=1, what=what)


@pytest.mark.skipif(not CPU_BACKENDS or HAS_GPU, reason="interpreter tests: triton installed, no GPU")
@pytest.mark.parametrize("case", SMALL_CASES, ids=case_id)
def test_triton_interpreter_matches_reference(case, monkeypatch):
    """The bit-manipulation FP8 path (the one sm_80 takes; native FP8 casts need sm_89), named."""
    from pyloader.triton_kernels import fp8_upcast_mode

    monkeypatch.setenv("PYLOADER_TRITON_FP8_UPCAST", "bitcast")
    assert fp8_upcast_mode(torch.device("cpu")) == "bitcast"
    shape, kind, wdtype, sdtype, out_dtype, all_bytes = case
    block = block_for(shape, kind)
    w, s = make_case(shape, block, wdtype, sdtype, seed=7, all_bytes=all_bytes)
    check_backend("triton", w, s, block, out_dtype, what=case_id(case))


@pytest.mark.skipif(not CPU_BACKENDS or HAS_GPU, reason="interpreter tests: triton installed, no GPU")
def test_triton_interpreter_strided_out_offsets_and_3d():
    gen = torch.Generator().manual_seed(3)
    whole = random_fp8((3, 70, 90), torch.float8_e4m3fn, gen, all_bytes=True)
    s = random_scale((3,) + grid((70, 90), (32, 32)), torch.float32, gen)
    fused = torch.empty(3, 200, 101, dtype=torch.bfloat16)
    check_backend("triton", whole[:, 5:60, 7:83], s, (32, 32), torch.bfloat16, offset=(5, 7),
                  out=fused[:, 100:155, 3:79], what="3-D strided slice")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gpu_backend_bitwise(backend, case, monkeypatch):
    shape, kind, wdtype, sdtype, out_dtype, all_bytes = case
    block = block_for(shape, kind)
    w, s = make_case(shape, block, wdtype, sdtype, seed=11, all_bytes=all_bytes, device="cuda")
    check_backend(backend, w, s, block, out_dtype, monkeypatch=monkeypatch, what=f"{backend} {case_id(case)}")


@pytest.mark.gpu
def test_gpu_reference_agrees_with_cpu_reference():
    w, s = make_case((576, 7168), (128, 128), torch.float8_e4m3fn, torch.float32, 5, all_bytes=True)
    cpu = ops.dequant_blockwise(w, s, backend="torch")
    gpu = ops.dequant_blockwise(w.cuda(), s.cuda(), backend="torch").cpu()
    assert_equal_within_ulp(gpu, cpu, ulp=0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("sdtype", SCALE_DTYPES)
@pytest.mark.parametrize("wdtype", W_DTYPES)
def test_gpu_special_values(backend, sdtype, wdtype, monkeypatch):
    w = special_fp8_table(wdtype).repeat(8, 16).cuda()  # [128, 256]: every byte in every block
    if sdtype in (torch.uint8, E8M0):
        e = torch.tensor([[0, 1], [127, 254], [255, 3]], dtype=torch.uint8)
        s = e if sdtype == torch.uint8 else e.view(sdtype)
    else:
        s = torch.tensor([[1.0, 0.0], [-2.5, 1e4], [float("nan"), float("inf")]]).to(sdtype)
    for out_dtype in OUT_DTYPES:
        check_backend(backend, w, s.cuda(), (48, 128), out_dtype, monkeypatch=monkeypatch, what=f"{out_dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("aligned", [True, False])
def test_gpu_strided_destination_and_block_offset(backend, aligned, monkeypatch):
    gen = torch.Generator().manual_seed(4)
    whole = random_fp8((3, 700, 1040), torch.float8_e4m3fn, gen, all_bytes=True).cuda()
    s = random_scale((3,) + grid((700, 1040), (128, 128)), torch.bfloat16, gen).cuda()
    fused = torch.empty(3, 2000, 1100, dtype=torch.bfloat16, device="cuda")
    if aligned:  # 16-byte aligned starts and strides: the vector path
        w, out, off = whole[:, 256:600, 128:1040], fused[:, 1000:1344, 64:976], (256, 128)
    else:  # odd starts inside blocks: the scalar path and block-grid offsets
        w, out, off = whole[:, 131:600, 77:1000], fused[:, 1001:1470, 3:926], (131, 77)
    check_backend(backend, w, s, (128, 128), torch.bfloat16, offset=off, out=out, monkeypatch=monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_leaves_the_rest_of_a_fused_parameter_alone(backend, monkeypatch):
    w, s = make_case((300, 520), (128, 128), torch.float8_e4m3fn, torch.float32, 9, device="cuda")
    fused = poison_(torch.empty(1000, 600, dtype=torch.bfloat16, device="cuda"))
    before = fused.clone()
    run(backend, w, s, (128, 128), out=fused[333:633, 40:560], monkeypatch=monkeypatch)
    mask = torch.ones_like(fused, dtype=torch.bool)
    mask[333:633, 40:560] = False
    assert torch.equal(fused.view(torch.int16)[mask], before.view(torch.int16)[mask])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_64bit_offsets(backend):
    # 16500 x 131072 = 2.16e9 elements > 2^31; check the last rows against the reference of that slice.
    M, N = 16500, 131072
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randint(0, 120, (M, N), dtype=torch.uint8, device="cuda", generator=gen).view(torch.float8_e4m3fn)
    s = torch.rand(grid((M, N), (128, 128)), device="cuda", generator=gen)
    out = torch.empty(M, N, dtype=torch.bfloat16, device="cuda")
    out[-3:].view(torch.int16).fill_(0x7FB5)
    ops.dequant_blockwise(w, s, out=out, backend=backend)
    tail = ops.dequant_blockwise(w[-3:], s, backend="torch", block_offset=(M - 3, 0))
    assert_bitwise_equal(out[-3:], tail)
    del w, out
    torch.cuda.empty_cache()
