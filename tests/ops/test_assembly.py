"""Shard and expert assembly (one multi-tensor launch) against an oracle built from whole-tensor
reference dequant, sliced and concatenated with plain torch: bitwise on the GPU and for the CPU
reference, within 1 ulp under the Triton interpreter."""

import pytest
import torch

from pyloader import ops
from pyloader.ops import reference
from pyloader.errors import PyloaderInputError
from pyloader.ops import Shard, TransformJob

from helpers import HAS_GPU, HAS_TRITON, assert_bitwise_equal, assert_equal_within_ulp, poison_, random_fp8, random_scale

E8M0 = getattr(torch, "float8_e8m0fnu", torch.uint8)

BACKENDS = [pytest.param(("torch", "cpu"), id="torch-cpu")]
if HAS_TRITON and not HAS_GPU:
    BACKENDS.append(pytest.param(("triton", "cpu"), id="triton-interpreter"))
BACKENDS += [pytest.param((b, "cuda"), id=f"{b}-gpu", marks=pytest.mark.gpu) for b in ("cuda", "triton", "torch")]


def check(backend, device, got, expected, what=""):
    if backend == "triton" and device == "cpu":
        assert_equal_within_ulp(got, expected, what=what)  # the interpreter rounds toward zero
    else:
        assert_bitwise_equal(got, expected, what=what)


