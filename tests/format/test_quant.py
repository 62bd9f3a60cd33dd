"""Recognition of every quantized format by layout, checked against the config: what each real
layout becomes, and a clean refusal (naming the tensor and file) for everything ambiguous."""

from pathlib import Path

import pytest

from pyloader.errors import PyloaderInputError
from pyloader.format.quant import check_methods, declared_from, recognize
from pyloader.format.safetensors import CheckpointError, TensorInfo

F = Path("/ck/model-00001-of-00002.safetensors")


def t(name, dtype, shape):
    return name, TensorInfo(name, dtype, tuple(shape), F, 0, 1)


def tensors(*items):
    return dict(t(*i) for i in items)


def test_deepseek_v4_dense_fp8_and_fp4_experts():
    ts = tensors(("layers.0.attn.wq_a.weight", "F8_E4M3", (1024, 4096)),
                 ("layers.0.attn.wq_a.scale", "F8_E8M0", (8, 32)),
                 ("layers.0.ffn.experts.3.w1.weight", "I8", (2048, 2048)),
                 ("layers.0.ffn.experts.3.w1.scale", "F8_E8M0", (2048, 128)),
                 ("layers.0.attn_norm.weight", "BF16", (4096,)))
    cfg = {"expert_dtype": "fp4", "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128],
                                                          "scale_fmt": "ue8m0"}}
    rec = recognize(ts, cfg)
    dense = rec.quantized["layers.0.attn.wq_a.weight"]
    assert (dense.scheme, dense.block, dense.shape) == ("fp8-block", (128, 128), (1024, 4096))
    ex = rec.quantized["layers.0.ffn.experts.3.w1.weight"]
    assert (ex.scheme, ex.packing, ex.block, ex.shape) == ("fp4-e8m0", "e2m1", (1, 32), (2048, 4096))
    assert "layers.0.attn_norm.weight" not in rec.consumed


def test_nvfp4_modelopt_and_compressed_tensors_forms():
    ts = tensors(("m.experts.0.up_proj.weight", "U8", (64, 128)), ("m.experts.0.up_proj.weight_scale", "F8_E4M3", (64, 16)),
                 ("m.experts.0.up_proj.weight_scale_2", "F32", ()), ("m.experts.0.up_proj.input_scale", "F32", ()),
                 ("m.o_proj.weight_packed", "U8", (64, 128)), ("m.o_proj.weight_scale", "F8_E4M3", (64, 16)),
                 ("m.o_proj.weight_global_scale", "F32", (1,)), ("m.o_proj.input_global_scale", "F32", (1,)))
    rec = recognize(ts, {}, {"quantization": {"quant_algo": "NVFP4"}})
    a = rec.quantized["m.experts.0.up_proj.weight"]
    b = rec.quantized["m.o_proj.weight_packed"]
    assert (a.scheme, a.global_mode, a.shape) == ("nvfp4", "mul", (64, 256))
    assert (b.scheme, b.global_mode, b.name) == ("nvfp4", "div", "m.o_proj.weight")
    assert rec.consumed == set(ts)  # activation scales go with their weights


def test_int4_pack_quantized_with_weight_shape():
    ts = tensors(("l.gate_proj.weight_packed", "I32", (16, 6)), ("l.gate_proj.weight_scale", "BF16", (16, 2)),
                 ("l.gate_proj.weight_shape", "I32", (2,)))
    cfg = {"quantization_config": {"quant_method": "compressed-tensors", "config_groups": {"g": {
        "format": "pack-quantized", "weights": {"num_bits": 4, "type": "int", "group_size": 32}}}}}
    q = recognize(ts, cfg, read_small=lambda info: [16, 44]).quantized["l.gate_proj.weight_packed"]
    assert (q.scheme, q.name, q.shape, q.block) == ("int4", "l.gate_proj.weight", (16, 44), (1, 32))
    with pytest.raises(CheckpointError, match=r"weight_shape \[16, 60\] disagrees"):
        recognize(ts, cfg, read_small=lambda info: [16, 60])


def test_mxfp8_and_gpt_oss_mxfp4():
    ts = tensors(("a.weight", "F8_E4M3", (64, 96)), ("a.weight_scale", "U8", (64, 3)),
                 ("e.gate_up_proj_blocks", "U8", (4, 40, 2, 16)), ("e.gate_up_proj_scales", "U8", (4, 40, 2)),
                 ("e.gate_up_proj_bias", "BF16", (4, 40)))
    rec = recognize(ts, {"quantization_config": {"quant_method": "mxfp8", "weight_block_size": [1, 32]}})
    assert rec.quantized["a.weight"].scheme == "mxfp8"
    g = rec.quantized["e.gate_up_proj_blocks"]
    assert (g.scheme, g.name, g.shape) == ("mxfp4", "e.gate_up_proj", (4, 40, 64))
    assert "e.gate_up_proj_bias" not in rec.consumed


