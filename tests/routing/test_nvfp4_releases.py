"""The NVFP4 releases whose configs ../shared/checkpoints/ holds (their real config.json and
ModelOpt hf_quant_config.json, exclude lists included), at full width and a few layers of each
kind: every tensor of the checkpoint their configs describe — NVFP4 where the release quantizes, BF16 where it excludes —
routes into the preset's BF16 targets with no unexpected name, every target covered, and every
NVFP4 weight recognized and planned as a dequantizing read."""

import json
from pathlib import Path

import pytest

from pyloader.format.checkpoint import Checkpoint
from pyloader.format.quant import declared_from, recognize
from pyloader.format.safetensors import TensorInfo
from pyloader.parallel import Parallel
from pyloader.routing.plan import build_plan
from pyloader.routing.presets import build_preset
from pyloader.synthetic import checkpoint_tensors

SHARED = Path(__file__).resolve().parents[3] / "shared" / "checkpoints"
F = Path("/nvfp4/model.safetensors")
RELEASES = {"deepseek-v3.1-nvfp4": "modelopt", "deepseek-v3.2-nvfp4": "modelopt", "qwen3-235b-a22b-nvfp4": "modelopt",
            "kimi-k2.5-nvfp4": "compressed-tensors", "kimi-k2.6-nvfp4": "modelopt", "kimi-k2.7-code-nvfp4": "modelopt",
            "glm-5-nvfp4": "modelopt", "glm-5.1-nvfp4": "modelopt", "glm-5.2-nvfp4": "modelopt",
            "minimax-m2.5-nvfp4": "modelopt", "minimax-m2.7-nvfp4": "modelopt"}
# The Nemotron-3 NVFP4 releases' hybrid layers route in tests/routing/test_presets.py (nemotron_h_entries).


def nvfp4_tensors(config: dict, declared, form: str, prefix: str = ""):
    """Header entries (no data) of the NVFP4 checkpoint for ``config``."""
    out, pos = {}, 0

    def add(name, dtype, shape, nbytes):
        nonlocal pos
        out[name] = TensorInfo(name, dtype, tuple(shape), F, pos, pos + nbytes)
        pos += nbytes

    for name, shape, linear in checkpoint_tensors(config):
        name = prefix + name
        module = name[: -len(".weight")]
        if not linear or declared.is_excluded(module) or len(shape) != 2:
            add(name, "BF16", shape, 2 * shape[0] * (shape[1] if len(shape) > 1 else 1))
            continue
        n, k = shape
        packed = name if form == "modelopt" else module + ".weight_packed"
        add(packed, "U8", (n, k // 2), n * k // 2)
        add(module + ".weight_scale", "F8_E4M3", (n, k // 16), n * k // 16)
        if form == "modelopt":
            add(module + ".weight_scale_2", "F32", (), 4)
            add(module + ".input_scale", "F32", (), 4)
        else:
            add(module + ".weight_global_scale", "F32", (1,), 4)
            add(module + ".input_global_scale", "F32", (1,), 4)
    return out


@pytest.mark.parametrize("release", sorted(RELEASES))
def test_nvfp4_release_routes_into_bf16_targets(release):
    folder = SHARED / release
    if not folder.is_dir():
        pytest.skip("shared checkpoints not here")
    config = json.loads((folder / "config.json").read_text())
    hq_path = folder / "hf_quant_config.json"
    hq = json.loads(hq_path.read_text()) if hq_path.is_file() else None
    wrapped = config.get("model_type") == "kimi_k25"
    text = config["text_config"] if wrapped else config
    prefix = "language_model." if wrapped else ""
    declared = declared_from(config, hq)
    # every kind of layer (dense, MoE) at full width, a few of each: the full depth repeats them
    text = dict(text, num_hidden_layers=(text.get("first_k_dense_replace") or 0) + 3)
    config = dict(config, text_config=text) if wrapped else text
    tensors = nvfp4_tensors(dict(text, tie_word_embeddings=text.get("tie_word_embeddings", False)), declared,
                            RELEASES[release], prefix)
    rec = recognize(tensors, config, hq)
    packed = {n for n, t in tensors.items() if t.dtype == "U8"}
    assert set(rec.quantized) == packed and all(q.scheme == "nvfp4" for q in rec.quantized.values())
    n_layers = text["num_hidden_layers"]
    dequant = []
    for rank in (0, 1):  # both pipeline stages
        preset = build_preset(config, parallel=Parallel(pp_rank=rank, pp_size=2))
        plan = build_plan(Checkpoint(None, [F], tensors), preset.targets, preset.rules, quant=rec)
        assert plan.summary.unexpected == [] and plan.missing == []
        dequant += [p for p in plan.pieces if p.transform == "dequant"]
        layers = {p.layer for p in plan.pieces if p.layer is not None}
        assert layers and max(layers) < n_layers
    assert {p.source.name for p in dequant} == {q.name for q in rec.quantized.values()}
    assert all(p.quant is not None and p.quant.scheme == "nvfp4" for p in dequant)
