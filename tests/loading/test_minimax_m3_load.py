"""A shrunk MiniMax-M3-NVFP4 release (the VL wrapper, ModelOpt MIXED_PRECISION: MXFP8 attention with
the sparse indexer, dense and shared MLPs; NVFP4 experts; BF16 router, norms, embeddings and vision
tower) loaded into vLLM's BF16 layout at every tensor-parallel rank, against each weight's
independent float formula assembled by hand (``qkv_proj`` = q | k | v | index_q | index_k, index_k
whole on every rank; ``gate_up_proj``; experts ``w13``/``w2``)."""

import json

import pytest
import torch
from safetensors.torch import save_file

import pyloader
from pyloader.format.checkpoint import open_checkpoint
from pyloader.parallel import Parallel
from pyloader.routing.presets import build_preset

from helpers import assert_bitwise_equal, poison_
from quantizers import formula, quantize_fp8, quantize_nvfp4

H, HEADS, KV, HD, IDIM, E, I, DENSE, LAYERS = 128, 4, 2, 32, 32, 4, 64, 96, 3
TEXT = dict(model_type="minimax_m3", hidden_size=H, num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=HD,
            num_hidden_layers=LAYERS, intermediate_size=I, moe_intermediate_size=I, dense_intermediate_size=DENSE,
            num_local_experts=E, num_experts_per_tok=2, n_shared_experts=1, vocab_size=64, use_routing_bias=True,
            moe_layer_freq=[0, 1, 1], tie_word_embeddings=False, torch_dtype="bfloat16",
            sparse_attention_config={"sparse_attention_freq": [0, 1, 1], "sparse_num_index_heads": KV,
                                     "sparse_index_dim": IDIM})
CONFIG = dict(model_type="minimax_m3_vl", architectures=["MiniMaxM3SparseForConditionalGeneration"],
              text_config=TEXT, torch_dtype="bfloat16")


def _release(d):
    """Writes the checkpoint; returns (tensors, the dequantized reference of every quantized weight)."""
    gen = torch.Generator().manual_seed(5)

    def rand(*shape):
        return torch.randn(*shape, generator=gen) * 0.05

    t, ref, layers = {}, {}, {}

    def linear(module, shape, algo):
        name = module + ".weight"
        if algo == "NVFP4":
            q, s, g = quantize_nvfp4(rand(*shape))
            t[name], t[module + ".weight_scale"], t[module + ".weight_scale_2"] = q, s, g.reshape(())
            t[module + ".input_scale"] = torch.tensor(0.25)
            ref[name] = formula(q, shape[1], "e2m1", s, (1, 16), g=g, mode="mul")
        else:
            q, s = quantize_fp8(rand(*shape), block=(1, 32), scale_dtype=torch.uint8, e8m0=True)
            t[name], t[module + ".weight_scale"] = q, s
            ref[name] = formula(q, shape[1], None, s, (1, 32))
        layers[module] = {"quant_algo": algo, **({"group_size": 16} if algo == "NVFP4" else {})}

    lm = "language_model.model"
    t[f"{lm}.embed_tokens.weight"] = rand(64, H).to(torch.bfloat16)
    t[f"{lm}.norm.weight"] = rand(H).to(torch.bfloat16)
    t["language_model.lm_head.weight"] = rand(64, H).to(torch.bfloat16)
    t["vision_tower.blocks.0.attn.qkv.weight"] = rand(96, 32).to(torch.bfloat16)
    t["multi_modal_projector.linear_1.weight"] = rand(H, 32).to(torch.bfloat16)
    for i in range(LAYERS):
        p = f"{lm}.layers.{i}"
        a = f"{p}.self_attn"
        for n, rows in (("q_proj", HEADS * HD), ("k_proj", KV * HD), ("v_proj", KV * HD)):
            linear(f"{a}.{n}", (rows, H), "MXFP8")
        linear(f"{a}.o_proj", (H, HEADS * HD), "MXFP8")
        t[f"{a}.q_norm.weight"], t[f"{a}.k_norm.weight"] = rand(HD).to(torch.bfloat16), rand(HD).to(torch.bfloat16)
        t[f"{p}.input_layernorm.weight"] = rand(H).to(torch.bfloat16)
        t[f"{p}.post_attention_layernorm.weight"] = rand(H).to(torch.bfloat16)
        if i == 0:
            for n, shape in (("gate_proj", (DENSE, H)), ("up_proj", (DENSE, H)), ("down_proj", (H, DENSE))):
                linear(f"{p}.mlp.{n}", shape, "MXFP8")
            continue
        linear(f"{a}.index_q_proj", (KV * IDIM, H), "MXFP8")
        linear(f"{a}.index_k_proj", (IDIM, H), "MXFP8")
        t[f"{a}.index_q_norm.weight"] = rand(IDIM).to(torch.bfloat16)
        t[f"{a}.index_k_norm.weight"] = rand(IDIM).to(torch.bfloat16)
        m = f"{p}.block_sparse_moe"
        t[f"{m}.gate.weight"] = rand(E, H).to(torch.bfloat16)
        t[f"{m}.e_score_correction_bias"] = rand(E)
        for n, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            linear(f"{m}.shared_experts.{n}", shape, "MXFP8")
        for e in range(E):
            for n, shape in (("w1", (I, H)), ("w3", (I, H)), ("w2", (H, I))):
                linear(f"{m}.experts.{e}.{n}", shape, "NVFP4")
    d.mkdir(parents=True)
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(CONFIG))
    (d / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt"}, "quantization": {
        "quant_algo": "MIXED_PRECISION", "exclude_modules": ["lm_head", "model.embed_tokens", "vision_tower",
                                                             "multi_modal_projector", "*block_sparse_moe.gate"],
        "quantized_layers": layers}}))
    return t, ref


