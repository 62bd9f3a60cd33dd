"""``pyloader.from_pretrained`` against transformers' own ``from_pretrained``: the tiny FP8
checkpoints dequantized by pyloader must give the state dict and logits of the BF16 checkpoint of
the dequantized values loaded by transformers, bit for bit."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import pyloader  # noqa: E402
from models import write_models  # noqa: E402

from helpers import assert_bitwise_equal  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_models(tmp_path_factory.mktemp("tf"))


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe", "deepseek_v3"])
def test_fp8_checkpoint_into_bf16_matches_transformers_on_the_dequantized_checkpoint(models, kind):
    got = pyloader.from_pretrained(models[kind]["fp8"], device="cpu", progress=False)
    want = transformers.AutoModelForCausalLM.from_pretrained(str(models[kind]["ref"]), dtype=torch.bfloat16)
    a, b = got.state_dict(), want.state_dict()
    assert set(a) == set(b)
    for name in a:
        assert_bitwise_equal(a[name], b[name], name)
    assert got.pyloader_report.missing == [] and got.pyloader_report.unexpected == []
    x = torch.tensor([[1, 2, 3, 4, 5, 6, 7]])
    with torch.no_grad():
        assert_bitwise_equal(got(x).logits, want(x).logits, "logits")


def test_bf16_checkpoint_loads_as_transformers_does(models):
    got = pyloader.from_pretrained(models["qwen3_moe"]["bf16"], device="cpu", progress=False)
    want = transformers.AutoModelForCausalLM.from_pretrained(str(models["qwen3_moe"]["bf16"]), dtype=torch.bfloat16)
    for name, t in want.state_dict().items():
        assert_bitwise_equal(got.state_dict()[name], t, name)


def test_a_name_the_model_lacks_fails_before_any_weight_with_a_hint(models, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path / "typo"
    shutil.copytree(models["qwen3"]["fp8"], d)
    t = load_file(str(d / "model.safetensors"))
    t["model.layers.1.post_attention_layernorm.weigth"] = t.pop("model.layers.1.post_attention_layernorm.weight")
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(pyloader.PyloaderInputError) as e:
        pyloader.from_pretrained(d, device="cpu", progress=False)
    msg = str(e.value)
    assert "model.layers.1.post_attention_layernorm.weigth" in msg and "did you mean" in msg.lower()
    assert "model.layers.1.post_attention_layernorm.weight" in msg  # also: the parameter nothing writes


QWEN3_5_MOE = dict(hidden_size=128, head_dim=32, num_attention_heads=4, num_key_value_heads=2, linear_key_head_dim=32,
                   linear_value_head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_conv_kernel_dim=4,
                   num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=64,
                   num_hidden_layers=4, layer_types=["linear_attention"] * 3 + ["full_attention"], vocab_size=256,
                   max_position_embeddings=512, attn_output_gate=True, tie_word_embeddings=False)


def test_qwen3_5_moe_nvfp4_release_into_bf16_matches_transformers(tmp_path):
    """Qwen3.5-MoE (gated DeltaNet and gated full attention, shared expert) as NVIDIA's NVFP4 releases
    store it (ModelOpt: experts and full attention in NVFP4 with ``weight_scale_2``, linear attention,
    shared experts and gates excluded in ``hf_quant_config.json``), dequantized by
    ``pyloader.from_pretrained``: the state dict and logits of transformers' own load of the BF16
    checkpoint of the dequantized values (the tests' float formula), bit for bit."""
    import json
    import sys
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from quantizers import formula, quantize_nvfp4

    config = transformers.CONFIG_MAPPING["qwen3_5_moe_text"](**QWEN3_5_MOE)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p, dtype=torch.float32))
    model.save_pretrained(tmp_path / "bf16")
    q_dir, ref = tmp_path / "nvfp4", tmp_path / "ref"
    q_out, r_out = {}, {}
    for name, t in load_file(str(tmp_path / "bf16" / "model.safetensors")).items():
        if name.endswith(".weight") and (".mlp.experts." in name or ".self_attn." in name) and t.dim() == 2:
            codes, scale, g = quantize_nvfp4(t.float())
            base = name[: -len("weight")]
            q_out.update({name: codes, base + "weight_scale": scale, base + "weight_scale_2": g.reshape(()),
                          base + "input_scale": torch.tensor(1.0)})
            r_out[name] = formula(codes, t.shape[1], "e2m1", scale, (1, 16), g=g, mode="mul")
        else:
            q_out[name] = r_out[name] = t
    for d, tensors in ((q_dir, q_out), (ref, r_out)):
        d.mkdir()
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
        if d == q_dir:
            cfg["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "NVFP4"}
            (d / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt"}, "quantization": {
                "quant_algo": "NVFP4", "group_size": 16, "exclude_modules": [
                    "lm_head", "model.layers.*.linear_attn*", "model.layers.*.mlp.shared_expert*",
                    "model.layers.*.mlp.gate"]}}))
        (d / "config.json").write_text(json.dumps(cfg))
    got = pyloader.from_pretrained(q_dir, device="cpu", progress=False)
    want = transformers.AutoModelForCausalLM.from_pretrained(str(ref), dtype=torch.bfloat16)
    a, b = got.state_dict(), want.state_dict()
    assert set(a) == set(b)
    for name in a:
        assert_bitwise_equal(a[name], b[name], name)
    assert got.pyloader_report.maxima  # the NVFP4 weights went through the gated dequant
    x = torch.tensor([[1, 2, 3, 4, 5, 6, 7]])
    with torch.no_grad():
        assert_bitwise_equal(got(x).logits, want(x).logits, "logits")