def test_per_tensor_and_per_channel_fp8():
    ts = tensors(("a.weight", "F8_E4M3", (64, 96)), ("a.weight_scale", "F32", ()), ("a.input_scale", "F32", ()),
                 ("b.weight", "F8_E4M3", (64, 96)), ("b.weight_scale", "BF16", (64, 1)))
    rec = recognize(ts, {"quantization_config": {"quant_method": "compressed-tensors"}})
    assert rec.quantized["a.weight"].scheme == "fp8-tensor" and rec.quantized["b.weight"].scheme == "fp8-channel"


@pytest.mark.parametrize("items,config,needle", [
    # a scale whose shape fits no format of its weight
    ([("x.weight", "U8", (64, 64)), ("x.weight_scale", "F8_E8M0", (64, 3))], {}, "expected [64, 4]"),
    ([("x.weight", "U8", (64, 64)), ("x.weight_scale", "F8_E4M3", (64, 4)), ("x.weight_scale_2", "F32", ())], {},
     "expected [64, 8]"),
    # FP4 bytes whose scale is a float: not an FP4 scale format
    ([("x.weight", "U8", (64, 64)), ("x.weight_scale", "F32", (64, 4))], {}, "FP4 takes"),
    # a packed weight without its scales
    ([("x.weight_packed", "U8", (64, 64))], {}, "without its scales"),
    ([("layers.0.ffn.experts.1.w1.weight", "I8", (64, 64))], {"expert_dtype": "fp4"}, "without its scales"),
    # NVFP4 without a second level, or with both
    ([("x.weight", "U8", (64, 64)), ("x.weight_scale", "F8_E4M3", (64, 8))], {}, "found neither"),
    ([("x.weight", "U8", (64, 64)), ("x.weight_scale", "F8_E4M3", (64, 8)), ("x.weight_scale_2", "F32", ()),
      ("x.weight_global_scale", "F32", (1,))], {}, "found both"),
    # U8 scales off the MX grid: raw exponents or bytes? never guessed
    ([("x.weight", "F8_E4M3", (256, 256)), ("x.weight_scale_inv", "U8", (2, 2))], {}, "U8 scales are E8M0 exponents"),
    # FP8 without scale; a scale without a weight; an E8M0 tensor that scales nothing
    ([("x.weight", "F8_E4M3", (64, 64))], {}, "has no scale tensor"),
    ([("x.weight", "BF16", (64, 64)), ("x.weight_scale", "F32", ())], {}, "a scale with no weight"),
    ([("x.bias", "F8_E8M0", (64,))], {}, "E8M0 tensor that scales no weight"),
    # a quantized tensor in a module the config excludes
    ([("m.self_attn.q.weight", "U8", (64, 64)), ("m.self_attn.q.weight_scale", "F8_E8M0", (64, 4))],
     {"quantization_config": {"quant_method": "compressed-tensors", "ignore": ["re:.*self_attn.*"]}}, "excludes"),
    # INT4 without its scale, and with a zero point
    ([("x.weight_packed", "I32", (8, 4))], {}, "no weight_scale"),
    ([("x.weight_packed", "I32", (8, 4)), ("x.weight_scale", "BF16", (8, 1)), ("x.weight_zero_point", "I32", (8, 1))],
     {}, "asymmetric"),
])
def test_ambiguous_or_inconsistent_is_an_error_naming_the_tensor(items, config, needle):
    with pytest.raises(CheckpointError) as e:
        recognize(tensors(*items), config)
    msg = str(e.value)
    assert needle in msg and str(F) in msg and ("x." in msg or "m." in msg or "layers." in msg), msg