def _rows(n, rank, size, unit=1):
    per = n // unit // size
    return rank * per * unit, (rank + 1) * per * unit


@pytest.mark.parametrize("tp", [(0, 1), (0, 2), (1, 2), (3, 4)])
def test_mixed_release_into_vllm_bf16_layout(tmp_path, tp):
    t, ref = _release(tmp_path / "ck")
    preset = build_preset(CONFIG, parallel=Parallel(tp[0], tp[1]))
    preset.add_passthrough(open_checkpoint(tmp_path / "ck").tensors)
    targets = {n: poison_(torch.empty(s.shape, dtype=s.dtype)) for n, s in preset.targets.items()}
    report = pyloader.load(targets, tmp_path / "ck", tp=tp, backend="torch", progress=False)
    assert report.missing == [] and report.unexpected == []
    assert set(report.maxima) == set(ref)  # every MXFP8 and NVFP4 weight dequantized, through the gate
    r, n = tp
    q = _rows(HEADS * HD, r, n, HD)
    kv = _rows(KV * HD, r, n, HD) if n <= KV else ((r * KV // n) * HD, (r * KV // n + 1) * HD)
    iq = _rows(KV * IDIM, r, n, IDIM) if n <= KV else ((r * KV // n) * IDIM, (r * KV // n + 1) * IDIM)
    lm = "language_model.model"
    for i in range(LAYERS):
        a = f"{lm}.layers.{i}.self_attn"
        parts = [ref[f"{a}.q_proj.weight"][slice(*q)], ref[f"{a}.k_proj.weight"][slice(*kv)],
                 ref[f"{a}.v_proj.weight"][slice(*kv)]]
        if i:
            parts += [ref[f"{a}.index_q_proj.weight"][slice(*iq)], ref[f"{a}.index_k_proj.weight"]]
            assert_bitwise_equal(targets[f"{a}.index_k_norm.weight"], t[f"{a}.index_k_norm.weight"])
        assert_bitwise_equal(targets[f"{a}.qkv_proj.weight"], torch.cat(parts), f"layer {i} qkv_proj")
        assert_bitwise_equal(targets[f"{a}.o_proj.weight"], ref[f"{a}.o_proj.weight"][:, slice(*q)], "o_proj")
        assert_bitwise_equal(targets[f"{a}.q_norm.weight"], t[f"{a}.q_norm.weight"])
        mlp = f"{lm}.layers.{i}.mlp" if i == 0 else f"{lm}.layers.{i}.block_sparse_moe.shared_experts"
        inter = _rows(DENSE if i == 0 else I, r, n)
        assert_bitwise_equal(targets[f"{mlp}.gate_up_proj.weight"],
                             torch.cat([ref[f"{mlp}.gate_proj.weight"][slice(*inter)],
                                        ref[f"{mlp}.up_proj.weight"][slice(*inter)]]), "gate_up_proj")
        assert_bitwise_equal(targets[f"{mlp}.down_proj.weight"], ref[f"{mlp}.down_proj.weight"][:, slice(*inter)])
        if i == 0:
            continue
        m = f"{lm}.layers.{i}.block_sparse_moe"
        assert_bitwise_equal(targets[f"{m}.gate.weight"], t[f"{m}.gate.weight"].float())
        assert_bitwise_equal(targets[f"{m}.e_score_correction_bias"], t[f"{m}.e_score_correction_bias"])
        ei = _rows(I, r, n)
        for e in range(E):
            x = f"{m}.experts.{e}"
            assert_bitwise_equal(targets[f"{m}.experts.w13_weight"][e],
                                 torch.cat([ref[f"{x}.w1.weight"][slice(*ei)], ref[f"{x}.w3.weight"][slice(*ei)]]))
            assert_bitwise_equal(targets[f"{m}.experts.w2_weight"][e], ref[f"{x}.w2.weight"][:, slice(*ei)])
    assert_bitwise_equal(targets["vision_tower.blocks.0.attn.qkv.weight"], t["vision_tower.blocks.0.attn.qkv.weight"])
    assert_bitwise_equal(targets["language_model.lm_head.weight"], t["language_model.lm_head.weight"][slice(*_rows(64, r, n))])
