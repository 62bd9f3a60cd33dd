"""Packed 4-bit formats (FP4 E2M1, INT4), NVFP4's second-level scale and the sanity-gate maxima:
the torch reference against an independent float32 formula written here in numpy (every code,
every special scale), every backend against the reference (bitwise on the GPU, within 1 bf16
ulp under the Triton interpreter), and the errors."""

import numpy as np
import pytest
import torch

from pyloader import ops
from pyloader.errors import PyloaderInputError
from pyloader.ops import TransformJob, multi_tensor_transform

from helpers import HAS_TRITON, assert_bitwise_equal, assert_equal_within_ulp, poison_
from quantizers import E8M0, formula

OUT_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def formula_maxima(w, cols, packing, scale, block, offset=(0, 0), g=None, mode="mul"):
    v = formula(w, cols, packing, scale, block, offset, g, mode, torch.float32)
    x = formula(w, cols, packing, None, block)
    return torch.stack([v.abs().max() if not v.isnan().any() else torch.tensor(float("nan")), x.abs().max()])


# ---------------------------------------------------------------- data

def every_byte(rows: int, nbytes: int) -> torch.Tensor:
    """Rows that hold every byte value (every code in both nibble positions)."""
    return (torch.arange(rows * nbytes, dtype=torch.int64) * 7 % 256).to(torch.uint8).view(rows, nbytes)


