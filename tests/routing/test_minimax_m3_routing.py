"""MiniMax-M3 (``minimax_m3`` text, ``minimax_m3_vl`` release): the real configs of ../shared/checkpoints at
full width and a few layers of each kind (dense attention + dense MLP, sparse attention with the
indexer + MoE). The NVFP4 release's own module list (``hf_quant_config.json``'s ``quantized_layers``,
22,422 modules) names every linear the synthesized checkpoint holds; its mixed schemes (MXFP8
attention, dense and shared MLPs; NVFP4 experts) are recognized from the layouts and checked against
that list; every tensor routes into vLLM's targets (``qkv_proj`` = q | k | v | index_q | index_k)
with no unexpected name and every target covered, at TP 1/2/8 and PP 2."""

import json
from pathlib import Path

import pytest

from pyloader.format.checkpoint import Checkpoint
from pyloader.format.quant import recognize
from pyloader.format.safetensors import CheckpointError, TensorInfo
from pyloader.parallel import Parallel
from pyloader.routing.plan import build_plan
from pyloader.routing.presets import build_preset, choose_preset
from pyloader.synthetic import checkpoint_tensors

SHARED = Path(__file__).resolve().parents[3] / "shared" / "checkpoints"
F = Path("/minimax-m3/model.safetensors")
LAYERS = 5  # three dense layers (dense attention, dense MLP), then two sparse-attention MoE layers
VISION = {"vision_tower.blocks.0.attn.qkv.weight": (3456, 1152), "vision_tower.blocks.0.mlp.fc1.weight": (4304, 1152),
          "multi_modal_projector.linear_1.weight": (6144, 4608), "patch_merge_mlp.0.weight": (4608, 4608)}


def _folder(name):
    folder = SHARED / name
    if not folder.is_dir():
        pytest.skip("shared checkpoints not here")
    return folder


def _few_layers(text: dict) -> dict:
    return dict(text, num_hidden_layers=LAYERS)


def _entries(tensors, name, dtype, shape):
    nbytes = {"BF16": 2, "F32": 4}.get(dtype, 1)
    for d in shape:
        nbytes *= d
    start = max((t.end for t in tensors.values()), default=0)
    tensors[name] = TensorInfo(name, dtype, tuple(shape), F, start, start + max(nbytes, 1))


