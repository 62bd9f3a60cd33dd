"""``pyloader convert`` of every quantized format, end to end on CPU: a small checkpoint of each
family (real tensor names, shrunk shapes, written with the tests' own quantizers) → a BF16
directory whose every tensor is bitwise the independent formula (dequantized) or the source
bytes (copied), that ``safetensors`` reads, whose config no longer declares a quantization, and
whose scales are gone. The sanity gate stops each shipped misreading of a scale."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pyloader.cli import main
from pyloader.convert import convert
from pyloader.errors import PyloaderInputError

from helpers import assert_bitwise_equal
from quantizers import formula, quantize_fp4_e8m0, quantize_fp8, quantize_int4, quantize_nvfp4


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.05


def write(d, tensors, config, hf_quant=None, files=1):
    d.mkdir(parents=True)
    names = sorted(tensors)
    weight_map = {}
    for i in range(files):
        part = {n: tensors[n] for n in names[i::files]}
        fname = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        save_file(part, str(d / fname))
        weight_map.update({n: fname for n in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps(config))
    if hf_quant is not None:
        (d / "hf_quant_config.json").write_text(json.dumps(hf_quant))


def read_all(d):
    out = {}
    index = json.loads((d / "model.safetensors.index.json").read_text())
    for f in sorted(set(index["weight_map"].values())):
        with safe_open(str(d / f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    assert set(out) == set(index["weight_map"])
    return out


def deepseek_v4():
    """DeepSeek-V4-Flash names: FP8 attention/shared experts with F8_E8M0 128x128 scales, FP4 routed
    experts (I8 codes, E8M0 per-32), BF16 norms and embeddings."""
    t, expect = {}, {}
    for name, shape in (("layers.0.attn.wq_a.weight", (256, 384)), ("layers.0.ffn.shared_experts.w1.weight", (200, 384))):
        q, s = quantize_fp8(rand(*shape, seed=len(name)), e8m0=True)
        t[name], t[name[:-len("weight")] + "scale"] = q, s
        expect[name] = formula(q, shape[1], None, s, (128, 128))
    for e in range(2):
        for w, shape in (("w1", (96, 128)), ("w2", (128, 96)), ("w3", (96, 128))):
            name = f"layers.0.ffn.experts.{e}.{w}.weight"
            q, s = quantize_fp4_e8m0(rand(*shape, seed=e * 10 + len(w)), int8=True)
            t[name], t[name[:-len("weight")] + "scale"] = q, s.view(torch.float8_e8m0fnu)
            expect[name] = formula(q, shape[1], "e2m1", s, (1, 32))
    t["layers.0.attn_norm.weight"] = rand(384, seed=9).to(torch.bfloat16)
    t["embed.weight"] = rand(64, 384, seed=8).to(torch.bfloat16)
    config = {"model_type": "deepseek_v4", "expert_dtype": "fp4", "torch_dtype": "bfloat16",
              "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128], "scale_fmt": "ue8m0",
                                      "fmt": "e4m3", "activation_scheme": "dynamic"}}
    return t, expect, config, None


def nvfp4_modelopt():
    """A Qwen3-MoE NVFP4 release as ModelOpt writes it: U8 codes, E4M3 per-16, weight_scale_2
    (multiplier), input_scale; attention and router excluded (BF16)."""
    t, expect = {}, {}
    for e in range(2):
        for w, shape in (("gate_proj", (64, 128)), ("down_proj", (128, 64))):
            name = f"model.layers.0.mlp.experts.{e}.{w}.weight"
            q, s, g = quantize_nvfp4(rand(*shape, seed=e + len(w)))
            base = name[:-len("weight")]
            t[name], t[base + "weight_scale"], t[base + "weight_scale_2"] = q, s, g.reshape(())
            t[base + "input_scale"] = torch.tensor(0.5)
            expect[name] = formula(q, shape[1], "e2m1", s, (1, 16), g=g, mode="mul")
    t["model.layers.0.self_attn.q_proj.weight"] = rand(128, 128, seed=3).to(torch.bfloat16)
    t["model.layers.0.mlp.gate.weight"] = rand(2, 128, seed=4).to(torch.bfloat16)
    config = {"model_type": "qwen3_moe", "torch_dtype": "bfloat16"}
    hq = {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "NVFP4", "group_size": 16,
                                                             "exclude_modules": ["lm_head", "*self_attn*", "*mlp.gate"]}}
    return t, expect, config, hq


def nvfp4_compressed_tensors():
    """compressed-tensors NVFP4 (Kimi-K2.5-NVFP4 style names): weight_packed, E4M3 per-16,
    weight_global_scale (a divisor), input_global_scale."""
    t, expect = {}, {}
    for w, shape in (("gate_proj", (64, 160)), ("up_proj", (64, 160))):
        name = f"language_model.model.layers.1.mlp.experts.0.{w}.weight_packed"
        q, s, g = quantize_nvfp4(rand(*shape, seed=len(w)), divisor=True)
        base = name[:-len("weight_packed")]
        t[name], t[base + "weight_scale"], t[base + "weight_global_scale"] = q, s, g
        t[base + "input_global_scale"] = torch.tensor([2.0])
        expect[base + "weight"] = formula(q, shape[1], "e2m1", s, (1, 16), g=g, mode="div")
    t["language_model.model.layers.1.self_attn.o_proj.weight"] = rand(64, 64, seed=5).to(torch.bfloat16)
    config = {"model_type": "kimi_k25", "quantization_config": {
        "quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
        "config_groups": {"group_0": {"weights": {"num_bits": 4, "type": "float", "group_size": 16},
                                      "targets": ["Linear"]}},
        "ignore": ["language_model.lm_head", "re:.*self_attn.*"]}}
    return t, expect, config, None


def int4_kimi():
    """Kimi-K2.5 INT4 experts (compressed-tensors pack-quantized W4A16): I32 weight_packed, BF16
    per-32 scales, weight_shape; one expert whose K (44) pads its last word."""
    t, expect = {}, {}
    for e, k in ((0, 128), (1, 44)):
        name = f"language_model.model.layers.1.mlp.experts.{e}.down_proj.weight_packed"
        q, s, ws = quantize_int4(rand(64, k, seed=e))
        base = name[:-len("weight_packed")]
        t[name], t[base + "weight_scale"], t[base + "weight_shape"] = q, s, ws
        expect[base + "weight"] = formula(q, k, "int4", s, (1, 32))
    t["language_model.model.embed_tokens.weight"] = rand(32, 64, seed=6).to(torch.bfloat16)
    config = {"model_type": "kimi_k25", "text_config": {"model_type": "deepseek_v3", "quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": {"group_0": {"weights": {"num_bits": 4, "type": "int", "group_size": 32, "strategy": "group",
                                                  "symmetric": True}, "targets": ["Linear"]}}}}}
    return t, expect, config, None


def mxfp8_minimax():
    """MiniMax-M3 MXFP8: F8_E4M3 weights with U8 (not F8_E8M0) per-32 exponents."""
    t, expect = {}, {}
    for w in ("q_proj", "o_proj"):
        name = f"model.layers.0.self_attn.{w}.weight"
        q, s = quantize_fp8(rand(64, 96, seed=len(w)), block=(1, 32), scale_dtype=torch.uint8, e8m0=True)
        t[name], t[name + "_scale"] = q, s
        expect[name] = formula(q, 96, None, s, (1, 32))
    config = {"model_type": "minimax_m3", "quantization_config": {"quant_method": "mxfp8", "weight_block_size": [1, 32]}}
    return t, expect, config, None


def minimax_m3_mixed():
    """MiniMax-M3-NVFP4 as ModelOpt's MIXED_PRECISION writes it: MXFP8 attention (U8 exponents) and
    NVFP4 experts by module (``quantized_layers`` in config.json and hf_quant_config.json), the router
    excluded."""
    t, expect, layers = {}, {}, {}
    p = "language_model.model.layers.3"
    for w in ("q_proj", "index_k_proj"):
        name = f"{p}.self_attn.{w}.weight"
        q, s = quantize_fp8(rand(64, 96, seed=len(w)), block=(1, 32), scale_dtype=torch.uint8, e8m0=True)
        t[name], t[name + "_scale"] = q, s
        expect[name] = formula(q, 96, None, s, (1, 32))
        layers[name[:-len(".weight")]] = {"quant_algo": "MXFP8"}
    for w in ("w1", "w2"):
        name = f"{p}.block_sparse_moe.experts.0.{w}.weight"
        q, s, g = quantize_nvfp4(rand(64, 128, seed=len(w) + 7))
        base = name[:-len("weight")]
        t[name], t[base + "weight_scale"], t[base + "weight_scale_2"] = q, s, g.reshape(())
        t[base + "input_scale"] = torch.tensor(0.5)
        expect[name] = formula(q, 128, "e2m1", s, (1, 16), g=g, mode="mul")
        layers[name[:-len(".weight")]] = {"quant_algo": "NVFP4", "group_size": 16}
    t[f"{p}.block_sparse_moe.gate.weight"] = rand(4, 128, seed=2).to(torch.bfloat16)
    quant = {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": None, "quant_method": "modelopt",
             "exclude_modules": ["lm_head", f"{p}.block_sparse_moe.gate"], "quantized_layers": layers}
    config = {"model_type": "minimax_m3_vl", "architectures": ["MiniMaxM3SparseForConditionalGeneration"],
              "text_config": {"model_type": "minimax_m3"}, "torch_dtype": "bfloat16", "quantization_config": quant}
    hq = {"producer": {"name": "modelopt"}, "quant_method": "modelopt",
          "quantization": {k: v for k, v in quant.items() if k != "quant_method"}}
    return t, expect, config, hq


FAMILIES = {"deepseek-v4": deepseek_v4, "minimax-m3-mixed": minimax_m3_mixed, "nvfp4-modelopt": nvfp4_modelopt, "nvfp4-compressed-tensors":
            nvfp4_compressed_tensors, "int4-kimi": int4_kimi, "mxfp8-minimax": mxfp8_minimax}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_convert_family_bitwise(tmp_path, family):
    tensors, expect, config, hq = FAMILIES[family]()
    src, dst = tmp_path / "src", tmp_path / "dst"
    write(src, tensors, config, hq, files=2)
    (src / "tokenizer.json").write_text("{}")
    report = convert(src, dst, device="cpu", progress=False, max_shard_size=None)
    assert report.dequantized == len(expect) and report.gate_warnings == []
    out = read_all(dst)
    plain = {n for n in tensors if tensors[n].dtype in (torch.bfloat16, torch.float32) and
             not any(n.endswith(s) for s in ("_scale", "_scale_2", "_global_scale", "input_scale"))}
    assert set(out) == set(expect) | plain  # scales, activation scales and weight_shape are gone
    for name, want in expect.items():
        assert_bitwise_equal(out[name], want, name)
    for name in plain:
        assert_bitwise_equal(out[name], tensors[name], name)
    cfg = json.loads((dst / "config.json").read_text())
    assert "quantization_config" not in cfg and "quantization_config" not in cfg.get("text_config", {})
    assert "expert_dtype" not in cfg and cfg["torch_dtype"] == "bfloat16"
    assert not (dst / "hf_quant_config.json").exists() and (dst / "tokenizer.json").exists()
    for name in expect:  # the gate's maximum is taken before rounding: rounded, it is the output's
        got = torch.tensor(report.maxima[name][0]).to(torch.bfloat16)
        assert got == expect[name].abs().max(), (name, report.maxima[name])


def test_convert_nested_text_config_quantization_is_removed(tmp_path):
    tensors, expect, config, hq = int4_kimi()
    write(tmp_path / "src", tensors, config)
    convert(tmp_path / "src", tmp_path / "dst", device="cpu", progress=False)
    cfg = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert "quantization_config" not in cfg["text_config"]


def test_converted_directory_reads_with_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    tensors, expect, config, hq = nvfp4_modelopt()
    config.update({"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 128, "num_hidden_layers": 1,
                   "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64,
                   "moe_intermediate_size": 64, "num_experts": 2, "vocab_size": 32})
    write(tmp_path / "src", tensors, config, hq)
    convert(tmp_path / "src", tmp_path / "dst", device="cpu", progress=False)
    cfg = transformers.AutoConfig.from_pretrained(str(tmp_path / "dst"))
    assert cfg.model_type == "qwen3_moe" and getattr(cfg, "quantization_config", None) is None


# ---------------------------------------------------------------- the gate against shipped failures

def _one_fp8(tmp_path, scale, block=(1, 32), config=None):
    q, _ = quantize_fp8(rand(64, 96, seed=1), block=(1, 32), scale_dtype=torch.uint8, e8m0=True)
    write(tmp_path / "src", {"m.w.weight": q, "m.w.weight_scale": scale},
          config or {"quantization_config": {"quant_method": "fp8", "weight_block_size": list(block)}})
    return tmp_path / "src"


def test_gate_stops_u8_e8m0_read_as_linear(tmp_path, capsys):
    """MiniMax-M3's U8 exponents taken for linear values (a converter that cast them to float):
    x 2^127-e too large; the gate names the tensor, exit 2, no file left looking complete."""
    _, s = quantize_fp8(rand(64, 96, seed=1), block=(1, 32), scale_dtype=torch.uint8, e8m0=True)
    src = _one_fp8(tmp_path, s.to(torch.float32))
    assert main(["convert", str(src), str(tmp_path / "dst"), "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "m.w.weight: max |x|" in err and "misread scale" in err and "Traceback" not in err
    assert not list((tmp_path / "dst").glob("*.safetensors"))


def test_gate_stops_e8m0_handed_over_as_float(tmp_path):
    """DeepSeek-V4's E8M0 exponent bytes reinterpreted as float32 scales (four exponents a float):
    ~1e38 after dequantization."""
    q, s = quantize_fp4_e8m0(rand(64, 128, seed=2))
    as_float = s.contiguous().view(torch.float32)  # [64, 1]: one 'float' of four exponent bytes
    write(tmp_path / "src", {"x.weight": q.view(torch.float8_e4m3fn), "x.weight_scale": as_float},
          {"quantization_config": {"quant_method": "fp8"}})
    with pytest.raises(PyloaderInputError, match=r"x.weight: (max \|x\||NaN values)"):
        convert(tmp_path / "src", tmp_path / "dst", device="cpu", progress=False)


def test_gate_stops_fp4_bytes_given_as_fp8(tmp_path):
    """FP4 experts taken for FP8 (expert_dtype dropped from a converted config): the packed bytes
    decode to values no weight has."""
    q, _ = quantize_fp4_e8m0(rand(128, 256, seed=3))
    s = torch.full((1, 1), 0.01)  # the 128x128 grid of the [128, 128] bytes
    write(tmp_path / "src", {"x.weight": q.view(torch.float8_e4m3fn), "x.weight_scale_inv": s},
          {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}})
    with pytest.raises(PyloaderInputError, match="x.weight: NaN values"):
        convert(tmp_path / "src", tmp_path / "dst", device="cpu", progress=False)
    report = convert(tmp_path / "src", tmp_path / "dst2", device="cpu", progress=False, gate="warn")
    assert len(report.gate_warnings) == 1


def test_gate_stops_all_zero_from_nonzero_codes(tmp_path):
    """Scales of zero (a scale tensor written before it was filled) make every value zero."""
    q, s = quantize_fp8(rand(200, 300, seed=4))
    write(tmp_path / "src", {"x.weight": q, "x.weight_scale_inv": torch.zeros_like(s)}, {})
    with pytest.raises(PyloaderInputError, match="all zero after dequantization"):
        convert(tmp_path / "src", tmp_path / "dst", device="cpu", progress=False)
    convert(tmp_path / "src", tmp_path / "dst2", device="cpu", progress=False, gate="off")


def test_convert_gpt_oss_mxfp4_into_transformers_layout(tmp_path, monkeypatch):
    """gpt-oss *_blocks [E, N, G, 16] / *_scales [E, N, G] → the BF16 expert tensors transformers'
    GptOss holds ([E, in, out]: each expert's dequantized [N, K] transposed), biases and
    attention copied; chunks hold whole experts (a chunk here is smaller than one)."""
    from pyloader.convert import pipeline

    monkeypatch.setattr(pipeline, "CHUNK_BYTES", 1000)
    E, N, K = 3, 40, 64
    gen = torch.Generator().manual_seed(7)
    blocks = torch.randint(0, 256, (E, N, K // 32, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(118, 130, (E, N, K // 32), dtype=torch.uint8, generator=gen)
    t = {"model.layers.0.mlp.experts.gate_up_proj_blocks": blocks,
         "model.layers.0.mlp.experts.gate_up_proj_scales": scales,
         "model.layers.0.mlp.experts.gate_up_proj_bias": rand(E, N, seed=1).to(torch.bfloat16),
         "model.layers.0.self_attn.q_proj.weight": rand(64, 64, seed=2).to(torch.bfloat16)}
    config = {"model_type": "gpt_oss", "quantization_config": {
        "quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                            "model.embed_tokens", "lm_head"]}}
    write(tmp_path / "src", t, config)
    convert(tmp_path / "src", tmp_path / "dst", device="cpu", progress=False)
    out = read_all(tmp_path / "dst")
    assert set(out) == {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.gate_up_proj_bias",
                        "model.layers.0.self_attn.q_proj.weight"}
    want = formula(blocks.reshape(E, N, K // 2), K, "e2m1", scales, (1, 32)).transpose(1, 2).contiguous()
    assert_bitwise_equal(out["model.layers.0.mlp.experts.gate_up_proj"], want)
    assert_bitwise_equal(out["model.layers.0.mlp.experts.gate_up_proj_bias"],
                         t["model.layers.0.mlp.experts.gate_up_proj_bias"])


# ---------------------------------------------------------------- --to fp8-block

def test_to_fp8_block_from_bf16_and_back(tmp_path):
    """BF16 linear weights become 128x128 block FP8 by the DeepSeek recipe (F32 weight_scale_inv);
    embeddings, norms, routers and the head stay BF16; the result loads and converts back."""
    from pyloader.ops import reference

    t = {"model.embed_tokens.weight": rand(64, 256, seed=1).to(torch.bfloat16),
         "model.layers.0.self_attn.q_proj.weight": rand(300, 256, seed=2).to(torch.bfloat16),
         "model.layers.0.mlp.gate.weight": rand(4, 256, seed=3).to(torch.bfloat16),
         "model.layers.0.input_layernorm.weight": rand(256, seed=4).to(torch.bfloat16),
         "lm_head.weight": rand(64, 256, seed=5).to(torch.bfloat16)}
    write(tmp_path / "src", t, {"model_type": "llama"})
    report = convert(tmp_path / "src", tmp_path / "fp8", device="cpu", progress=False, to="fp8-block")
    out = read_all(tmp_path / "fp8")
    name = "model.layers.0.self_attn.q_proj.weight"
    q, s = reference.quantize_blockwise_torch(t[name].float(), (128, 128))
    assert out[name].dtype == torch.float8_e4m3fn and out[name + "_scale_inv"].shape == (3, 2)
    assert torch.equal(out[name].view(torch.uint8), q.view(torch.uint8))
    assert_bitwise_equal(out[name + "_scale_inv"], s)
    for keep in ("model.embed_tokens.weight", "model.layers.0.mlp.gate.weight", "model.layers.0.input_layernorm.weight",
                 "lm_head.weight"):
        assert_bitwise_equal(out[keep], t[keep], keep)
    cfg = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                          "weight_block_size": [128, 128]}
    assert report.dequantized == 1
    convert(tmp_path / "fp8", tmp_path / "back", device="cpu", progress=False)
    back = read_all(tmp_path / "back")
    assert_bitwise_equal(back[name], formula(q, 256, None, s, (128, 128)))


def test_to_fp8_block_ue8m0_scales_are_powers_of_two(tmp_path):
    w = rand(256, 384, seed=6).to(torch.bfloat16)
    write(tmp_path / "src", {"a.proj.weight": w}, {})
    convert(tmp_path / "src", tmp_path / "fp8", device="cpu", progress=False, to="fp8-block", scale_fmt="ue8m0")
    out = read_all(tmp_path / "fp8")
    s = out["a.proj.weight_scale_inv"]
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)  # powers of two
    blocks = w.float().view(2, 128, 3, 128).abs().amax(dim=(1, 3))
    assert bool((blocks / s <= 448).all()) and bool((blocks / s > 224).all())  # the smallest power that fits
    assert json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"]["scale_fmt"] == "ue8m0"


def test_to_fp8_block_transcodes_fp4_experts_without_rounding(tmp_path, capsys):
    """DeepSeek-V4 FP4 experts (E8M0 per-32) → block FP8: every value exact where a block's
    sub-scale exponents span at most 14; a block spanning more is counted (and printed)."""
    q, s = quantize_fp4_e8m0(rand(256, 256, seed=7))
    s[:128, 0] = 100  # block (0, 0): exponents 100 .. ~125: beyond 14 apart
    s[:128, 1:4] = 127
    name = "layers.0.ffn.experts.0.w1.weight"
    write(tmp_path / "src", {name: q, name[:-len("weight")] + "scale": s.view(torch.float8_e8m0fnu)},
          {"expert_dtype": "fp4"})
    report = convert(tmp_path / "src", tmp_path / "fp8", device="cpu", progress=False, to="fp8-block")
    assert report.nonexact_blocks == 1
    out = read_all(tmp_path / "fp8")
    w8, sc = out[name], out[name + "_scale_inv"]
    assert w8.dtype == torch.float8_e4m3fn and sc.shape == (2, 2)
    back = formula(w8, 256, None, sc, (128, 128), out_dtype=torch.float32)
    exact = formula(q, 256, "e2m1", s, (1, 32), out_dtype=torch.float32)
    assert torch.equal(back[128:], exact[128:]) and torch.equal(back[:128, 128:], exact[:128, 128:])
    assert not torch.equal(back[:128, :128], exact[:128, :128])  # the one block with too wide a span
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "fp8b"), "--device", "cpu", "--no-progress",
                 "--to", "fp8-block"]) == 0
    assert "1 128x128 blocks rounded" in capsys.readouterr().out


def test_to_fp8_block_from_nvfp4_requantizes_the_dequantized_values(tmp_path):
    from pyloader.ops import reference

    tensors, expect, config, hq = nvfp4_modelopt()
    write(tmp_path / "src", tensors, config, hq)
    convert(tmp_path / "src", tmp_path / "fp8", device="cpu", progress=False, to="fp8-block")
    out = read_all(tmp_path / "fp8")
    for name in expect:
        x = formula(tensors[name], expect[name].shape[1], "e2m1", tensors[name[:-len("weight")] + "weight_scale"],
                    (1, 16), g=tensors[name[:-len("weight")] + "weight_scale_2"], out_dtype=torch.float32)
        q, s = reference.quantize_blockwise_torch(x, (128, 128))
        assert torch.equal(out[name].view(torch.uint8), q.view(torch.uint8)), name
        assert_bitwise_equal(out[name + "_scale_inv"], s)
    assert not any(n.endswith(("weight_scale_2", "input_scale")) for n in out)


def test_convert_deepseek_v4_as_released_equals_the_independent_bf16(tmp_path):
    """DeepSeek-V4 in its own names (FP8 attention, compressors, indexer and shared experts with E8M0
    block ``.scale``; FP4 routed experts with E8M0 per-32 ``.scale``; float32 hyper-connections,
    sinks and ``ape``; I32 ``tid2eid``) → BF16: every tensor bitwise the checkpoint the engine tests
    build independently (the float formula), the quantization config and ``expert_dtype`` gone."""
    from tiny_models import write_deepseek_v4

    dirs = write_deepseek_v4(tmp_path)
    report = convert(dirs["fp8"], tmp_path / "bf16", device="cpu", progress=False)
    from safetensors.torch import load_file

    got, want = read_all(tmp_path / "bf16"), load_file(str(dirs["ref"] / "model.safetensors"))
    assert set(got) == set(want) and report.dequantized > 0
    for name in want:
        assert_bitwise_equal(got[name], want[name], name)
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert "quantization_config" not in cfg and "expert_dtype" not in cfg
    transformers = pytest.importorskip("transformers")
    assert type(transformers.AutoConfig.from_pretrained(tmp_path / "bf16")).__name__ == "DeepseekV4Config"