def special_scales(kind: str, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    n = int(np.prod(shape))
    if kind in ("e8m0", "u8"):
        specials = torch.tensor([0, 1, 2, 127, 128, 253, 254, 255], dtype=torch.uint8)
        s = torch.randint(100, 140, (n,), dtype=torch.uint8, generator=gen)
        s[: len(specials)] = specials[: n]
        s = s.view(shape)
        return s.view(E8M0) if kind == "e8m0" else s
    if kind == "e4m3":
        s = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
        s[:6] = torch.tensor([0x7F, 0x01, 0x80, 0x7E, 0x00, 0xFF], dtype=torch.uint8)[: n]
        return s.view(shape).view(torch.float8_e4m3fn)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[kind]
    s = torch.rand(n, generator=gen) * 1e-2 + 1e-4
    s[:5] = torch.tensor([0.0, -1.5, float("inf"), float("nan"), 1e-30])[: n]
    return s.view(shape).to(dtype)


SCALE_KINDS = ["e8m0", "u8", "e4m3", "f32", "bf16", "f16"]
if E8M0 is None:
    SCALE_KINDS.remove("e8m0")


# ---------------------------------------------------------------- the reference against the formula

@pytest.mark.parametrize("packing", ["e2m1", "int4"])
@pytest.mark.parametrize("kind", SCALE_KINDS)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
def test_reference_every_code_every_special_scale(packing, kind, out_dtype):
    w = every_byte(24, 64)  # 128 values a row
    group = 16 if kind == "e4m3" else 32
    s = special_scales(kind, (24, 128 // group))
    out = poison_(torch.empty(24, 128, dtype=out_dtype))
    amax = torch.zeros(2)
    ops.dequant_packed(w, s, packing, block_size=(1, group), out=out, backend="torch", amax=amax)
    assert_equal_within_ulp(out, formula(w, 128, packing, s, (1, group), out_dtype=out_dtype), ulp=0,
                            what=f"{packing} {kind} {out_dtype}")
    want = formula_maxima(w, 128, packing, s, (1, group))
    assert torch.equal(amax.isnan(), want.isnan()) and torch.equal(amax[~want.isnan()], want[~want.isnan()])


@pytest.mark.parametrize("mode", ["mul", "div"])
@pytest.mark.parametrize("g", [0.5, 3.0e-3, 448.0 * 6, 1e-40])
def test_reference_nvfp4_second_level_scale(mode, g):
    w = every_byte(32, 48)
    s = special_scales("e4m3", (32, 6))
    gs = torch.tensor([g], dtype=torch.float32)
    form = "modelopt" if mode == "mul" else "compressed-tensors"
    out = ops.dequant_nvfp4(w, s, gs, form=form, backend="torch")
    assert_equal_within_ulp(out, formula(w, 96, "e2m1", s, (1, 16), g=gs, mode=mode), ulp=0, what=f"{mode} {g}")


def test_nvfp4_forms_differ_where_they_should():
    """The multiplier and divisor forms are not the same number: a divisor read as a multiplier
    is off by g^2."""
    w = torch.full((1, 8), 0x22, dtype=torch.uint8)  # 1.0 everywhere
    s = torch.ones(1, 1).to(torch.float8_e4m3fn)
    g = torch.tensor([4.0])
    mul = ops.dequant_nvfp4(w, s, g, form="modelopt", backend="torch", out_dtype=torch.float32)
    div = ops.dequant_nvfp4(w, s, g, form="compressed-tensors", backend="torch", out_dtype=torch.float32)
    assert (mul == 4.0).all() and (div == 0.25).all()


def test_int4_every_value_in_every_nibble_position():
    """Each of q = -8..7 in each of the eight nibbles of an int32 word (least significant first)."""
    words = []
    for pos in range(8):
        for q in range(16):
            words.append(((q << (4 * pos)) | (0x8 * sum(1 << (4 * p) for p in range(8) if p != pos))) & 0xFFFFFFFF)
    w = torch.tensor(words, dtype=torch.int64).to(torch.int32).view(16, 8)  # 128 words, 16 rows
    s = torch.ones(16, 2, dtype=torch.bfloat16)
    out = ops.dequant_int4(w, s, group_size=32, backend="torch", out_dtype=torch.float32)
    got = out.view(128, 8)  # word k's eight values
    for k, word in enumerate(words):
        pos, q = divmod(k, 16)
        expect = [0.0] * 8
        expect[pos] = float(q - 8)
        assert got[k].tolist() == expect, (pos, q, got[k].tolist())


def test_int4_weight_shape_narrower_than_the_words():
    """compressed-tensors pads the last word: K = 44 in 6 words; the padding is never written."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randint(-2 ** 31, 2 ** 31 - 1, (5, 6), dtype=torch.int64, generator=gen).to(torch.int32)
    s = (torch.rand(5, 2, generator=gen) + 0.5).to(torch.bfloat16)
    out = ops.dequant_int4(w, s, cols=44, group_size=32, backend="torch")
    assert out.shape == (5, 44)
    assert_bitwise_equal(out, formula(w, 44, "int4", s, (1, 32)))


def test_mxfp4_gpt_oss_layout():
    gen = torch.Generator().manual_seed(4)
    blocks = torch.randint(0, 256, (3, 7, 5, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(110, 135, (3, 7, 5), dtype=torch.uint8, generator=gen)
    out = ops.dequant_mxfp4(blocks, scales, backend="torch")
    assert out.shape == (3, 7, 160)
    assert_bitwise_equal(out, formula(blocks.reshape(3, 7, 80), 160, "e2m1", scales, (1, 32)))


@pytest.mark.parametrize("offset", [(0, 16), (3, 40), (1, 8)])
def test_tp_slice_starting_inside_a_group(offset):
    """A column slice of the packed weight that starts inside a scale group (block_offset) equals
    the same slice of the whole tensor's dequant."""
    gen = torch.Generator().manual_seed(5)
    whole = torch.randint(0, 256, (20, 64), dtype=torch.uint8, generator=gen)  # 128 values a row
    s = special_scales("u8", (20, 4))
    full = ops.dequant_fp4(whole, s, 32, backend="torch")
    r0, c0 = offset
    part = ops.dequant_fp4(whole[r0:r0 + 10, c0 // 2:c0 // 2 + 24], s[r0:], 32, backend="torch",
                           block_offset=(0, c0))
    assert_bitwise_equal(part, full[r0:r0 + 10, c0:c0 + 48])


def test_reference_over_several_cpu_chunks(monkeypatch):
    from pyloader.ops import reference

    monkeypatch.setattr(reference, "CPU_CHUNK_ELEMS_PER_THREAD", 1000 // max(1, torch.get_num_threads()))
    w = every_byte(40, 100)
    s = special_scales("bf16", (40, 7))
    amax = torch.zeros(2)
    out = ops.dequant_packed(w, s, "int4", block_size=(1, 32), backend="torch", amax=amax)
    assert_equal_within_ulp(out, formula(w, 200, "int4", s, (1, 32)), ulp=0)
    assert torch.isnan(amax[0]) and amax[1] == 8.0


# ---------------------------------------------------------------- gate maxima of other jobs

def test_gate_of_an_fp8_job_and_a_cast():
    w = torch.tensor([[1.0, -448.0], [0.5, 2.0]]).to(torch.float8_e4m3fn)
    slot = torch.zeros(2)
    out = torch.empty(2, 2, dtype=torch.bfloat16)
    multi_tensor_transform([TransformJob(w, out, torch.tensor([[2.0 ** 100]]), (2, 2), amax=slot)], backend="torch")
    assert slot.tolist() == [448.0 * 2.0 ** 100, 448.0]
    slot2 = torch.zeros(2)
    x = torch.tensor([[3.0, -7.0]])
    multi_tensor_transform([TransformJob(x, torch.empty(1, 2, dtype=torch.bfloat16), amax=slot2)], backend="torch")
    assert slot2.tolist() == [7.0, 7.0]


def test_gate_slot_accumulates_over_jobs():
    slot = torch.tensor([5.0, 1.0])
    w = torch.full((2, 4), 0x22, dtype=torch.uint8)  # 1.0
    ops.dequant_fp4(w, torch.full((2, 1), 127, dtype=torch.uint8), 32, backend="torch", amax=slot)
    assert slot.tolist() == [5.0, 1.0]
    ops.dequant_fp4(w, torch.full((2, 1), 130, dtype=torch.uint8), 32, backend="torch", amax=slot)
    assert slot.tolist() == [8.0, 1.0]


# ---------------------------------------------------------------- backends

def mixed_jobs(device, out_dtype, gen):
    """A table of every job kind: packed FP4/INT4 with group scales (E8M0, E4M3 + second level
    both ways, BF16), a TP slice inside a group, ragged columns, FP8 with a gate, a plain copy,
    strided destinations; returns (jobs, destinations, slots)."""
    def dst(rows, cols, dtype=out_dtype):
        big = poison_(torch.empty(rows + 3, cols + 40, dtype=dtype, device=device))
        return big, big[1:rows + 1, 8:cols + 8]

    jobs, bigs, slots = [], [], []

    def add(src, d, scale=None, block=(1, 1), offset=(0, 0), packing=None, g=None, mode="mul", gate=True):
        slot = torch.zeros(2, device=device) if gate else None
        jobs.append(TransformJob(src, d, scale, block, offset, packing, g, mode, slot))
        slots.append(slot)

    w = torch.randint(0, 256, (130, 200), dtype=torch.uint8, generator=gen).to(device)
    s = special_scales("u8", (130, 13)).to(device)
    big, d = dst(130, 400)
    add(w, d, s, (1, 32), packing="e2m1")
    bigs.append(big)
    w4 = torch.randint(-2 ** 31, 2 ** 31 - 1, (70, 32), dtype=torch.int64, generator=gen).to(torch.int32).to(device)
    s4 = special_scales("bf16", (70, 8)).to(device)
    big, d = dst(70, 250)  # ragged: 250 of 256 values
    add(w4, d, s4, (1, 32), packing="int4")
    bigs.append(big)
    wn = torch.randint(0, 256, (33, 72), dtype=torch.uint8, generator=gen).to(device)
    sn = special_scales("e4m3", (33, 9)).to(device)
    for mode in ("mul", "div"):
        big, d = dst(33, 144)
        add(wn, d, sn, (1, 16), packing="e2m1", g=torch.tensor([0.37], device=device), mode=mode)
        bigs.append(big)
    big, d = dst(20, 48)  # TP slice: columns 16..64 of the whole, starting inside group 0
    add(w[:20, 8:32], d, s, (1, 32), offset=(0, 16), packing="e2m1")
    bigs.append(big)
    f8 = (torch.randn(64, 300, generator=gen) * 50).to(torch.float8_e4m3fn).to(device)
    big, d = dst(64, 300)
    add(f8, d, torch.rand(1, 3, generator=gen).to(device) + 0.1, (64, 128))
    bigs.append(big)
    big, d = dst(64, 300, torch.float8_e4m3fn)
    add(f8, d, gate=False)  # a plain copy beside them
    bigs.append(big)
    return jobs, bigs, slots


def run_backend(backend, jobs, monkeypatch):
    if backend == "triton-bitcast":
        monkeypatch.setenv("PYLOADER_TRITON_FP8_UPCAST", "bitcast")
        backend = "triton"
    multi_tensor_transform(jobs, backend=backend)


def check_against_reference(backend, device, monkeypatch, ulp):
    for out_dtype in OUT_DTYPES:
        gen = torch.Generator().manual_seed(11)
        jobs, bigs, slots = mixed_jobs(device, out_dtype, gen)
        gen = torch.Generator().manual_seed(11)
        ref_jobs, ref_bigs, ref_slots = mixed_jobs(device, out_dtype, gen)
        multi_tensor_transform(ref_jobs, backend="torch")
        run_backend(backend, jobs, monkeypatch)
        for i, (a, b) in enumerate(zip(bigs, ref_bigs)):
            what = f"{backend} {out_dtype} job {i}"
            if ulp:
                if b.dtype in OUT_DTYPES:  # the interpreter mishandles subnormal outputs: left out there
                    sub = (b.float().abs() < torch.finfo(b.dtype).tiny) & (b.float() != 0)
                    a, b = a.masked_fill(sub, 0), b.masked_fill(sub, 0)
                assert_equal_within_ulp(a, b, ulp=ulp, what=what)
            else:
                assert_bitwise_equal(a, b, what=what)
        for i, (a, b) in enumerate(zip(slots, ref_slots)):
            if a is not None:
                assert torch.equal(a.isnan(), b.isnan()), f"job {i} gate NaN"
                assert torch.equal(a[~a.isnan()], b[~b.isnan()]), f"job {i} gate {a.tolist()} != {b.tolist()}"


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_triton_interpreter_matches_reference(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the GPU test covers triton")
    check_against_reference("triton-bitcast", "cpu", monkeypatch, ulp=1)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "triton-bitcast"])
def test_gpu_backends_bitwise(backend, monkeypatch):
    check_against_reference(backend, "cuda", monkeypatch, ulp=0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_public_ops_3d_experts(backend):
    gen = torch.Generator().manual_seed(12)
    w = torch.randint(0, 256, (5, 96, 64), dtype=torch.uint8, generator=gen)
    s = torch.randint(110, 135, (5, 96, 4), dtype=torch.uint8, generator=gen)
    expect = ops.dequant_fp4(w, s, 32, backend="torch")
    got = ops.dequant_fp4(w.cuda(), s.cuda(), 32, backend=backend)
    assert_bitwise_equal(got.cpu(), expect)
    w4 = torch.randint(-2 ** 31, 2 ** 31 - 1, (4, 33, 8), dtype=torch.int64, generator=gen).to(torch.int32)
    s4 = (torch.rand(4, 33, 2, generator=gen) + 0.5).to(torch.bfloat16)
    assert_bitwise_equal(ops.dequant_int4(w4.cuda(), s4.cuda(), backend=backend).cpu(),
                         ops.dequant_int4(w4, s4, backend="torch"))


# ---------------------------------------------------------------- errors

def test_errors_name_the_problem():
    w = torch.zeros(4, 16, dtype=torch.uint8)
    with pytest.raises(PyloaderInputError, match="scale shape"):
        ops.dequant_fp4(w, torch.zeros(4, 2, dtype=torch.uint8), 32)  # per-16 grid given for per-32
    with pytest.raises(PyloaderInputError, match="must be uint8, int8 or int32"):
        ops.dequant_fp4(w.to(torch.float8_e4m3fn), torch.zeros(4, 1, dtype=torch.uint8), 32)  # FP4 bytes typed FP8
    with pytest.raises(PyloaderInputError, match="must be int32"):
        ops.dequant_int4(w, torch.zeros(4, 4, dtype=torch.bfloat16))
    with pytest.raises(PyloaderInputError, match="float32"):
        ops.dequant_nvfp4(w, torch.zeros(4, 2).to(torch.float8_e4m3fn), torch.tensor([1.0], dtype=torch.bfloat16))
    with pytest.raises(PyloaderInputError, match="unknown packing"):
        ops.dequant_packed(w, None, "e3m0")
    with pytest.raises(PyloaderInputError, match="MXFP4 blocks"):
        ops.dequant_mxfp4(w.view(4, 1, 16), torch.zeros(4, 2, dtype=torch.uint8))
    job = TransformJob(w, torch.empty(4, 30, dtype=torch.bfloat16), packing="e2m1")
    with pytest.raises(PyloaderInputError, match="does not hold destination"):
        job.validate()
    job = TransformJob(w, torch.empty(4, 32, dtype=torch.bfloat16), torch.ones(4, 1), (1, 32), packing="e2m1",
                       global_scale=torch.tensor([1.0]), global_mode="pow")
    with pytest.raises(PyloaderInputError, match="global_mode"):
        job.validate()
    job = TransformJob(w, torch.empty(4, 32, dtype=torch.bfloat16), packing="e2m1", amax=torch.zeros(3))
    with pytest.raises(PyloaderInputError, match="gate slot"):
        job.validate()
    same = torch.zeros(2, 2)
    with pytest.raises(PyloaderInputError, match="no gate"):
        TransformJob(same, torch.empty(2, 2), amax=torch.zeros(2)).validate()


# ---------------------------------------------------------------- whole MoE layers of packed experts

def packed_layer(device, gen, E=6, I=48, H=64, packing="e2m1"):
    """Per-expert gate/up/down of one layer as packed shards (FP4 + E8M0, or INT4 + bf16 with a
    padded last word), a gate slot per expert, and the torch expected w13/w2."""
    def weight(m, n):
        if packing == "e2m1":
            return torch.randint(0, 256, (m, n // 2), dtype=torch.uint8, generator=gen)
        return torch.randint(-2 ** 31, 2 ** 31 - 1, (m, -(-n // 8)), dtype=torch.int64, generator=gen).to(torch.int32)

    def scale(m, n):
        if packing == "e2m1":
            return torch.randint(115, 135, (m, -(-n // 32)), dtype=torch.uint8, generator=gen)
        return (torch.rand(m, -(-n // 32), generator=gen) + 0.25).to(torch.bfloat16)

    def shard(m, n):
        w, s = weight(m, n), scale(m, n)
        return ops.Shard(w.to(device), s.to(device), (1, 32), packing=packing, packed_cols=n,
                         amax=torch.zeros(2, device=device))

    experts = {e: [shard(I, H), shard(I, H)] for e in range(E)}
    down = {e: shard(H, I + 4 if packing == "int4" else I) for e in range(E)}
    return experts, down


@pytest.mark.parametrize("packing", ["e2m1", "int4"])
def test_assemble_packed_experts_with_tp_slices(packing):
    """w13 from gate/up (rows of a TP rank) and w2 (columns of a TP rank, starting inside a scale
    group) of packed experts, against each expert dequantized whole and then sliced."""
    gen = torch.Generator().manual_seed(21)
    experts, down = packed_layer("cpu", gen, packing=packing)
    I, H = 48, 64
    n_down = down[0].packed_cols
    rows = (12, 36)  # a rank's rows of gate/up
    cols = (16, n_down)  # a rank's columns of down: starts inside group 0
    w13 = poison_(torch.empty(len(experts), 2 * (rows[1] - rows[0]), H, dtype=torch.bfloat16))
    w2 = poison_(torch.empty(len(experts), H, cols[1] - cols[0], dtype=torch.bfloat16))
    ex = {e: [ops.Shard(**{**p.__dict__, "rows": rows}) for p in parts] for e, parts in experts.items()}
    dn = {e: ops.Shard(**{**p.__dict__, "cols": cols}) for e, p in down.items()}
    ops.assemble_layer(experts=[(w13, ex), (w2, dn)], backend="torch")
    for e in experts:
        whole = [ops.dequant_packed(p.weight, p.scale, packing, cols=H, backend="torch") for p in experts[e]]
        assert_bitwise_equal(w13[e], torch.cat([t[rows[0]:rows[1]] for t in whole]), f"w13 expert {e}")
        d = ops.dequant_packed(down[e].weight, down[e].scale, packing, cols=n_down, backend="torch")
        assert_bitwise_equal(w2[e], d[:, cols[0]:cols[1]], f"w2 expert {e}")
        assert float(ex[e][0].amax[1]) > 0 and float(dn[e].amax[0]) > 0


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("packing", ["e2m1", "int4"])
def test_gpu_assemble_packed_experts(backend, packing):
    """One launch for a packed layer (templates reused across alike experts, each with its own
    gate slot) against the torch backend, bitwise, slots included."""
    results = []
    for be in ("torch", backend):
        gen = torch.Generator().manual_seed(22)
        experts, down = packed_layer("cuda", gen, E=40, packing=packing)
        w13 = poison_(torch.empty(40, 96, 64, dtype=torch.bfloat16, device="cuda"))
        w2 = poison_(torch.empty(40, 64, down[0].packed_cols, dtype=torch.bfloat16, device="cuda"))
        ops.assemble_layer(experts=[(w13, experts), (w2, down)], backend=be)
        slots = torch.stack([p.amax for parts in experts.values() for p in parts] + [p.amax for p in down.values()])
        results.append((w13, w2, slots))
    (a13, a2, aslots), (b13, b2, bslots) = results
    assert_bitwise_equal(b13, a13, "w13")
    assert_bitwise_equal(b2, a2, "w2")
    assert torch.equal(aslots, bslots)