def release_tensors(config: dict, hq: dict):
    """Header entries of the NVFP4 release for ``config`` (few layers): each linear in the scheme
    ``quantized_layers`` gives it (NVFP4: U8 values, E4M3 per-16 scales, weight_scale_2 and input_scale;
    MXFP8: E4M3 values, U8 E8M0 per-32 scales), the rest BF16, the vision tower beside it."""
    layers = hq["quantization"]["quantized_layers"]
    text = _few_layers(config["text_config"])
    out = {}
    for name, shape, linear in checkpoint_tensors(dict(text, model_type="minimax_m3")):
        name = "language_model." + name
        module = name[: -len(".weight")]
        algo = layers.get(module, {}).get("quant_algo") if linear else None
        if algo == "NVFP4":
            n, k = shape
            _entries(out, name, "U8", (n, k // 2))
            _entries(out, module + ".weight_scale", "F8_E4M3", (n, k // 16))
            _entries(out, module + ".weight_scale_2", "F32", ())
            _entries(out, module + ".input_scale", "F32", ())
        elif algo == "MXFP8":
            n, k = shape
            _entries(out, name, "F8_E4M3", (n, k))
            _entries(out, module + ".weight_scale", "U8", (n, k // 32))
        else:
            _entries(out, name, "F32" if name.endswith("e_score_correction_bias") else "BF16", shape)
    for name, shape in VISION.items():
        _entries(out, name, "BF16", shape)
    return out


def test_synthesized_linears_are_the_release_module_list():
    """Every linear of the few layers is a module of the release's quantized_layers (or its exclude
    list: the routers), and every listed module of those layers is synthesized: the names are real."""
    hq = json.loads((_folder("minimax-m3-nvfp4") / "hf_quant_config.json").read_text())
    config = json.loads((_folder("minimax-m3-nvfp4") / "config.json").read_text())
    listed = {m for m in hq["quantization"]["quantized_layers"]
              if m.startswith("language_model.model.layers.") and int(m.split(".")[3]) < LAYERS}
    made = {"language_model." + n[: -len(".weight")] for n, _, linear in
            checkpoint_tensors(dict(_few_layers(config["text_config"]), model_type="minimax_m3")) if linear}
    routers = {m for m in made if m.endswith("block_sparse_moe.gate")}
    assert made - routers == listed
    assert all(m in hq["quantization"]["exclude_modules"] for m in routers)


@pytest.mark.parametrize("tp", [1, 2, 8])
def test_nvfp4_release_routes_with_mixed_schemes(tp):
    folder = _folder("minimax-m3-nvfp4")
    config = json.loads((folder / "config.json").read_text())
    hq = json.loads((folder / "hf_quant_config.json").read_text())
    assert choose_preset(config) == "minimax_m3_vl"
    config = dict(config, text_config=_few_layers(config["text_config"]))
    tensors = release_tensors(config, hq)
    rec = recognize(tensors, config, hq)
    schemes = {q.name: q.scheme for q in rec.quantized.values()}
    assert set(schemes.values()) == {"nvfp4", "mxfp8"}
    assert all((s == "nvfp4") == (".experts." in n) for n, s in schemes.items())
    for pp_rank, pp_size in ((0, 1), (0, 2), (1, 2)):
        preset = build_preset(config, parallel=Parallel(tp_rank=tp - 1, tp_size=tp, pp_rank=pp_rank, pp_size=pp_size))
        preset.add_passthrough(tensors)
        plan = build_plan(Checkpoint(None, [F], tensors), preset.targets, preset.rules, quant=rec)
        assert plan.summary.unexpected == [] and plan.missing == []
        if pp_rank == 0:  # the towers pass through on the first stage
            assert all(name in preset.targets for name in VISION)
    qkv = build_preset(config, parallel=Parallel(tp_rank=tp - 1, tp_size=tp)).targets
    hd, idim = 128, 128
    sparse = qkv["language_model.model.layers.3.self_attn.qkv_proj.weight"]
    dense = qkv["language_model.model.layers.0.self_attn.qkv_proj.weight"]
    kv_rows = max(1, 4 // tp) * hd  # 4 KV heads; one a rank (replicated) past TP 4
    assert dense.shape == (64 // tp * hd + 2 * kv_rows, 6144)
    assert sparse.shape == (dense.shape[0] + kv_rows * idim // hd + idim, 6144)  # index_q as the KV heads, index_k whole
    assert sparse.shards["index_k"].src_rows == (0, idim)


def test_bf16_text_model_routes():
    config = _few_layers(json.loads((_folder("minimax-m3") / "config.json").read_text()))
    tensors = {}
    for name, shape, _ in checkpoint_tensors(config):
        _entries(tensors, name, "F32" if name.endswith("e_score_correction_bias") else "BF16", shape)
    _entries(tensors, "mtp.0.eh_proj.weight", "BF16", (6144, 12288))  # the draft modules are the draft model's
    preset = build_preset(config, parallel=Parallel(tp_rank=0, tp_size=2))
    plan = build_plan(Checkpoint(None, [F], tensors), preset.targets, preset.rules)
    assert plan.summary.unexpected == [] and plan.missing == []
    t = preset.targets
    assert t["model.layers.0.mlp.gate_up_proj.weight"].shape == (12288, 6144)  # dense_intermediate_size, TP 2
    assert t["model.layers.3.block_sparse_moe.shared_experts.gate_up_proj.weight"].shape == (3072, 6144)
    assert t["model.layers.3.block_sparse_moe.experts.w13_weight"].shape == (128, 3072, 6144)
    assert "model.layers.0.self_attn.index_q_norm.weight" not in t
    assert "model.layers.3.self_attn.index_q_norm.weight" in t


def test_quantized_layers_disagreeing_with_the_layout_is_an_error():
    folder = _folder("minimax-m3-nvfp4")
    config = json.loads((folder / "config.json").read_text())
    hq = json.loads((folder / "hf_quant_config.json").read_text())
    config = dict(config, text_config=_few_layers(config["text_config"]))
    tensors = release_tensors(config, hq)
    module = "language_model.model.layers.3.self_attn.o_proj"
    swapped = json.loads(json.dumps(hq))
    swapped["quantization"]["quantized_layers"][module] = {"quant_algo": "NVFP4", "group_size": 16}
    with pytest.raises(CheckpointError, match="o_proj.*is NVFP4, but its tensors are laid out as mxfp8"):
        recognize(tensors, config, swapped)
    # a listed module stored in float: the scales were lost, not the quantization
    plain = dict(tensors)
    del plain[module + ".weight_scale"]
    plain[module + ".weight"] = TensorInfo(module + ".weight", "BF16", (6144, 8192), F, 0, 6144 * 8192 * 2)
    with pytest.raises(CheckpointError, match="o_proj.*is MXFP8, but its weight is a plain BF16 tensor"):
        recognize(plain, config, hq)


def test_layer_kinds_default_as_vllm_does():
    """No sparse_attention_freq: no layer has the indexer; no moe_layer_freq: every layer is a MoE."""
    config = _few_layers(json.loads((_folder("minimax-m3") / "config.json").read_text()))
    config["sparse_attention_config"] = {k: v for k, v in config["sparse_attention_config"].items()
                                         if k != "sparse_attention_freq"}
    del config["moe_layer_freq"]
    t = build_preset(config).targets
    assert not any("index_" in n for n in t)
    assert all(f"model.layers.{i}.block_sparse_moe.experts.w13_weight" in t for i in range(LAYERS))
