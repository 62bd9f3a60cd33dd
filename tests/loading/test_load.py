"""End to end: synthetic checkpoints of every preset family → pyloader.load → compared with a
reference built independently (each tensor read with the safetensors library, dequantized with
the torch reference, concatenated by hand). CPU here (torch backend); bitwise on the GPU."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file

import pyloader
from pyloader.ops import reference
from pyloader.parallel import Parallel
from pyloader.routing.presets import build_preset
from pyloader.synthetic import allocate_targets, write_checkpoint

from tiny_models import TINY
from helpers import assert_bitwise_equal, direct_io_supported, poison_
from hand_reference import expected_tensor, raw_tensors

@pytest.mark.parametrize("fp8", [True, False], ids=["fp8", "bf16"])
@pytest.mark.parametrize("family", sorted(TINY))
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_load_every_family_matches_hand_built_reference(tmp_path, family, fp8, device):
    c = dict(TINY[family])
    if fp8:
        c["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    d = write_checkpoint(tmp_path / family, c, fp8=fp8, shard_bytes=200_000,
                         scale_dtype=torch.bfloat16 if family == "qwen3_moe" else torch.float32)
    preset = build_preset(c)
    targets = {n: poison_(t) for n, t in allocate_targets(preset.targets, device).items()}
    # small slots split tensors by rows
    small = pyloader.ExecutorConfig(slot_bytes=1 << 16, num_slots=3, read_threads=4) if family in ("llama", "qwen2") else None
    report = pyloader.load(targets, d, backend=None if device == "cuda" else "torch", progress=False, executor=small)
    assert report.missing == [] and report.unexpected == []
    assert report.peak_rss is None or 0 < report.peak_rss < 64 << 30
    assert report.io == "files"
    raw = raw_tensors(d)
    for name, t in targets.items():
        want = expected_tensor(name, raw, c, t.dtype).to(device)
        if device == "cuda":
            want = expected_tensor(name, {k: v.cuda() for k, v in raw.items()}, c, t.dtype)
        assert_bitwise_equal(t, want, what=f"{family} {name}")


def test_parameters_that_require_grad_as_a_dict(tmp_path):
    """``dict(model.named_parameters())`` (what an engine hands over) holds leaves that require
    grad: they are written in place, not refused by autograd."""
    c = dict(TINY["llama"])
    d = write_checkpoint(tmp_path / "m", c, fp8=False)
    params = {n: torch.nn.Parameter(poison_(t)) for n, t in allocate_targets(build_preset(c).targets, "cpu").items()}
    before = {n: p.data_ptr() for n, p in params.items()}
    pyloader.load(params, d, progress=False)
    raw = raw_tensors(d)
    for name, p in params.items():
        assert p.requires_grad and p.data_ptr() == before[name]
        assert_bitwise_equal(p.detach(), expected_tensor(name, raw, c, p.dtype), what=name)


def test_progress_ends_with_the_time_split_and_library_use_stays_quiet(tmp_path, capsys):
    c = dict(TINY["llama"], quantization_config={"quant_method": "fp8"})
    d = write_checkpoint(tmp_path / "m", c)
    targets = allocate_targets(build_preset(c).targets, "cpu")
    pyloader.load(targets, d, backend="torch", progress=False)
    assert capsys.readouterr().err == ""
    report = pyloader.load(targets, d, backend="torch", progress=True)
    err = capsys.readouterr().err
    assert f"pyloader: loaded {len(report.loaded)} targets" in err
    assert "GB/s" in err and "thread-s" in err and "H2D" in err and "transforms" in err


def test_tensor_parallel_load_is_the_slice_of_the_full_load(tmp_path):
    c = dict(TINY["llama"], quantization_config={"quant_method": "fp8"})
    d = write_checkpoint(tmp_path / "tp", c)
    full_preset = build_preset(c)
    full = allocate_targets(full_preset.targets, "cpu")
    pyloader.load(full, d, backend="torch", progress=False)
    hd = 64
    for rank in range(2):
        p = build_preset(c, parallel=Parallel(tp_rank=rank, tp_size=2))
        t = {n: poison_(x) for n, x in allocate_targets(p.targets, "cpu").items()}
        pyloader.load(t, d, tp=(rank, 2), backend="torch", progress=False)
        q = full["model.layers.1.self_attn.qkv_proj.weight"]
        qh, kvh = 4 * hd, 2 * hd
        mine = torch.cat([q[rank * qh // 2:(rank + 1) * qh // 2], q[qh + rank * kvh // 2: qh + (rank + 1) * kvh // 2],
                          q[qh + kvh + rank * kvh // 2: qh + kvh + (rank + 1) * kvh // 2]])
        assert_bitwise_equal(t["model.layers.1.self_attn.qkv_proj.weight"], mine)
        o = full["model.layers.0.self_attn.o_proj.weight"]
        assert_bitwise_equal(t["model.layers.0.self_attn.o_proj.weight"], o[:, rank * 128:(rank + 1) * 128])
        d2 = full["model.layers.0.mlp.down_proj.weight"]
        assert_bitwise_equal(t["model.layers.0.mlp.down_proj.weight"], d2[:, rank * 192:(rank + 1) * 192])


def test_poisoning_streaming_source_and_dict_source(tmp_path):
    """Failure 1 (Nemotron Nano VL, run:ai streamer): a source that reuses one buffer for every
    tensor and poisons it after each yield; an early-stopping consumer; a dict source."""
    c = dict(TINY["qwen3_moe"], quantization_config={"quant_method": "fp8"})
    d = write_checkpoint(tmp_path / "s", c, scale_dtype=torch.bfloat16)
    raw = raw_tensors(d)
    preset = build_preset(c)
    ref = allocate_targets(preset.targets, "cpu")
    pyloader.load(ref, d, backend="torch", progress=False)

    def reusing_stream(limit=None):
        buf = torch.empty(1 << 22, dtype=torch.uint8)
        for i, (name, t) in enumerate(raw.items()):
            if limit is not None and i >= limit:
                return
            view = buf[: t.numel() * t.element_size()].view(t.dtype).view(t.shape)
            view.copy_(t)
            yield name, view
            buf.fill_(0x7F)  # poison: a loader that kept a reference now holds garbage

    naive = dict(reusing_stream())  # what the shipped bug did: keep references
    assert not all(torch.equal(naive[n].view(torch.uint8), raw[n].view(torch.uint8)) for n in raw)
    out = {n: poison_(t) for n, t in allocate_targets(preset.targets, "cpu").items()}
    report = pyloader.load(out, reusing_stream(), config=c, backend="torch", progress=False)
    assert report.missing == []
    for n in ref:
        assert_bitwise_equal(out[n], ref[n], what=n)
    partial = {n: poison_(t) for n, t in allocate_targets(preset.targets, "cpu").items()}
    with pytest.raises(pyloader.PyloaderInputError, match="never arrived|unwritten|missing"):
        r = pyloader.load(partial, reusing_stream(limit=len(raw) // 2 + 1), config=c, backend="torch", progress=False)
        if r.missing:
            raise pyloader.PyloaderInputError(f"missing {r.missing[:2]}")
    from_dict = {n: poison_(t) for n, t in allocate_targets(preset.targets, "cpu").items()}
    pyloader.load(from_dict, raw, config=c, backend="torch", progress=False)
    for n in ref:
        assert_bitwise_equal(from_dict[n], ref[n], what=n)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_real_runai_streamer_as_a_source(tmp_path, device):
    """The Nemotron Nano VL failure with the real run:ai streamer (a dev dependency; a carried wheel
    on the device): its tensors live in one reused buffer; the load must equal the directory load
    bitwise."""
    runai = pytest.importorskip("runai_model_streamer")
    c = dict(TINY["qwen3_moe"], quantization_config={"quant_method": "fp8"})
    d = write_checkpoint(tmp_path / "r", c, scale_dtype=torch.bfloat16, shard_bytes=300_000)
    preset = build_preset(c)
    backend = None if device == "cuda" else "torch"
    ref = allocate_targets(preset.targets, device)
    pyloader.load(ref, d, progress=False, backend=backend)
    out = {n: poison_(t) for n, t in allocate_targets(preset.targets, device).items()}
    files = sorted(str(p) for p in d.glob("*.safetensors"))
    with runai.SafetensorsStreamer() as s:
        s.stream_files(files)
        report = pyloader.load(out, s.get_tensors(), config=c, progress=False, backend=backend)
    assert report.missing == []
    for n in ref:
        assert_bitwise_equal(out[n], ref[n], what=n)


NEMOTRON_H_TINY = {"model_type": "nemotron_h", "architectures": ["NemotronHForCausalLM"], "hidden_size": 256,
                   "hybrid_override_pattern": "M*M-", "mamba_num_heads": 8, "mamba_head_dim": 16, "n_groups": 2,
                   "ssm_state_size": 16, "conv_kernel": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "head_dim": 64, "intermediate_size": 192, "vocab_size": 96, "tie_word_embeddings": False,
                   "num_hidden_layers": 4, "torch_dtype": "bfloat16"}


def nemotron_h_tiny_tensors(c, gen):
    """A tiny Nemotron-H checkpoint: FP8 (128x128 blocks) in_proj and out_proj of the Mamba
    layers, BF16 elsewhere; values random so that every misplaced row shows."""
    H, nh, hd = c["hidden_size"], c["mamba_num_heads"], c["mamba_head_dim"]
    d_inner, conv = nh * hd, nh * hd + 2 * c["n_groups"] * c["ssm_state_size"]
    heads, kv, ahd, I = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["intermediate_size"]

    def bf16(*shape):
        return torch.randn(shape, generator=gen).to(torch.bfloat16)

    def fp8(name, rows, cols):
        out[name] = torch.randn((rows, cols), generator=gen).to(torch.float8_e4m3fn)
        out[name + "_scale_inv"] = torch.rand((-(-rows // 128), -(-cols // 128)), generator=gen) + 0.5

    out = {"backbone.embeddings.weight": bf16(c["vocab_size"], H), "backbone.norm_f.weight": bf16(H),
           "lm_head.weight": bf16(c["vocab_size"], H)}
    for i, kind in enumerate(c["hybrid_override_pattern"]):
        p = f"backbone.layers.{i}"
        out[f"{p}.norm.weight"] = bf16(H)
        if kind == "M":
            fp8(f"{p}.mixer.in_proj.weight", d_inner + conv + nh, H)
            fp8(f"{p}.mixer.out_proj.weight", H, d_inner)
            out[f"{p}.mixer.conv1d.weight"], out[f"{p}.mixer.conv1d.bias"] = bf16(conv, 1, 4), bf16(conv)
            out[f"{p}.mixer.A_log"] = torch.randn(nh, generator=gen)
            out[f"{p}.mixer.D"], out[f"{p}.mixer.dt_bias"], out[f"{p}.mixer.norm.weight"] = bf16(nh), bf16(nh), bf16(d_inner)
        elif kind == "*":
            for n, rows in (("q", heads * ahd), ("k", kv * ahd), ("v", kv * ahd)):
                out[f"{p}.mixer.{n}_proj.weight"] = bf16(rows, H)
            out[f"{p}.mixer.o_proj.weight"] = bf16(H, heads * ahd)
        else:
            out[f"{p}.mixer.up_proj.weight"], out[f"{p}.mixer.down_proj.weight"] = bf16(I, H), bf16(H, I)
    return out


def mamba_rank_slices(c, rank, tp):
    """vLLM's MambaMixer2 split written out: rank's rows of in_proj [z|x|B|C|dt] and conv1d [x|B|C]."""
    nh, hd, ng, ds = c["mamba_num_heads"], c["mamba_head_dim"], c["n_groups"], c["ssm_state_size"]
    d_inner, gss = nh * hd, ng * ds
    h = slice(rank * nh // tp, (rank + 1) * nh // tp)
    inner = slice(h.start * hd, h.stop * hd)
    g = slice(rank * gss // tp, (rank + 1) * gss // tp) if ng % tp == 0 else slice(0, gss)  # 1 group: replicated
    idx = torch.arange(d_inner + d_inner + 2 * gss + nh)
    z, x = idx[:d_inner][inner], idx[d_inner:2 * d_inner][inner]
    B, C, dt = idx[2 * d_inner:2 * d_inner + gss][g], idx[2 * d_inner + gss:2 * d_inner + 2 * gss][g], idx[2 * d_inner + 2 * gss:][h]
    return torch.cat([z, x, B, C, dt]), torch.cat([x, B, C]) - d_inner, h, inner


@pytest.mark.parametrize("tp,groups", [(1, 2), (2, 2), (4, 1)], ids=["tp1", "tp2", "tp4-one-group"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_nemotron_h_mamba_tensor_parallel_matches_hand_built_split(tmp_path, tp, groups, device):
    from safetensors.torch import save_file
    c = dict(NEMOTRON_H_TINY, n_groups=groups)
    raw = nemotron_h_tiny_tensors(c, torch.Generator().manual_seed(7))
    d = tmp_path / "nh"
    d.mkdir()
    names = sorted(raw)
    save_file({n: raw[n] for n in names[: len(names) // 2]}, str(d / "model-00001-of-00002.safetensors"))
    save_file({n: raw[n] for n in names[len(names) // 2:]}, str(d / "model-00002-of-00002.safetensors"))

    def full(name):  # the whole tensor in BF16 (FP8 dequantized with the reference)
        w = raw[name]
        if w.dtype == torch.float8_e4m3fn:
            return reference.dequant_blockwise_torch(w, raw[name + "_scale_inv"], torch.empty(w.shape, dtype=torch.bfloat16),
                                                     (128, 128))
        return w

    for rank in range(tp):
        preset = build_preset(c, parallel=Parallel(tp_rank=rank, tp_size=tp))
        targets = {n: poison_(t) for n, t in allocate_targets(preset.targets, device).items()}
        small = pyloader.ExecutorConfig(slot_bytes=1 << 15, num_slots=3, read_threads=3)
        report = pyloader.load(targets, d, config=c, tp=(rank, tp), backend=None if device == "cuda" else "torch",
                               progress=False, executor=small)
        assert report.missing == [] and report.unexpected == []
        in_rows, conv_rows, heads, inner = mamba_rank_slices(c, rank, tp)
        for i in (0, 2):
            p, m = f"backbone.layers.{i}.mixer", f"model.layers.{i}.mixer"
            want = {"in_proj.weight": full(f"{p}.in_proj.weight")[in_rows],
                    "conv1d.weight": raw[f"{p}.conv1d.weight"][conv_rows], "conv1d.bias": raw[f"{p}.conv1d.bias"][conv_rows],
                    "A_log": raw[f"{p}.A_log"][heads], "D": raw[f"{p}.D"][heads], "dt_bias": raw[f"{p}.dt_bias"][heads],
                    "norm.weight": raw[f"{p}.norm.weight"][inner], "out_proj.weight": full(f"{p}.out_proj.weight")[:, inner]}
            for leaf, w in want.items():
                assert_bitwise_equal(targets[f"{m}.{leaf}"], w.to(device), what=f"tp {rank}/{tp} layer {i} {leaf}")
        up = raw["backbone.layers.3.mixer.up_proj.weight"]
        assert_bitwise_equal(targets["model.layers.3.mixer.up_proj.weight"],
                             up[rank * 192 // tp:(rank + 1) * 192 // tp].to(device), what="mlp up_proj")


def test_nemotron_h_modelopt_per_tensor_fp8_tensor_parallel(tmp_path):
    """Nemotron 3 Super FP8 is ModelOpt FP8: a scalar ``weight_scale`` and an ``input_scale`` per
    Linear. Into BF16 targets, split for TP: the per-tensor scale applies to every segment, the
    input scales are skipped with their reason."""
    from safetensors.torch import save_file
    c = dict(NEMOTRON_H_TINY)
    raw = nemotron_h_tiny_tensors(c, torch.Generator().manual_seed(1))
    for n in [k for k in raw if k.endswith("_scale_inv")]:
        w = n[: -len("_scale_inv")]
        del raw[n]
        raw[w + "_scale"] = torch.tensor(0.75)
        raw[w[: -len(".weight")] + ".input_scale"] = torch.tensor(1.5)
    save_file(raw, str(tmp_path / "model.safetensors"))
    for rank in range(2):
        preset = build_preset(c, parallel=Parallel(tp_rank=rank, tp_size=2))
        targets = {n: poison_(t) for n, t in allocate_targets(preset.targets, "cpu").items()}
        report = pyloader.load(targets, tmp_path, config=c, tp=(rank, 2), backend="torch", progress=False)
        assert report.missing == [] and report.unexpected == []
        assert sum("input scale" in why for why in report.skipped.values()) == 4
        in_rows, _, _, inner = mamba_rank_slices(c, rank, 2)
        for i in (0, 2):
            p, m = f"backbone.layers.{i}.mixer", f"model.layers.{i}.mixer"
            in_proj = (raw[f"{p}.in_proj.weight"].float() * 0.75).bfloat16()
            out_proj = (raw[f"{p}.out_proj.weight"].float() * 0.75).bfloat16()
            assert_bitwise_equal(targets[f"{m}.in_proj.weight"], in_proj[in_rows], what=f"{rank} {i} in_proj")
            assert_bitwise_equal(targets[f"{m}.out_proj.weight"], out_proj[:, inner], what=f"{rank} {i} out_proj")


@pytest.mark.gpu
@pytest.mark.parametrize("readers", ["native", "python"])
@pytest.mark.parametrize("mode", ["auto", "direct", "buffered"])
def test_cold_file_reads_match_the_reference(tmp_path, monkeypatch, mode, readers):
    """Both ways of reading files taken as cold (O_DIRECT with widened reads, buffered) load the
    same bytes, with either reader; chunks of an odd size make reads start and end off the 4 KiB
    grid, and the native reader's 16 KiB buffers split every chunk into several copies through a
    ring of two. Residency is forced to 'cold' (the files were just written, so they are cached)."""
    from pyloader.loading import executor

    c = dict(TINY["deepseek_v3"], quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
    d = write_checkpoint(tmp_path / "m", c, fp8=True, shard_bytes=150_001)
    if mode in ("auto", "direct") and not direct_io_supported(next(d.glob("*.safetensors"))):
        pytest.skip("this filesystem refuses O_DIRECT")
    monkeypatch.setattr(executor, "file_resident", lambda path: 0.0)
    preset = build_preset(c)
    targets = {n: poison_(t) for n, t in allocate_targets(preset.targets, "cuda").items()}
    cfg = pyloader.ExecutorConfig(slot_bytes=1 << 16, num_slots=3, read_threads=3, read_chunk_bytes=40_961,
                                  buffers_per_thread=2, cold_reads=mode, readers=readers,
                                  pinned_buffer_bytes=16384, cold_request_bytes=16384, cold_chunk_bytes=40_961)
    report = pyloader.load(targets, d, progress=False, executor=cfg)
    assert report.readers == readers
    assert report.timings.cold_files == (0 if mode == "buffered" else len(list(d.glob("*.safetensors"))))
    # more readers only for native O_DIRECT reads: the Python readers' buffers would pass the pinned bound
    assert report.timings.read_threads == (cfg.cold_read_threads if readers == "native" and mode != "buffered" else 3)
    # native O_DIRECT reads: a buffer a request (plus the 3 blocks an aligned read may add)
    per_buffer = {"native": 16384 + 3 * 4096 if mode != "buffered" else 16384, "python": 40_961}[readers]
    assert report.timings.pinned_bytes == report.timings.read_threads * 2 * per_buffer
    raw = {k: v.cuda() for k, v in raw_tensors(d).items()}
    for name, t in targets.items():
        assert_bitwise_equal(t, expected_tensor(name, raw, c, t.dtype), what=f"{mode} {name}")


def _deepseek_with_mtp(tmp_path):
    """A DeepSeek-V3 checkpoint whose last layer is an MTP layer the load skips (config: 2 layers,
    files: 3), several files, tensors larger than the small slots below."""
    c = dict(TINY["deepseek_v3"], quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
    d = write_checkpoint(tmp_path / "m", dict(c, num_hidden_layers=3), shard_bytes=150_001)
    return c, d


def test_a_plan_that_fails_writes_nothing_and_leaves_nothing_open(tmp_path):
    """A plan that does not check out (a target of the wrong shape) raises its error, every target
    keeps its poison, and no reader thread or descriptor is left."""
    import os
    import threading

    c, d = _deepseek_with_mtp(tmp_path)
    targets = {n: poison_(t) for n, t in allocate_targets(build_preset(c).targets, "cpu").items()}
    name = "model.layers.1.mlp.experts.w2_weight"
    targets[name] = poison_(torch.empty(targets[name].shape[0], 8, 8, dtype=torch.bfloat16))
    before = {n: t.clone() for n, t in targets.items()}
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(pyloader.PyloaderInputError, match="w2_weight"):
        pyloader.load(targets, d, config=c, backend="torch", progress=False)
    for n, t in targets.items():
        assert_bitwise_equal(t, before[n], what=n)
    assert not [t for t in threading.enumerate() if t.name.startswith("pyloader-read")]
    assert len(os.listdir("/proc/self/fd")) == fds




def _rewrite_without(d, drop):
    """The checkpoint in ``d`` without the tensors whose names contain any of ``drop`` (index kept true)."""
    from safetensors.torch import save_file

    index = json.loads((d / "model.safetensors.index.json").read_text())
    for f in sorted(set(index["weight_map"].values())):
        kept = {n: t for n, t in load_file(str(d / f)).items() if not any(x in n for x in drop)}
        save_file(kept, str(d / f))
    index["weight_map"] = {n: f for n, f in index["weight_map"].items() if not any(x in n for x in drop)}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("source", ["directory", "dict"])
@pytest.mark.parametrize("hole", ["target the preset does not know", "expert slot", "stacked shard rows"])
def test_targets_left_unwritten_fail_the_load_before_any_byte(tmp_path, hole, source):
    """Every target is accounted for: a parameter the preset does not know, an expert slot no tensor
    fills, a shard's rows of a fused target. missing='error' (the default) lists them before any
    byte is written; 'ignore' loads the rest and reports them."""
    c = dict(TINY["qwen3_moe"])
    d = write_checkpoint(tmp_path / "m", c, fp8=False)
    targets = {n: poison_(t) for n, t in allocate_targets(build_preset(c).targets, "cpu").items()}
    if hole == "target the preset does not know":
        targets["model.layers.0.mlp.extra_proj.weight"] = poison_(torch.empty(4, 4, dtype=torch.bfloat16))
        want = "model.layers.0.mlp.extra_proj.weight"
    elif hole == "expert slot":
        _rewrite_without(d, ["layers.1.mlp.experts.3."])
        want = "model.layers.1.mlp.experts.w13_weight (expert slots [3])"
    else:
        _rewrite_without(d, ["layers.0.self_attn.k_proj."])
        want = "model.layers.0.self_attn.qkv_proj.weight"
    src = d if source == "directory" else raw_tensors(d)
    before = {n: t.clone() for n, t in targets.items()}
    with pytest.raises(pyloader.PyloaderInputError, match=re.escape(want)):
        pyloader.load(targets, src, config=c, backend="torch", progress=False)
    for n, t in targets.items():
        assert_bitwise_equal(t, before[n], what=n)  # nothing written
    report = pyloader.load(targets, src, config=c, backend="torch", progress=False, missing="ignore")
    assert want in report.missing


@pytest.mark.parametrize("pp_rank", [None, 1])
def test_tied_embeddings_fill_the_head(tmp_path, pp_rank):
    """A tied model's checkpoint has no lm_head: the head is the embedding, filled after the load
    (whole model), or read from the embedding's rows on the last pipeline stage."""
    c = dict(TINY["llama"], tie_word_embeddings=True)
    d = write_checkpoint(tmp_path / "tied", c, fp8=False)
    raw = raw_tensors(d)
    assert "lm_head.weight" not in raw
    pp = None if pp_rank is None else (pp_rank, 2)
    par = Parallel() if pp is None else Parallel(pp_rank=pp_rank, pp_size=2)
    targets = {n: poison_(t) for n, t in allocate_targets(build_preset(c, parallel=par).targets, "cpu").items()}
    pyloader.load(targets, d, backend="torch", progress=False, pp=pp)
    assert_bitwise_equal(targets["lm_head.weight"], raw["model.embed_tokens.weight"], what="lm_head")


