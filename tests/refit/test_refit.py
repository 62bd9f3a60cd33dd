"""Refit: trainer tensors (HF names, BF16) → buckets → a rollout model's parameters, BF16 or
requantized to block FP8, compared bitwise with a reference built independently (each fusion by
hand, ``quantize_blockwise`` per parameter); across processes by gloo broadcast and by shared
memory; stale, foreign and corrupted buckets refused before anything is written."""

import os

import pytest
import torch
import torch.multiprocessing as mp

import pyloader
from pyloader.ops import reference
from pyloader.refit import BucketLayout, RefitError, Refitter, Sender, broadcast, open_shared, share
from pyloader.routing.plan import PlanError
from pyloader.routing.presets import build_preset
from pyloader.synthetic import allocate_targets, with_fp8_weights, write_checkpoint

from hand_reference import expected_tensor, raw_tensors
from helpers import assert_bitwise_equal, poison_
from tiny_models import TINY

# FP8 rollouts quantize each parameter in 128-row blocks: the fused shards start on block rows here.
ALIGNED = {
    "qwen3_moe": dict(TINY["qwen3_moe"], moe_intermediate_size=128),
    "deepseek_v3": dict(TINY["deepseek_v3"], q_lora_rank=128, intermediate_size=256, moe_intermediate_size=128),
}


def trainer_tensors(tmp_path, c, seed=0):
    """The trainer's state: every HF-named tensor in BF16 (what a checkpoint of it holds)."""
    return raw_tensors(write_checkpoint(tmp_path / f"ck{seed}", c, fp8=False, seed=seed, shard_bytes=1 << 20))


def rollout_params(c, device, fp8=False, parallel=None):
    """The rollout model: the preset's targets, linear weights FP8 with float32 block scales."""
    pre = build_preset(c, parallel=parallel) if parallel is not None else build_preset(c)
    params = allocate_targets(pre.targets, device)
    return {n: poison_(t) for n, t in (with_fp8_weights(params) if fp8 else params).items()}


def expected_params(params, raw, c, scale_fmt="float"):
    """Independently: each parameter routed by hand in BF16, then quantized on its own."""
    out = {}
    for name, t in params.items():
        if name.endswith("_scale_inv"):
            continue
        want = expected_tensor(name, raw, c, torch.bfloat16 if t.dtype == torch.float8_e4m3fn else t.dtype)
        if t.dtype == torch.float8_e4m3fn:
            q, s = reference.quantize_blockwise_torch(want, (128, 128), scale_fmt=scale_fmt)
            out[name], out[name + "_scale_inv"] = q, s
        else:
            out[name] = want
    return out


def check(params, want, what=""):
    assert set(params) == set(want)
    for name in params:
        assert_bitwise_equal(params[name].cpu(), want[name].cpu(), what=f"{what} {name}")


def test_layout_packs_aligned_per_layer_and_round_trips_json(tmp_path):
    raw = trainer_tensors(tmp_path, TINY["qwen3_moe"])
    layout = BucketLayout.of(raw, bucket_bytes=1 << 20, per_layer=True)
    assert BucketLayout.from_json(layout.to_json()) == layout
    for e in layout.entries:
        assert e.offset % 256 == 0 and e.offset >= 256 and e.offset + e.nbytes <= layout.sizes[e.bucket]
    layers = {}
    for e in layout.entries:
        if ".layers." in e.name:
            layers.setdefault(e.bucket, set()).add(e.name.split(".layers.")[1].split(".")[0])
    assert all(len(v) == 1 for v in layers.values())  # a bucket never mixes two layers
    whole = BucketLayout.of(raw, bucket_bytes=1 << 40)
    assert whole.num_buckets == 1 and whole.payload_bytes == sum(t.numel() * t.element_size() for t in raw.values())
    sender = Sender(layout, "cpu")
    sender.pack(raw, version=3)
    for k in range(layout.num_buckets):
        for name, view in layout.views(sender.buckets, k).items():
            assert_bitwise_equal(view, raw[name], what=name)


def test_layout_json_that_does_not_fit_is_refused():
    layout = BucketLayout.of({"a": torch.zeros(10, 10), "b": torch.zeros(3)})
    text = layout.to_json().replace('"offset": 256', '"offset": 100')
    with pytest.raises(pyloader.PyloaderInputError, match="does not fit"):
        BucketLayout.from_json(text)
    with pytest.raises(pyloader.PyloaderInputError, match="not a layout"):
        BucketLayout.from_json("{}")