def fp8(shape, seed, wdtype=torch.float8_e4m3fn, sdtype=torch.float32, block=(128, 128), device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    w = random_fp8(shape, wdtype, gen)
    grid = tuple(shape[:-2]) + (-(-shape[-2] // block[0]), -(-shape[-1] // block[1]))
    return w.to(device), random_scale(grid, sdtype, gen).to(device)


def whole_dequant(w, s, block=(128, 128), dtype=torch.bfloat16):
    """Oracle: reference dequant of the whole tensor (slices of it are taken afterwards)."""
    out = torch.empty(w.shape, dtype=dtype, device=w.device)
    return reference.dequant_blockwise_torch(w, s, out, block)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_stack_qkv_fp8_bf16_and_cast(backend_device):
    backend, device = backend_device
    q, qs = fp8((300, 257), 1, device=device)
    k, ks = fp8((77, 257), 2, sdtype=torch.bfloat16, device=device)
    v = torch.randn(50, 257, device=device)  # float32 → bf16 cast
    o = torch.randn(1, 257, device=device).bfloat16()  # same dtype → byte copy
    out = poison_(torch.empty(428, 257, dtype=torch.bfloat16, device=device))
    ops.stack_shards(out, [Shard(q, qs), Shard(k, ks), v, o], backend=backend)
    expected = torch.cat([whole_dequant(q, qs), whole_dequant(k, ks), v.bfloat16(), o])
    check(backend, device, out, expected)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_tensor_parallel_slices_start_inside_blocks(backend_device, world):
    backend, device = backend_device
    # Column-parallel (output rows) q/k/v with sizes no world divides, and a row-parallel (input
    # columns) o_proj: every rank's slice is checked against the slice of the whole dequant.
    q, qs = fp8((333, 200), 3, device=device)
    k, ks = fp8((131, 200), 4, sdtype=torch.float16, device=device)
    o, os_ = fp8((96, 333), 5, block=(32, 48), device=device)
    full_q, full_k, full_o = whole_dequant(q, qs), whole_dequant(k, ks), whole_dequant(o, os_, (32, 48))
    for rank in range(world):
        rq, rk, ro = ops.tp_range(333, rank, world), ops.tp_range(131, rank, world), ops.tp_range(333, rank, world)
        rows = (rq[1] - rq[0]) + (rk[1] - rk[0])
        qkv = poison_(torch.empty(rows, 200, dtype=torch.bfloat16, device=device))
        ops.stack_shards(qkv, [Shard(q, qs, rows=rq), Shard(k, ks, rows=rk)], backend=backend)
        check(backend, device, qkv, torch.cat([full_q[rq[0]:rq[1]], full_k[rk[0]:rk[1]]]), what=f"rank {rank}")
        part = poison_(torch.empty(96, ro[1] - ro[0], dtype=torch.bfloat16, device=device))
        ops.stack_shards(part, [Shard(o, os_, (32, 48), cols=ro)], backend=backend)
        check(backend, device, part, full_o[:, ro[0]:ro[1]], what=f"row-parallel rank {rank}")


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_a_whole_layer_in_one_call(backend_device):
    """assemble_layer: experts (w13 from w1/w3, w2) of an expert-parallel rank and a stacked qkv,
    one job table, each destination as its own call would write it."""
    backend, device = backend_device
    E, I, H = 5, 40, 72
    w1, s1 = fp8((E, I, H), 21, device=device)
    w3, s3 = fp8((E, I, H), 22, device=device)
    w2, s2 = fp8((E, H, I), 23, sdtype=torch.bfloat16, device=device)
    q, qs = fp8((50, H), 24, device=device)
    kv = torch.randn(16, H, device=device)
    emap = ops.ep_expert_map(E, 1, 2)  # experts 3, 4
    w13 = poison_(torch.empty(len(emap), 2 * I, H, dtype=torch.bfloat16, device=device))
    down = poison_(torch.empty(len(emap), H, I, dtype=torch.bfloat16, device=device))
    qkv = poison_(torch.empty(66, H, dtype=torch.bfloat16, device=device))
    ops.assemble_layer(experts=[(w13, {e: [Shard(w1[e], s1[e]), Shard(w3[e], s3[e])] for e in range(E)}),
                                (down, {e: Shard(w2[e], s2[e]) for e in range(E)})],
                       stacks=[(qkv, [Shard(q, qs), kv])], expert_map=emap, backend=backend)
    f1, f3, f2 = whole_dequant(w1, s1), whole_dequant(w3, s3), whole_dequant(w2, s2)
    owned = sorted(emap)
    check(backend, device, w13, torch.stack([torch.cat([f1[e], f3[e]]) for e in owned]))
    check(backend, device, down, torch.stack([f2[e] for e in owned]))
    check(backend, device, qkv, torch.cat([whole_dequant(q, qs), kv.bfloat16()]))
    with pytest.raises(PyloaderInputError, match="one device"):
        ops.assemble_layer(stacks=[(qkv, [q]), (torch.empty(1, H, device="meta"), [kv[:1]])], backend=backend)


def test_tp_range_is_a_balanced_partition():
    for size in (0, 1, 7, 10, 333, 4096):
        for world in (1, 2, 3, 4, 8):
            spans = [ops.tp_range(size, r, world) for r in range(world)]
            assert spans[0][0] == 0 and spans[-1][1] == size
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            lengths = [b - a for a, b in spans]
            assert max(lengths) - min(lengths) <= 1
    assert ops.tp_range(10, 0, 4) == (0, 3) and ops.tp_range(10, 3, 4) == (8, 10)
    with pytest.raises(PyloaderInputError):
        ops.tp_range(10, 4, 4)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_experts_w13_and_w2_with_expert_parallel_subset(backend_device):
    backend, device = backend_device
    E, I, H = 10, 96, 160  # ragged against 128x128 blocks
    w1, s1 = fp8((E, I, H), 6, device=device)
    w3, s3 = fp8((E, I, H), 7, device=device)
    w2, s2 = fp8((E, H, I), 8, sdtype=E8M0, device=device)
    f1, f3, f2 = whole_dequant(w1, s1), whole_dequant(w3, s3), whole_dequant(w2, s2)
    for ep_rank, ep_size in ((0, 1), (1, 3), (2, 3)):
        emap = ops.ep_expert_map(E, ep_rank, ep_size)
        n = len(emap)
        w13 = poison_(torch.empty(n, 2 * I, H, dtype=torch.bfloat16, device=device))
        down = poison_(torch.empty(n, H, I, dtype=torch.bfloat16, device=device))
        # every expert of the checkpoint is offered; only this rank's are written
        ops.assemble_experts(w13, {e: [Shard(w1[e], s1[e]), Shard(w3[e], s3[e])] for e in range(E)},
                             expert_map=emap, backend=backend)
        ops.assemble_experts(down, {e: Shard(w2[e], s2[e]) for e in range(E)}, expert_map=emap, backend=backend)
        owned = sorted(emap)
        check(backend, device, w13, torch.stack([torch.cat([f1[e], f3[e]]) for e in owned]), what=f"ep {ep_rank}")
        check(backend, device, down, torch.stack([f2[e] for e in owned]), what=f"ep {ep_rank} w2")


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_experts_from_prestacked_mix_and_explicit_map(backend_device):
    backend, device = backend_device
    E, I, H = 6, 40, 72
    gate_up_stacked, s_stacked = fp8((E, 2 * I, H), 9, block=(32, 32), device=device)  # one 3-D tensor
    full = whole_dequant(gate_up_stacked, s_stacked, (32, 32))
    loose = torch.randn(2, 2 * I, H, device=device).bfloat16()  # two experts stored per-expert
    experts = ops.unstack_experts(Shard(gate_up_stacked, s_stacked, (32, 32)))  # experts 0..5
    experts.update({6: loose[0], 7: loose[1]})
    emap = {7: 0, 2: 1, 5: 2}  # explicit, out of order
    out = poison_(torch.empty(3, 2 * I, H, dtype=torch.bfloat16, device=device))
    ops.assemble_experts(out, experts, expert_map=emap, backend=backend)
    check(backend, device, out, torch.stack([loose[1], full[2], full[5]]))
    # the pre-stacked tensor itself, identity map
    out = poison_(torch.empty(E, 2 * I, H, dtype=torch.bfloat16, device=device))
    ops.assemble_experts(out, Shard(gate_up_stacked, s_stacked, (32, 32)), backend=backend)
    check(backend, device, out, full)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_more_jobs_than_one_launch_table(backend_device):
    backend, device = backend_device
    E = 300  # the CUDA table holds 224 jobs per launch
    gen = torch.Generator().manual_seed(10)
    w = torch.randn(E, 3, 17, generator=gen).to(device)
    q, s = fp8((E, 5, 33), 11, block=(2, 16), device=device)
    out_copy = poison_(torch.empty(E, 3, 17, dtype=torch.float32, device=device))
    ops.assemble_experts(out_copy, {e: w[e] for e in range(E)}, backend=backend)
    check(backend, device, out_copy, w)
    out = poison_(torch.empty(E, 5, 33, dtype=torch.float16, device=device))
    ops.assemble_experts(out, {e: Shard(q[e], s[e], (2, 16)) for e in range(E)}, backend=backend)
    check(backend, device, out, whole_dequant(q, s, (2, 16), torch.float16))


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_zero_one_and_odd_sized_jobs(backend_device):
    backend, device = backend_device
    shapes = [(0, 9), (1, 9), (2, 9), (7, 9), (0, 9), (128, 9)]
    parts = [random_fp8(s, torch.float8_e5m2, torch.Generator().manual_seed(i)).to(device) for i, s in enumerate(shapes)]
    scales = [torch.full((1, 1), 0.5 + i, device=device) for i in range(len(parts))]  # per-tensor
    out = poison_(torch.empty(138, 9, dtype=torch.bfloat16, device=device))
    ops.stack_shards(out, [Shard(p, s) for p, s in zip(parts, scales)], backend=backend)
    expected = torch.cat([whole_dequant(p, s, (max(1, p.shape[0]), 9)) for p, s in zip(parts, scales)])
    check(backend, device, out, expected)
    one = poison_(torch.empty(1, 1, dtype=torch.bfloat16, device=device))
    ops.stack_shards(one, [Shard(parts[1][:, :1], scales[1])], backend=backend)
    check(backend, device, one, whole_dequant(parts[1][:, :1], scales[1], (1, 1)))
    empty = torch.empty(0, 9, dtype=torch.bfloat16, device=device)
    ops.stack_shards(empty, [torch.empty(0, 9, device=device)], backend=backend)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_sources_in_one_staging_buffer_at_unaligned_offsets(backend_device):
    backend, device = backend_device
    # The executor's layout: many tensors at offsets of one allocation. Odd byte offsets and
    # row strides defeat the 16-byte vector path, so the scalar tail path is exercised.
    gen = torch.Generator().manual_seed(12)
    staging = torch.randint(0, 256, (1 << 16,), dtype=torch.uint8, generator=gen)
    staging = staging.to(device)
    a = staging[3:3 + 37 * 45].view(torch.float8_e4m3fn).view(37, 45)           # odd offset and stride
    b = staging[5000:5000 + 2 * 40 * 45].view(torch.bfloat16).view(40, 45)      # 2-byte aligned only
    c = staging[20001:20001 + 19 * 64].view(torch.float8_e4m3fn).view(19, 64)[:, 1:46]  # strided view
    sa = torch.rand(1, 1, device=device) + 0.5
    sc = (torch.rand(1, 2, device=device) + 0.5).bfloat16()
    big = poison_(torch.empty(100, 47, dtype=torch.bfloat16, device=device))
    out = big[1:97, 1:46]  # destination with odd offset and row stride
    ops.stack_shards(out, [Shard(a, sa), b, Shard(c, sc, (19, 32))], backend=backend)
    expected = torch.cat([whole_dequant(a.contiguous(), sa, (37, 45)), b,
                          whole_dequant(c.contiguous(), sc, (19, 32))])
    check(backend, device, out, expected)
    untouched = big.clone()
    untouched[1:97, 1:46] = expected
    check(backend, device, big, untouched, what="outside the destination view")


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_stack_biases_and_columns(backend_device):
    backend, device = backend_device
    qb, kb = torch.randn(12, device=device), torch.randn(5, device=device)
    bias = poison_(torch.empty(9, dtype=torch.bfloat16, device=device))
    ops.stack_shards(bias, [Shard(qb, rows=(6, 12)), Shard(kb, rows=(2, 5))], backend=backend)
    check(backend, device, bias, torch.cat([qb[6:], kb[2:]]).bfloat16())
    left, right = torch.randn(8, 3, device=device), torch.randn(8, 4, device=device)
    wide = poison_(torch.empty(8, 7, dtype=torch.float32, device=device))
    ops.stack_shards(wide, [left, right], dim=1, backend=backend)
    check(backend, device, wide, torch.cat([left, right], dim=1))


def test_multi_tensor_transform_low_level_and_all_errors():
    src = torch.randn(4, 4)
    dst = poison_(torch.empty(4, 4))
    ops.multi_tensor_transform([TransformJob(src, dst)], backend="torch")
    assert torch.equal(dst, src)
    q, s = fp8((64, 64), 13)
    out = torch.empty(128, 64, dtype=torch.bfloat16)
    cases = [
        (lambda: ops.stack_shards(out, [Shard(q, s)]), "left unwritten"),
        (lambda: ops.stack_shards(out, [Shard(q, s)] * 3), "overflow"),
        (lambda: ops.stack_shards(out, [torch.randn(64, 65)] * 2), "does not fit"),
        (lambda: ops.stack_shards(out, [Shard(q, s[:, :0])] * 2), "scale shape"),
        (lambda: ops.stack_shards(out, [Shard(q, s, rows=(0, 65))] * 2), "outside"),
        (lambda: ops.stack_shards(out, [Shard(torch.randn(64, 64), s)] * 2), "only FP8"),
        (lambda: ops.assemble_experts(torch.empty(2, 64, 64), {0: q.float()}), "slots [1]"),
        (lambda: ops.assemble_experts(torch.empty(2, 64, 64), {0: q.float(), 1: q.float()}, {0: 0, 1: 0}),
         "both map"),
        (lambda: ops.assemble_experts(torch.empty(2, 64, 64), {0: q.float()}, {0: 5}), "outside"),
        (lambda: ops.tp_range(3, 0, 0), "rank"),
    ]
    for fn, needle in cases:
        with pytest.raises(PyloaderInputError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            fn()
    with pytest.raises(PyloaderInputError, match="job 0: cannot cast"):
        ops.multi_tensor_transform([TransformJob(torch.zeros(2, 2, dtype=torch.int32), torch.empty(2, 2))], backend="torch")


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_common_table_tiles_ragged_sliced_unaligned_strided(backend_device):
    """One table of byte copies and E4M3 -> BF16 only (the CUDA common kernel, which cuts 2-D jobs
    into 32-row x 16-unit tiles): ragged edges, a TP slice starting inside a scale block and off
    the vector grid, an odd source offset (scalar path inside tiles), a strided destination."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(21)
    w, s = fp8((333, 1000), 22, device=device)                      # ragged in both dimensions
    b = torch.randn(64, 300, generator=gen).bfloat16().to(device)   # tiled byte copy (600-byte rows)
    staging = torch.randint(0, 256, (40 * 301 + 7,), dtype=torch.uint8, generator=gen).to(device)
    odd = staging[7:].view(torch.float8_e4m3fn).view(40, 301)[:, :300]  # odd offset and row stride
    so = (torch.rand(1, 3, generator=gen) + 0.5).to(device)
    big = poison_(torch.empty(263 + 64 + 40 + 2, 302, dtype=torch.bfloat16, device=device))
    out = big[1:-1, 1:301]  # destination: odd offset, row stride 302
    ops.stack_shards(out, [Shard(w, s, rows=(70, 333), cols=(5, 305)), b, Shard(odd, so, (40, 128))],
                     backend=backend)
    expected = torch.cat([whole_dequant(w, s)[70:, 5:305], b, whole_dequant(odd.contiguous(), so, (40, 128))])
    check(backend, device, out, expected)
    untouched = big.clone()
    untouched[1:-1, 1:301] = expected
    check(backend, device, big, untouched, what="outside the destination view")


def _table_of_jobs(jobs):
    from pyloader.ops.jobs import pack_jobs

    return pack_jobs([j for j in jobs if j.src.numel()]).view(-1).tolist()


def test_cuda_tables_from_addresses_equal_the_tables_of_views():
    """The cuda backend packs its job table from addresses and strides (no tensor views, for host
    time); it must be the table that packing the tensor views of the same call gives, field by field
    (TP slices inside blocks, EP maps, per-tensor / 1-D / E8M0 scales, strided and offset
    destinations, empty parts, casts and byte copies)."""
    from pyloader.ops.assembly import expert_jobs, expert_table, stack_jobs, stack_table

    q, qs = fp8((333, 200), 3)
    k, ks = fp8((131, 200), 4, sdtype=torch.float16)
    o, os_ = fp8((96, 333), 5, block=(32, 48))
    big = torch.empty(100, 47, dtype=torch.bfloat16)
    staging = torch.zeros(1 << 14, dtype=torch.uint8)
    a = staging[3:3 + 37 * 45].view(torch.float8_e4m3fn).view(37, 45)
    c = staging[9001:9001 + 19 * 64].view(torch.float8_e4m3fn).view(19, 64)[:, 1:46]
    stacks = [
        (torch.empty(515, 200, dtype=torch.bfloat16),
         [Shard(q, qs), Shard(k, ks), torch.randn(50, 200), torch.randn(1, 200).bfloat16()], 0),
        (torch.empty(111 + 43, 200, dtype=torch.bfloat16),
         [Shard(q, qs, rows=ops.tp_range(333, 1, 3)), Shard(k, ks, rows=ops.tp_range(131, 2, 3))], 0),
        (torch.empty(96, 111, dtype=torch.bfloat16), [Shard(o, os_, (32, 48), cols=ops.tp_range(333, 2, 3))], 0),
        (big[1:97, 1:46], [Shard(a, torch.rand(1, 1) + 0.5), torch.randn(40, 45).bfloat16(),
                           Shard(c, (torch.rand(1, 2) + 0.5).bfloat16(), (19, 32))], 0),
        (torch.empty(9, dtype=torch.bfloat16), [Shard(torch.randn(12), rows=(6, 12)), Shard(torch.randn(5), rows=(2, 5))], 0),
        (torch.empty(8, 7), [torch.randn(8, 3), torch.randn(8, 4)], 1),
        (torch.empty(10, 9, dtype=torch.bfloat16), [Shard(random_fp8(s, torch.float8_e5m2, torch.Generator()), torch.full((1, 1), 2.0))
                                                    for s in ((0, 9), (1, 9), (0, 9), (9, 9))], 0),
    ]
    for i, (out, shards, dim) in enumerate(stacks):
        assert stack_table(out, shards, dim) == _table_of_jobs(stack_jobs(out, shards, dim)), f"stack case {i}"
    E, I, H = 10, 96, 160
    w1, s1 = fp8((E, I, H), 6)
    w3, s3 = fp8((E, I, H), 7)
    w2, s2 = fp8((E, H, I), 8, sdtype=E8M0)
    stacked, ss = fp8((6, 80, 72), 9, block=(32, 32))
    mixed = ops.unstack_experts(Shard(stacked, ss, (32, 32)))
    mixed.update({6: torch.randn(80, 72).bfloat16(), 7: torch.randn(80, 72).bfloat16()})
    wide = torch.empty(3, I, H + 8, dtype=torch.bfloat16)[:, :, 4:4 + H]  # strided expert planes
    experts = [
        (torch.empty(3, 2 * I, H, dtype=torch.bfloat16), {e: [Shard(w1[e], s1[e]), Shard(w3[e], s3[e])] for e in range(E)},
         ops.ep_expert_map(E, 1, 3), 0),
        (torch.empty(3, H, I, dtype=torch.float32), {e: Shard(w2[e], s2[e]) for e in range(E)}, ops.ep_expert_map(E, 2, 3), 0),
        (torch.empty(3, 80, 72, dtype=torch.bfloat16), mixed, {7: 0, 2: 1, 5: 2}, 0),
        (torch.empty(6, 80, 72, dtype=torch.bfloat16), Shard(stacked, ss, (32, 32)), None, 0),
        (wide, {e: [Shard(w1[e], s1[e])] for e in range(3)}, None, 0),
        (torch.empty(2, I, 2 * H, dtype=torch.bfloat16), {e: [Shard(w1[e], s1[e]), Shard(w3[e], s3[e])] for e in range(2)},
         None, 1),
        # ranges given as lists (not hashable: every expert is checked on its own), slices inside blocks
        (torch.empty(3, 50, H, dtype=torch.bfloat16), {e: Shard(w1[e], s1[e], rows=[30, 80]) for e in range(3)}, None, 0),
    ]
    for i, (out, ex, emap, dim) in enumerate(experts):
        assert expert_table(out, ex, emap, dim) == _table_of_jobs(expert_jobs(out, ex, emap, dim)), f"expert case {i}"


def test_cuda_tables_refuse_what_the_job_path_refuses():
    from pyloader.ops.assembly import expert_table, stack_table

    q, s = fp8((64, 64), 13)
    out = torch.empty(128, 64, dtype=torch.bfloat16)
    cases = [
        (lambda: stack_table(out, [Shard(q, s)]), "left unwritten"),
        (lambda: stack_table(out, [Shard(q, s)] * 3), "overflow"),
        (lambda: stack_table(out, [torch.randn(64, 65)] * 2), "does not fit destination \\(128, 64\\)"),
        (lambda: stack_table(out, [Shard(q, s[:, :0])] * 2), "scale shape"),
        (lambda: stack_table(out, [Shard(q, s, rows=(0, 65))] * 2), "outside"),
        (lambda: stack_table(out, [Shard(torch.randn(64, 64), s)] * 2), "only FP8"),
        (lambda: stack_table(out, [torch.zeros(64, 64, dtype=torch.int32)] * 2), "job 0: cannot cast"),
        (lambda: stack_table(out, [Shard(q, s.to(torch.int16))] * 2), "job 0: unsupported scale dtype"),
        (lambda: stack_table(out, [q.float().t()] * 2), "job 0: source must have unit stride"),
        (lambda: stack_table(torch.empty(64, 128, dtype=torch.bfloat16).t(), [q.float()] * 2),
         "job 0: destination must have unit stride"),
        (lambda: stack_table(out, [Shard(q, s.to("meta"))] * 2), "job 0: scale on meta"),
        (lambda: stack_table(out, [q.float().to("meta")] * 2), "job 0: source on meta"),
        (lambda: expert_table(torch.empty(2, 64, 64), {0: q.float()}), "slots \\[1\\]"),
        (lambda: expert_table(torch.empty(2, 64, 64), {0: q.float(), 1: torch.randn(64, 3)}),
         "expert 1 \\(local slot 1\\): shard 0 of shape \\(64, 3\\) does not fit destination \\(64, 64\\)"),
        (lambda: expert_table(torch.empty(2, 64, 64), {0: q.float(), 1: q.float()}, {0: 0, 1: 0}), "both map"),
        (lambda: expert_table(torch.empty(2, 64, 64), {0: q.float()}, {0: 5}), "outside"),
        (lambda: expert_table(torch.empty(64, 64), {0: q.float()}), "must be 3-D"),
    ]
    for fn, needle in cases:
        with pytest.raises(PyloaderInputError, match=needle):
            fn()


def test_cuda_tables_equal_the_tables_of_views_on_random_layers():
    """Randomized: layers of experts with random shapes, row/column slices starting anywhere,
    scale dtypes and block shapes, per-tensor scales, casts, byte copies and strided destinations,
    many experts alike (the reused rows) and some not."""
    from pyloader.ops.assembly import expert_jobs, expert_table

    gen = torch.Generator().manual_seed(17)

    def rnd(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    for case in range(40):
        E, M, N = rnd(1, 6), rnd(1, 70), rnd(1, 90)
        bm, bn = rnd(1, 40), rnd(1, 50)
        kind = case % 4  # dequant, per-tensor dequant, cast, byte copy
        sdtype = [torch.float32, torch.bfloat16, torch.float16, E8M0][case % 4]
        parts = rnd(1, 3)
        src_rows = [rnd(M, M + 30) for _ in range(parts)]
        taken = []
        for p in range(parts):
            rows = M
            a = rnd(0, src_rows[p] - rows)
            taken.append((a, a + rows))
        out_dtype = [torch.bfloat16, torch.float16, torch.float32][case % 3]
        width = N + rnd(0, 5)
        base = torch.empty(E + 1, parts * M, width, dtype=out_dtype if kind != 3 else torch.bfloat16)
        out = base[1:, :, width - N:] if case % 2 else base[:E, :, :N]
        weights = []
        for p in range(parts):
            if kind in (0, 1):
                w = random_fp8((E, src_rows[p], N), torch.float8_e4m3fn, gen)
                if kind == 0:
                    s = random_scale((E, -(-src_rows[p] // bm), -(-N // bn)), sdtype, gen)
                else:
                    s = torch.rand(E, 1, 1, generator=gen) + 0.5
                weights.append((w, s))
            elif kind == 2:
                weights.append((torch.randn(E, src_rows[p], N, generator=gen), None))
            else:
                weights.append((torch.randn(E, src_rows[p], N, generator=gen).bfloat16(), None))
        alike = rnd(0, 1)
        experts = {}
        for e in range(E):
            ranges = taken if (alike or e % 2) else [(0, M)] * parts
            experts[e] = [Shard(w[e], None if s is None else s[e], (bm, bn) if kind == 0 else (128, 128), rows=r)
                          for (w, s), r in zip(weights, ranges)]
        want = _table_of_jobs(expert_jobs(out, experts))
        assert expert_table(out, experts) == want, f"case {case}"
