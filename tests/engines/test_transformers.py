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
