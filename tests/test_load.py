"""End to end: synthetic checkpoints of every preset family → pyloader.load → compared with a
reference built independently (each tensor read with the safetensors library, dequantized with
the torch reference, concatenated by hand). CPU here (torch backend); bitwise on the GPU."""

import json

import pytest
import torch
from safetensors.torch import load_file

import pyloader
from pyloader import reference
from pyloader.presets import Parallel, build_preset
from pyloader.synthetic import allocate_targets, write_checkpoint

from helpers import assert_bitwise_equal, poison_

TINY = {
    "llama": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 384,
              "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 300},
    "qwen2": {"model_type": "qwen2", "hidden_size": 256, "intermediate_size": 200, "num_attention_heads": 4,
              "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 77},
    "qwen3_moe": {"model_type": "qwen3_moe", "hidden_size": 256, "intermediate_size": 384, "moe_intermediate_size": 96,
                  "num_experts": 6, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
                  "num_hidden_layers": 2, "vocab_size": 300},
    "mixtral": {"model_type": "mixtral", "hidden_size": 128, "intermediate_size": 160, "num_local_experts": 4,
                "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 1, "vocab_size": 50},
    "deepseek_v3": {"model_type": "deepseek_v3", "hidden_size": 256, "intermediate_size": 320, "moe_intermediate_size": 96,
                    "n_routed_experts": 4, "n_shared_experts": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
                    "q_lora_rank": 160, "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16,
                    "v_head_dim": 32, "first_k_dense_replace": 1, "num_hidden_layers": 2, "vocab_size": 100,
                    "topk_method": "noaux_tc"},
}
for c in TINY.values():
    c.setdefault("tie_word_embeddings", False)
    c.setdefault("torch_dtype", "bfloat16")


def expected_tensor(target: str, raw: dict, c: dict, out_dtype) -> torch.Tensor:
    """Independent reference: the family's fusion written out by hand."""
    def get(name):
        w = raw[name]
        if w.dtype == torch.float8_e4m3fn:
            s = raw[name + "_scale_inv"]
            return reference.dequant_blockwise_torch(w, s, torch.empty(w.shape, dtype=out_dtype), (128, 128))
        return w.to(out_dtype)

    def stack(names):
        return torch.cat([get(n) for n in names])

    if target.endswith("qkv_proj.weight") or target.endswith("qkv_proj.bias"):
        suffix = target.rsplit(".", 1)[1]
        base = target[: -len("qkv_proj." + suffix)]
        return stack([f"{base}{p}_proj.{suffix}" for p in "qkv"])
    if target.endswith("gate_up_proj.weight"):
        base = target[: -len("gate_up_proj.weight")]
        return stack([base + "gate_proj.weight", base + "up_proj.weight"])
    if target.endswith("fused_qkv_a_proj.weight"):
        base = target[: -len("fused_qkv_a_proj.weight")]
        return stack([base + "q_a_proj.weight", base + "kv_a_proj_with_mqa.weight"])
    if ".experts.w13_weight" in target or ".experts.w2_weight" in target:
        base = target.split("experts.")[0] + "experts."
        E = c.get("n_routed_experts") or c.get("num_experts") or c.get("num_local_experts")
        g, u, d = ("w1", "w3", "w2") if c["model_type"] == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        if target.endswith("w13_weight"):
            return torch.stack([stack([f"{base}{e}.{g}.weight", f"{base}{e}.{u}.weight"]) for e in range(E)])
        return torch.stack([get(f"{base}{e}.{d}.weight") for e in range(E)])
    return get(target)


def raw_tensors(d):
    index = json.loads((d / "model.safetensors.index.json").read_text())
    out = {}
    for f in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(d / f)))
    return out


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
    # small slots split tensors by rows; on the GPU the pinned-slot path (io="pread") runs beside mmap (default)
    small = pyloader.ExecutorConfig(slot_bytes=1 << 16, num_slots=3, read_threads=4, io="pread" if fp8 else "mmap") \
        if family in ("llama", "qwen2") else None
    report = pyloader.load(targets, d, backend=None if device == "cuda" else "torch", progress=False, executor=small)
    assert report.missing == [] and report.unexpected == []
    if device == "cuda" and small is not None:
        assert report.io == ("pread" if small.io == "auto" else small.io)
    raw = raw_tensors(d)
    for name, t in targets.items():
        want = expected_tensor(name, raw, c, t.dtype).to(device)
        if device == "cuda":
            want = expected_tensor(name, {k: v.cuda() for k, v in raw.items()}, c, t.dtype)
        assert_bitwise_equal(t, want, what=f"{family} {name}")


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


@pytest.mark.gpu
def test_real_runai_streamer_as_a_source(tmp_path):
    """The Nemotron Nano VL failure with the real run:ai streamer (a carried wheel on the device):
    its tensors live in one reused buffer; the load must equal the directory load bitwise."""
    runai = pytest.importorskip("runai_model_streamer")
    c = dict(TINY["qwen3_moe"], quantization_config={"quant_method": "fp8"})
    d = write_checkpoint(tmp_path / "r", c, scale_dtype=torch.bfloat16, shard_bytes=300_000)
    preset = build_preset(c)
    ref = allocate_targets(preset.targets, "cuda")
    pyloader.load(ref, d, progress=False)
    out = {n: poison_(t) for n, t in allocate_targets(preset.targets, "cuda").items()}
    files = sorted(str(p) for p in d.glob("*.safetensors"))
    with runai.SafetensorsStreamer() as s:
        s.stream_files(files)
        report = pyloader.load(out, s.get_tensors(), config=c, progress=False)
    assert report.missing == []
    for n in ref:
        assert_bitwise_equal(out[n], ref[n], what=n)