@pytest.mark.parametrize("source", ["files", "dict", "stream"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_sanity_gate_reports_maxima_and_stops_implausible_tensors(tmp_path, source, device):
    """Every dequantized tensor's max |x| comes back in the report; a scale read as ~1e38 (E8M0
    bytes taken for a float) stops the load with the tensor's name, or is listed with gate='warn'."""
    c = dict(TINY["llama"], quantization_config={"quant_method": "fp8"})
    d = write_checkpoint(tmp_path / "g", c)
    raw = raw_tensors(d)
    victim = next(n for n in sorted(raw) if n.endswith("weight_scale_inv"))
    bad = dict(raw)
    bad[victim] = torch.full_like(raw[victim], 3.0e38)
    if source == "files":
        from safetensors.torch import save_file

        shard = tmp_path / "bad"
        shard.mkdir()
        save_file(bad, str(shard / "model.safetensors"))
        (shard / "config.json").write_text(json.dumps(c))
    preset = build_preset(c)

    def src(tensors, where):
        return where if source == "files" else (tensors if source == "dict" else iter(tensors.items()))

    good = pyloader.load(allocate_targets(preset.targets, device), src(raw, d), config=c, progress=False)
    weight = victim[: -len("_scale_inv")]
    assert weight in good.maxima and 0 < good.maxima[weight][0] < 1e4 and good.gate_warnings == []
    assert all(m[1] <= 448.0 for m in good.maxima.values())  # max |code| of E4M3
    with pytest.raises(pyloader.PyloaderInputError, match=re.escape(weight) + ": max"):
        pyloader.load(allocate_targets(preset.targets, device), src(bad, tmp_path / "bad"), config=c, progress=False)
    warned = pyloader.load(allocate_targets(preset.targets, device), src(bad, tmp_path / "bad"), config=c,
                           progress=False, gate="warn")
    assert len(warned.gate_warnings) == 1 and weight in warned.gate_warnings[0]
    off = pyloader.load(allocate_targets(preset.targets, device), src(bad, tmp_path / "bad"), config=c,
                        progress=False, gate="off")
    assert off.maxima == {}


def _requantized(d, out, quantize, names):
    """Rewrite the BF16 checkpoint ``d`` into ``out`` with the tensors ``names`` picks quantized by
    ``quantize(name, w) -> (dict of checkpoint tensors, dequantized bf16)``; returns the same
    checkpoint with those weights replaced by their dequantized values (the reference)."""
    from safetensors.torch import save_file

    raw = raw_tensors(d)
    quantized, reference = {}, {}
    for name, w in raw.items():
        if names(name):
            parts, deq = quantize(name, w)
            quantized.update(parts)
            reference[name] = deq
        else:
            quantized[name] = reference[name] = w
    for folder, tensors in ((out / "q", quantized), (out / "ref", reference)):
        folder.mkdir(parents=True)
        save_file(tensors, str(folder / "model.safetensors"))
        (folder / "config.json").write_text((d / "config.json").read_text())
    return out / "q", out / "ref"


@pytest.mark.parametrize("fmt", ["nvfp4-modelopt", "nvfp4-ct", "int4", "fp4-e8m0"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_load_packed_experts_into_bf16_targets(tmp_path, fmt, device):
    """A Qwen3-MoE whose experts are NVFP4 (both second-level forms), INT4 pack-quantized or FP4
    with E8M0 scales loads into the preset's BF16 targets (w13/w2 assembled) exactly as the same
    checkpoint holding the dequantized values does; with tensor parallel 2 the column-parallel
    down_proj slice starts inside a scale group on rank 1."""
    from quantizers import formula, quantize_fp4_e8m0, quantize_int4, quantize_nvfp4

    c = dict(TINY["qwen3_moe"])
    d = write_checkpoint(tmp_path / "bf16", c, fp8=False)

    def quantize(name, w):
        base = name[: -len("weight")]
        if fmt.startswith("nvfp4"):
            q, s, g = quantize_nvfp4(w.float(), divisor=fmt == "nvfp4-ct")
            deq = formula(q, w.shape[1], "e2m1", s, (1, 16), g=g, mode="div" if fmt == "nvfp4-ct" else "mul")
            if fmt == "nvfp4-ct":
                return {base + "weight_packed": q, base + "weight_scale": s, base + "weight_global_scale": g}, deq
            return {name: q, base + "weight_scale": s, base + "weight_scale_2": g.reshape(()),
                    base + "input_scale": torch.tensor(1.0)}, deq
        if fmt == "int4":
            q, s, ws = quantize_int4(w.float())
            return {base + "weight_packed": q, base + "weight_scale": s, base + "weight_shape": ws}, \
                formula(q, w.shape[1], "int4", s, (1, 32))
        q, s = quantize_fp4_e8m0(w.float())
        return {name: q, base + "weight_scale": s}, formula(q, w.shape[1], "e2m1", s, (1, 32))

    qdir, refdir = _requantized(d, tmp_path, quantize, lambda n: ".mlp.experts." in n)
    for tp in (1, 2):
        for rank in range(tp):
            preset = build_preset(c, parallel=Parallel(tp_rank=rank, tp_size=tp))
            got = {n: poison_(t) for n, t in allocate_targets(preset.targets, device).items()}
            want = allocate_targets(preset.targets, device)
            report = pyloader.load(got, qdir, tp=(rank, tp), progress=False)
            pyloader.load(want, refdir, tp=(rank, tp), progress=False)
            assert report.missing == [] and report.unexpected == []
            assert len(report.maxima) == 2 * 6 * 3 and report.gate_warnings == []
            for n in want:
                assert_bitwise_equal(got[n], want[n], what=f"{fmt} tp{rank}/{tp} {n}")
            # the same tensors as a dict (a trainer's, or a reader's): recognized and dequantized alike
            from_dict = {n: poison_(t) for n, t in allocate_targets(preset.targets, device).items()}
            report = pyloader.load(from_dict, load_file(str(qdir / "model.safetensors")), config=c, tp=(rank, tp),
                                   progress=False)
            assert report.io == "memory" and len(report.maxima) == 2 * 6 * 3
            for n in want:
                assert_bitwise_equal(from_dict[n], want[n], what=f"{fmt} dict tp{rank}/{tp} {n}")
    if fmt in ("int4", "nvfp4-ct"):  # a stream cannot be recognized: said so, not "no target"
        with pytest.raises(pyloader.PyloaderInputError, match="not a stream"):
            pyloader.load(allocate_targets(build_preset(c).targets, device),
                          iter(load_file(str(qdir / "model.safetensors")).items()), config=c, progress=False)


@pytest.mark.parametrize("fmt", ["int4", "nvfp4-ct"])
def test_kimi_k25_language_model_with_packed_experts_and_vision_tower(tmp_path, fmt):
    """Kimi-K2.5: a DeepSeek-V3 language model under language_model. (INT4 pack-quantized or NVFP4
    experts, dequantized into the BF16 targets), the vision tower and projector passed through,
    with pipeline parallel 2: the same values as the checkpoint holding the dequantized weights."""
    from safetensors.torch import save_file

    from quantizers import quantize_ct

    text = dict(TINY["deepseek_v3"])
    d = write_checkpoint(tmp_path / "ds", text, fp8=False)
    raw = raw_tensors(d)
    gen = torch.Generator().manual_seed(5)
    tower = {"vision_tower.encoder.blocks.0.wqkv.weight": torch.randn(96, 32, generator=gen).to(torch.bfloat16),
             "vision_tower.patch_embed.proj.bias": torch.randn(32, generator=gen).to(torch.bfloat16),
             "mm_projector.proj.0.weight": torch.randn(256, 128, generator=gen).to(torch.bfloat16)}
    quantized, reference = dict(tower), dict(tower)
    for name, w in raw.items():
        out = "language_model." + name
        if ".mlp.experts." in name and name.endswith(".weight"):
            parts, reference[out] = quantize_ct(w, "int4" if fmt == "int4" else "nvfp4")
            quantized.update({out[: -len("weight")] + k: v for k, v in parts.items()})
        else:
            quantized[out] = reference[out] = w
    group = {"int4": {"num_bits": 4, "type": "int", "group_size": 32}, "nvfp4-ct": {"num_bits": 4, "type": "float",
                                                                                   "group_size": 16}}[fmt]
    config = {"model_type": "kimi_k25", "architectures": ["KimiK25ForConditionalGeneration"], "text_config": text,
              "quantization_config": {"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": group}},
                                      "ignore": ["re:.*self_attn.*", "re:.*shared_experts.*", "re:.*vision_tower.*",
                                                 "re:.*mm_projector.*", "language_model.lm_head"]}}
    for folder, tensors in (("q", quantized), ("ref", reference)):
        (tmp_path / folder).mkdir()
        save_file(tensors, str(tmp_path / folder / "model.safetensors"))
        (tmp_path / folder / "config.json").write_text(json.dumps(config))
    for rank in range(2):
        preset = build_preset(config, parallel=Parallel(pp_rank=rank, pp_size=2))
        preset.add_passthrough({n: _info(n, t) for n, t in tower.items()})
        got = {n: poison_(t) for n, t in allocate_targets(preset.targets, "cpu").items()}
        want = allocate_targets(preset.targets, "cpu")
        report = pyloader.load(got, tmp_path / "q", pp=(rank, 2), progress=False)
        pyloader.load(want, tmp_path / "ref", pp=(rank, 2), progress=False)
        assert report.missing == [] and report.unexpected == [] and report.preset == "kimi_k25"
        assert any(n.startswith("vision_tower.") for n in got) == (rank == 0)
        assert (len(report.maxima) > 0) == (rank == 1) and report.gate_warnings == []  # experts: layer 1
        for n in want:
            assert_bitwise_equal(got[n], want[n], what=f"{fmt} pp{rank} {n}")


def _info(name, t):
    from pyloader.loading.sources import tensor_info

    return tensor_info(name, t)