def test_unknown_methods_are_refused():
    for q in ({"quant_method": "awq"}, {"quant_method": "gptq"}, {"quant_method": "bitsandbytes"},
              {"quant_method": "compressed-tensors", "format": "marlin-24"}):
        with pytest.raises(PyloaderInputError, match="not a format pyloader reads"):
            check_methods({"quantization_config": q})
    check_methods({"quantization_config": {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized"}})


def test_declared_reads_real_configs():
    import json

    root = Path(__file__).resolve().parents[3] / "shared" / "checkpoints"
    if not root.is_dir():
        pytest.skip("shared checkpoints not here")
    dsv4 = declared_from(json.loads((root / "deepseek-v4-flash" / "config.json").read_text()))
    assert dsv4.expert_fp4 and dsv4.block == (128, 128)
    gpt = declared_from(json.loads((root / "gpt-oss-20b" / "config.json").read_text()))
    assert gpt.mx and gpt.is_excluded("model.layers.3.self_attn") and not gpt.is_excluded("model.layers.3.mlp.experts")
    nv = json.loads((root / "deepseek-v4-flash-nvfp4" / "hf_quant_config.json").read_text())
    d = declared_from(json.loads((root / "deepseek-v4-flash-nvfp4" / "config.json").read_text()), nv)
    assert d.is_excluded("layers.0.attn.wq_a") and d.is_excluded("mtp.0.ffn") and not d.is_excluded("layers.0.ffn.experts.1")
    # ModelOpt left the attention alone: in the release's own block FP8, never in NVFP4
    assert not d.excludes("layers.0.attn.wq_a", "fp8-block") and d.excludes("layers.0.attn.wq_a", "nvfp4")
    assert gpt.excludes("model.layers.3.self_attn", "fp8-block")  # no FP8 declared there: excluded is excluded


# ---------------------------------------------------------------- fuzzed quantization declarations

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_leaf = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.sampled_from([2 ** 40, 10 ** 30, 16, 32]),
                  st.floats(allow_nan=True), st.text(max_size=4),
                  st.sampled_from(["NVFP4", "FP8", "MIXED_PRECISION", "fp8", "mxfp4", "compressed-tensors", "modelopt",
                                   "int", "float", "re:.*", "re:(", "*", "[", "pack-quantized"]))
_json = st.recursive(_leaf, lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                   st.dictionaries(st.sampled_from(
                                                       ["quant_method", "quant_algo", "weight_block_size", "ignore",
                                                        "exclude_modules", "modules_to_not_convert", "config_groups",
                                                        "weights", "num_bits", "type", "group_size", "format",
                                                        "quantization", "quantized_layers", "expert_dtype", "x"]),
                                                       kids, max_size=4)), max_leaves=12)
NVFP4_TENSORS = tensors(("m.experts.0.up_proj.weight", "U8", (64, 128)),
                        ("m.experts.0.up_proj.weight_scale", "F8_E4M3", (64, 16)),
                        ("m.experts.0.up_proj.weight_scale_2", "F32", ()),
                        ("m.self_attn.q_proj.weight", "F8_E4M3", (256, 256)),
                        ("m.self_attn.q_proj.weight_scale_inv", "F32", (2, 2)),
                        ("m.down.weight_packed", "I32", (16, 6)), ("m.down.weight_scale", "BF16", (16, 2)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_json, st.dictionaries(st.sampled_from(["quantization_config", "text_config", "expert_dtype"]), _json,
                                        max_size=3)),
       st.one_of(st.none(), _json, st.fixed_dictionaries({"quantization": _json})))
def test_fuzzed_quantization_configs_are_read_or_refused(config, hf_quant):
    """config.json quantization declarations and hf_quant_config.json, fuzzed: recognition gives
    a result or pyloader's input error (naming what is wrong), never another exception."""
    try:
        check_methods(config if isinstance(config, dict) else {})
        rec = recognize(NVFP4_TENSORS, config if isinstance(config, dict) else {}, hf_quant)
    except PyloaderInputError as e:
        assert str(e)
        return
    assert set(rec.quantized) <= set(NVFP4_TENSORS)


def test_fuzzed_hf_quant_config_file_through_convert(tmp_path, capsys):
    """An unreadable hf_quant_config.json is refused by convert with exit 2 and its name."""
    import torch
    from safetensors.torch import save_file

    from pyloader.cli import main

    d = tmp_path / "src"
    d.mkdir()
    save_file({"a.weight": torch.zeros(4, 4, dtype=torch.bfloat16)}, str(d / "model.safetensors"))
    (d / "config.json").write_text("{}")
    for text in ("{", "[1, 2]", '{"quantization": ' + "[" * 50_000 + "]" * 50_000 + "}"):
        (d / "hf_quant_config.json").write_text(text)
        assert main(["convert", str(d), str(tmp_path / "out"), "--device", "cpu", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "hf_quant_config.json" in err and "Traceback" not in err


def test_an_invalid_exclude_regex_is_an_input_error():
    cfg = {"quantization_config": {"quant_method": "compressed-tensors", "ignore": ["re:(unclosed"]}}
    with pytest.raises(PyloaderInputError, match="not a valid regular expression"):
        recognize(NVFP4_TENSORS, cfg)