@pytest.mark.parametrize("family", sorted(ALIGNED))
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_refit_matches_hand_built_reference(tmp_path, family, fp8, device):
    c = ALIGNED[family]
    raw = trainer_tensors(tmp_path, c)
    layout = BucketLayout.of(raw, bucket_bytes=1 << 20, per_layer=True)
    sender = Sender(layout, device)
    params = rollout_params(c, device, fp8)
    refitter = Refitter(params, layout, sender.buckets, config=c)
    sender.pack({n: t.to(device) for n, t in raw.items()}, version=1)
    report = refitter.step(1)
    assert report.bytes == layout.payload_bytes and report.verified
    assert set(report.written) == set(params) and sorted(report.checksums) == list(range(layout.num_buckets))
    check(params, expected_params(params, raw, c), f"{family} {device}")
    # bucket by bucket as they arrive (one launch a bucket, any order) writes the same
    for t in params.values():
        poison_(t)
    for k in reversed(range(layout.num_buckets)):
        refitter.apply(k, 1)
    refitter.finish(1)
    check(params, expected_params(params, raw, c), f"{family} {device} per bucket")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_refit_into_ue8m0_scales(tmp_path, device):
    c = ALIGNED["deepseek_v3"]
    raw = trainer_tensors(tmp_path, c)
    layout = BucketLayout.of(raw)
    sender = Sender(layout, device)
    params = rollout_params(c, device, fp8=True)
    Refitter(params, layout, sender.buckets, config=c, scale_fmt="ue8m0")
    sender.pack({n: t.to(device) for n, t in raw.items()}, version=7)
    refitter = Refitter(params, layout, sender.buckets, config=c, scale_fmt="ue8m0")
    assert refitter.kernel_calls == 2  # every bucket's copies in one call, its requantized tensors in another
    refitter.step(7)
    want = expected_params(params, raw, c, "ue8m0")
    check(params, want, "ue8m0")
    scales = [t.cpu() for n, t in params.items() if n.endswith("_scale_inv")]
    assert all(torch.equal(torch.exp2(torch.log2(s).round()), s) for s in scales)  # powers of two


def test_buckets_and_parameters_are_reused_across_steps(tmp_path):
    c = ALIGNED["qwen3_moe"]
    raw1, raw2 = trainer_tensors(tmp_path, c, seed=1), trainer_tensors(tmp_path, c, seed=2)
    layout = BucketLayout.of(raw1, bucket_bytes=1 << 20, per_layer=True)
    sender = Sender(layout, "cpu")
    params = rollout_params(c, "cpu", fp8=True)
    pointers = {n: t.data_ptr() for n, t in params.items()}
    buckets = [b.data_ptr() for b in sender.buckets]
    refitter = Refitter(params, layout, sender.buckets, config=c)
    for version, raw in ((1, raw1), (2, raw2), (3, raw1)):
        sender.pack(raw, version)
        report = refitter.step(version)
        assert report.version == version
        check(params, expected_params(params, raw, c), f"step {version}")
    assert {n: t.data_ptr() for n, t in params.items()} == pointers
    assert [b.data_ptr() for b in sender.buckets] == buckets


@pytest.mark.parametrize("tp,pp,ep,tied", [((1, 2), None, None, False), ((0, 2), (1, 2), None, False),
                                           (None, None, (1, 2), False), ((1, 2), None, None, True)],
                         ids=["tp", "tp+pp", "ep", "tied"])
def test_refit_follows_the_load_routing_under_parallelism(tmp_path, tp, pp, ep, tied):
    from pyloader.parallel import Parallel

    c = dict(ALIGNED["qwen3_moe"], tie_word_embeddings=tied)
    raw = trainer_tensors(tmp_path, c)
    assert tied == ("lm_head.weight" not in raw)
    layout = BucketLayout.of(raw)
    sender = Sender(layout, "cpu")
    sender.pack(raw, version=1)
    par = Parallel(*(tp or (0, 1)), *(pp or (0, 1)), *(ep or (0, 1)))
    params = rollout_params(c, "cpu", parallel=par)
    loaded = {n: torch.empty_like(t) for n, t in params.items()}
    pyloader.load(loaded, raw, config=c, tp=tp, pp=pp, ep=ep, progress=False, backend="torch")
    report = Refitter(params, layout, sender.buckets, config=c, tp=tp, pp=pp, ep=ep).step(1)
    check(params, loaded, f"tp={tp} pp={pp} ep={ep}")
    if ep:
        assert params["model.layers.0.mlp.experts.w13_weight"].shape[0] == c["num_experts"] // 2
    if tied:
        assert "lm_head.weight" in params and torch.equal(params["lm_head.weight"], params["model.embed_tokens.weight"])
        assert "lm_head.weight" in report.written


def test_stale_or_foreign_buckets_are_refused_before_any_write(tmp_path):
    c = ALIGNED["qwen3_moe"]
    raw = trainer_tensors(tmp_path, c)
    layout = BucketLayout.of(raw, bucket_bytes=1 << 20, per_layer=True)
    assert layout.num_buckets >= 3
    sender = Sender(layout, "cpu")
    params = rollout_params(c, "cpu")
    refitter = Refitter(params, layout, sender.buckets, config=c)
    sender.pack(raw, version=4)
    before = {n: t.clone() for n, t in params.items()}
    with pytest.raises(RefitError, match="carries version 4, not 5"):
        refitter.step(5)
    sender.buckets[1][layout.in_bucket(1)[0].offset + 3] ^= 0x10  # one bit flipped in transit
    with pytest.raises(RefitError, match="bucket 1: its bytes differ"):
        refitter.step(4)
    for n in params:
        assert_bitwise_equal(params[n], before[n], what=f"{n} written by a refused step")
    sender.pack(raw, version=4)
    refitter.apply(0, 4)
    refitter.apply(2, 4)
    written_by = {}
    for e in refitter.plan_json():
        for key in ("target", "scale_target"):
            if key in e:
                written_by.setdefault(e["bucket"], set()).add(e[key])
    stale = sorted(written_by[1] - written_by[0] - written_by[2])
    with pytest.raises(RefitError, match=r"buckets \[1(, \d+)*\] were not applied") as e:
        refitter.finish(4)
    assert stale and all(s in str(e.value) for s in stale[:10])
    assert refitter.step(4).version == 4  # the next full step goes through


def test_requant_needs_a_scale_parameter_and_whole_blocks(tmp_path):
    c = dict(TINY["qwen3_moe"])  # moe_intermediate_size 96: gate and up meet inside a 128-row block
    raw = trainer_tensors(tmp_path, c)
    layout = BucketLayout.of(raw)
    sender = Sender(layout, "cpu")
    params = rollout_params(c, "cpu", fp8=True)
    with pytest.raises(PlanError, match=r"w13_weight: rows 96\.\.192 of the parameter are not whole 128-row blocks"):
        Refitter(params, layout, sender.buckets, config=c)
    c = ALIGNED["qwen3_moe"]
    raw = trainer_tensors(tmp_path, c)
    layout = BucketLayout.of(raw)
    sender = Sender(layout, "cpu")
    params = rollout_params(c, "cpu", fp8=True)
    del params["model.layers.0.self_attn.o_proj.weight_scale_inv"]
    with pytest.raises(PlanError, match=r"o_proj.weight \(FP8\): the model has no scale parameter"):
        Refitter(params, layout, sender.buckets, config=c)


def test_plan_exports_every_byte_range_once(tmp_path):
    import json

    c = ALIGNED["deepseek_v3"]
    raw = trainer_tensors(tmp_path, c)
    layout = BucketLayout.of(raw, bucket_bytes=1 << 20)
    sender = Sender(layout, "cpu")
    params = rollout_params(c, "cpu", fp8=True)
    plan = json.loads(json.dumps(Refitter(params, layout, sender.buckets, config=c).plan_json()))
    written = {}
    for e in plan:
        for key, tkey in (("dst", "target"), ("scale_dst", "scale_target")):
            if key in e:
                d = e[key]
                written.setdefault(e[tkey], []).append((d["offset"], d["offset"] + d["rows"] * d["row_bytes"]))
        entry = next(x for x in layout.entries if x.name == e["source"])
        assert entry.bucket == e["bucket"] and entry.offset <= e["src_offset"] < entry.offset + entry.nbytes
    assert set(written) == set(params)
    for name, ranges in written.items():
        ranges.sort()
        assert ranges[0][0] == 0 and ranges[-1][1] == params[name].numel() * params[name].element_size(), name
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), f"{name}: gaps or overlaps {ranges}"


# -- across processes ---------------------------------------------------------------------------------
def _gloo_worker(rank, store, ck_dirs, c):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        raws = [raw_tensors(d) for d in ck_dirs]
        layout = BucketLayout.of(raws[0], bucket_bytes=1 << 20, per_layer=True)
        if rank == 0:  # the trainer
            sender = Sender(layout, "cpu")
            for version, raw in enumerate(raws, start=1):
                sender.pack(raw, version)
                broadcast(sender.buckets, src=0)
                dist.barrier()
        else:  # the rollout engine, FP8
            buckets = layout.allocate("cpu")
            params = rollout_params(c, "cpu", fp8=True)
            refitter = Refitter(params, layout, buckets, config=c)
            for version, raw in enumerate(raws, start=1):
                broadcast(buckets, src=0)
                assert refitter.step(version).version == version
                check(params, expected_params(params, raw, c), f"gloo version {version}")
                dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_processes_over_gloo_broadcast(tmp_path):
    c = ALIGNED["deepseek_v3"]
    dirs = [write_checkpoint(tmp_path / f"ck{s}", c, fp8=False, seed=s) for s in (1, 2)]
    mp.spawn(_gloo_worker, args=(str(tmp_path / "store"), dirs, c), nprocs=2, join=True)


def _ipc_receiver(handles, layout_json, c, ck_dirs, device, go, done):
    layout = BucketLayout.from_json(layout_json)
    buckets = open_shared(handles)
    params = rollout_params(c, device, fp8=True)
    refitter = Refitter(params, layout, buckets, config=c)
    for version, d in enumerate(ck_dirs, start=1):
        go.get()
        refitter.step(version)
        check(params, expected_params(params, raw_tensors(d), c), f"shared version {version}")
        done.put(version)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_two_processes_share_buckets_once(tmp_path, device):
    c = ALIGNED["qwen3_moe"]
    dirs = [write_checkpoint(tmp_path / f"ck{s}", c, fp8=False, seed=s) for s in (1, 2, 3)]
    raws = [raw_tensors(d) for d in dirs]
    layout = BucketLayout.of(raws[0], bucket_bytes=1 << 20, per_layer=True)
    sender = Sender(layout, device, shared=device == "cpu")
    ctx = mp.get_context("spawn")
    go, done = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=_ipc_receiver, args=(share(sender.buckets), layout.to_json(), c, dirs, device, go, done))
    p.start()
    try:
        for version, raw in enumerate(raws, start=1):
            sender.pack({n: t.to(device) for n, t in raw.items()}, version)
            if device == "cuda":
                torch.cuda.synchronize()
            go.put(version)
            assert done.get(timeout=120) == version
    finally:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
    assert p.exitcode == 0


def test_cpu_buckets_must_be_shared_to_be_sent():
    layout = BucketLayout.of({"a": torch.zeros(4)})
    with pytest.raises(pyloader.PyloaderInputError, match="not in shared memory"):
        share(Sender(layout, "cpu").buckets)


def test_pack_and_refitter_refuse_tensors_and_buckets_of_another_layout(tmp_path):
    c = ALIGNED["qwen3_moe"]
    raw = trainer_tensors(tmp_path, c)
    layout = BucketLayout.of(raw, bucket_bytes=1 << 20, per_layer=True)
    sender = Sender(layout, "cpu")
    name = "model.layers.0.self_attn.o_proj.weight"
    with pytest.raises(pyloader.PyloaderInputError, match=rf"{name} is torch.float32 \[256, 256\], the layout says torch.bfloat16"):
        sender.pack(dict(raw, **{name: raw[name].float()}), 1)
    with pytest.raises(pyloader.PyloaderInputError, match=r"missing \['model.embed_tokens.weight'\]"):
        sender.pack({n: t for n, t in raw.items() if n != "model.embed_tokens.weight"}, 1)
    with pytest.raises(pyloader.PyloaderInputError, match="not in the layout"):
        sender.pack(dict(raw, extra=torch.zeros(2)), 1)
    params = rollout_params(c, "cpu")
    with pytest.raises(pyloader.PyloaderInputError, match="buckets given, the layout has"):
        Refitter(params, layout, sender.buckets[:-1], config=c)
    with pytest.raises(pyloader.PyloaderInputError, match="buckets given, the layout has"):
        Refitter(params, layout, [torch.zeros(b.numel() + 256, dtype=torch.uint8) for b in sender.buckets], config=c)
    with pytest.raises(pyloader.PyloaderInputError, match="on the parameters' device"):
        Refitter(params, layout, [b.to("meta") for b in sender.buckets], config=c)


def test_the_readme_example_runs(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, os.path.join(root, "examples", "refit_ipc.py"), "--device", "cpu"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("buckets checked True") == 3
