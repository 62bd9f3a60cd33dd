"""gpt-oss MXFP4 experts (stacked ``*_blocks`` ``[E, N, G, 16]``, ``*_scales``, ``*_bias``) loaded
dequantized into vLLM's unquantized layout, at every tensor-parallel and expert-parallel rank:
each rank's ``w13_weight`` ``[E, 2I/tp, H]`` (interleaved gate/up rows ``2a..2z``), ``w2_weight``
``[E, H, I/tp]`` (columns ``a..z``), ``w13_bias`` rows and ``w2_bias`` (zero on tensor-parallel
ranks other than 0), against the E2M1 x E8M0 formula computed independently and sliced by hand.
The same checkpoint into the packed (uint8) targets of vLLM's MXFP4 model, padded as vLLM pads them,
gets what vLLM's own loader writes at every rank."""

import json

import pytest
import torch
from safetensors.torch import save_file

import pyloader
from pyloader.routing.layout import ABSENT
from pyloader.routing.presets import build_preset

from helpers import assert_bitwise_equal, poison_
from quantizers import formula

E, H, I, LAYERS = 4, 64, 96, 2
CONFIG = dict(model_type="gpt_oss", architectures=["GptOssForCausalLM"], hidden_size=H, intermediate_size=I,
              num_local_experts=E, num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              num_hidden_layers=LAYERS, vocab_size=128, torch_dtype="bfloat16", tie_word_embeddings=False,
              quantization_config={"quant_method": "mxfp4", "modules_to_not_convert": [
                  "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]})


def _checkpoint(d):
    gen = torch.Generator().manual_seed(11)

    def bf16(*shape):
        return torch.randn(*shape, generator=gen).to(torch.bfloat16)

    t = {"model.embed_tokens.weight": bf16(128, H), "lm_head.weight": bf16(128, H), "model.norm.weight": bf16(H)}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        for n, rows in (("q_proj", 64), ("k_proj", 32), ("v_proj", 32)):
            t[f"{p}.self_attn.{n}.weight"], t[f"{p}.self_attn.{n}.bias"] = bf16(rows, H), bf16(rows)
        t[f"{p}.self_attn.o_proj.weight"], t[f"{p}.self_attn.o_proj.bias"] = bf16(H, 64), bf16(H)
        t[f"{p}.self_attn.sinks"] = bf16(4)
        t[f"{p}.input_layernorm.weight"], t[f"{p}.post_attention_layernorm.weight"] = bf16(H), bf16(H)
        t[f"{p}.mlp.router.weight"], t[f"{p}.mlp.router.bias"] = bf16(E, H), bf16(E)
        for n, rows, cols in (("gate_up_proj", 2 * I, H), ("down_proj", H, I)):
            t[f"{p}.mlp.experts.{n}_blocks"] = torch.randint(0, 256, (E, rows, cols // 32, 16), dtype=torch.uint8,
                                                              generator=gen)
            t[f"{p}.mlp.experts.{n}_scales"] = torch.randint(117, 131, (E, rows, cols // 32), dtype=torch.uint8,
                                                              generator=gen)
            t[f"{p}.mlp.experts.{n}_bias"] = bf16(E, rows)
    d.mkdir(parents=True, exist_ok=True)
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(CONFIG))
    return t


def _dequantized(t, name, rows, cols):
    blocks, scales = t[name + "_blocks"], t[name + "_scales"]
    return formula(blocks.reshape(E, rows, cols // 2), cols, "e2m1", scales, (1, 32))  # [E, rows, cols]


@pytest.mark.parametrize("tp,ep", [((0, 1), (0, 1)), ((0, 2), (0, 1)), ((1, 2), (0, 1)), ((0, 4), (0, 1)),
                                   ((3, 4), (0, 1)), ((0, 1), (1, 2))])
def test_mxfp4_experts_dequantized_into_vllm_layout_at_every_rank(tmp_path, tp, ep):
    t = _checkpoint(tmp_path / "ck")
    from pyloader.parallel import Parallel

    preset = build_preset(CONFIG, parallel=Parallel(tp[0], tp[1], 0, 1, ep[0], ep[1]))
    targets = {}
    for name, spec in preset.targets.items():
        s = spec.alternative or spec
        if s != ABSENT:  # the packed weights' scales have no place in the unquantized model
            targets[name] = poison_(torch.empty(s.shape, dtype=s.dtype))
    report = pyloader.load(targets, tmp_path / "ck", tp=tp, ep=ep, backend="torch", progress=False)
    assert report.missing == [] and report.unexpected == []
    per = -(-I // tp[1])
    a, z = (0, I) if ep[1] > 1 else (min(I, tp[0] * per), min(I, (tp[0] + 1) * per))
    first, last = ep[0] * E // ep[1], (ep[0] + 1) * E // ep[1]
    for i in range(LAYERS):
        p = f"model.layers.{i}.mlp.experts"
        w13 = _dequantized(t, f"{p}.gate_up_proj", 2 * I, H)[first:last, 2 * a:2 * z]
        w2 = _dequantized(t, f"{p}.down_proj", H, I)[first:last, :, a:z]
        assert_bitwise_equal(targets[f"{p}.w13_weight"], w13, "w13_weight")
        assert_bitwise_equal(targets[f"{p}.w2_weight"], w2, "w2_weight")
        assert_bitwise_equal(targets[f"{p}.w13_bias"], t[f"{p}.gate_up_proj_bias"][first:last, 2 * a:2 * z])
        w2_bias = t[f"{p}.down_proj_bias"][first:last]
        assert_bitwise_equal(targets[f"{p}.w2_bias"], w2_bias if tp[0] == 0 or ep[1] > 1 else torch.zeros_like(w2_bias))
    assert "zero on this tensor-parallel rank (the sum adds it once, on rank 0)" in report.skipped.values() or tp[0] == 0


def _round_up(n, k):
    return -(-n // k) * k


def _vllm_mxfp4_reference(t, tp, ep, params):
    """What vLLM's gpt-oss MXFP4 loader writes (``_load_weights_mxfp4``, vLLM 0.32), restated: each
    rank takes ``ceil(I/32 / tp)`` blocks of ``I``, narrows the stacked tensors viewed as
    ``[E, 2I, H/2]`` / ``[E, H, I/2]`` and copies them into the leading block of its padded parameters."""
    per = -(-(I // 32) // tp[1]) * 32
    a, z = (0, I) if ep[1] > 1 else (tp[0] * per, min((tp[0] + 1) * per, I))
    first, last = ep[0] * E // ep[1], (ep[0] + 1) * E // ep[1]
    out = {n: torch.zeros_like(x) for n, x in params.items()}
    for i in range(LAYERS):
        p = f"model.layers.{i}.mlp.experts"
        w2_bias = t[f"{p}.down_proj_bias"].clone()
        if ep[1] == 1 and tp[0] != 0:
            w2_bias.zero_()
        pieces = {"w13_weight": t[f"{p}.gate_up_proj_blocks"].reshape(E, 2 * I, -1)[:, 2 * a:2 * z],
                  "w13_weight_scale": t[f"{p}.gate_up_proj_scales"][:, 2 * a:2 * z],
                  "w13_bias": t[f"{p}.gate_up_proj_bias"][:, 2 * a:2 * z],
                  "w2_weight": t[f"{p}.down_proj_blocks"].reshape(E, H, I // 2)[..., a // 2:z // 2],
                  "w2_weight_scale": t[f"{p}.down_proj_scales"][..., a // 32:z // 32],
                  "w2_bias": w2_bias}
        for name, w in pieces.items():
            w = w[first:last]
            out[f"{p}.{name}"][tuple(slice(0, d) for d in w.shape)].copy_(w)
    return out


@pytest.mark.parametrize("tp,ep", [((0, 1), (0, 1)), ((0, 2), (0, 1)), ((1, 2), (0, 1)), ((2, 4), (0, 1)),
                                   ((3, 4), (0, 1)), ((0, 1), (1, 2))])
def test_mxfp4_experts_kept_packed_into_vllm_padded_parameters(tmp_path, tp, ep):
    """vLLM's MXFP4 parameters, padded as its Marlin backend pads them (hidden to 256, each rank's
    intermediate to 128) and zeroed as vLLM makes them: the leading blocks get what vLLM's own loader
    writes (the last rank of four holds no block of I=96 at all), the padding stays zero."""
    from pyloader.parallel import Parallel

    t = _checkpoint(tmp_path / "ck")
    preset = build_preset(CONFIG, parallel=Parallel(tp[0], tp[1], 0, 1, ep[0], ep[1]))
    e = E // ep[1]
    per = -(-(I // 32) // tp[1]) * 32 if ep[1] == 1 else I
    ip, hp = _round_up(per, 128), _round_up(H, 256)
    padded = {"w13_weight": (e, 2 * ip, hp // 2), "w13_weight_scale": (e, 2 * ip, hp // 32), "w13_bias": (e, 2 * ip),
              "w2_weight": (e, hp, ip // 2), "w2_weight_scale": (e, hp, ip // 32), "w2_bias": (e, hp)}
    params = {}
    for name, spec in preset.targets.items():
        kind = name.rsplit(".", 1)[-1]
        if ".mlp.experts." in name:
            params[name] = torch.zeros(padded[kind], dtype=torch.bfloat16 if "bias" in kind else torch.uint8)
        else:
            params[name] = poison_(torch.empty(spec.shape, dtype=spec.dtype))
    expected = _vllm_mxfp4_reference(t, tp, ep, {n: x for n, x in params.items() if ".mlp.experts." in n})
    report = pyloader.load(params, tmp_path / "ck", tp=tp, ep=ep, backend="torch", progress=False)
    assert report.missing == [] and report.unexpected == []
    for name, want in expected.items():
        assert_bitwise_equal(params[name], want, name)


def test_packed_experts_sliced_inside_a_stacked_tensor_are_refused(tmp_path):
    """The safeguard behind the per-expert reads: a slice of every expert at once (rows of the
    stacked tensor would be experts) is an error naming the tensor, never a read of the wrong rows."""
    import dataclasses

    from pyloader.format.checkpoint import open_checkpoint
    from pyloader.parallel import Parallel
    from pyloader.routing.plan import PlanError, build_plan

    _checkpoint(tmp_path / "ck")
    preset = build_preset(CONFIG, parallel=Parallel(0, 2, 0, 1, 0, 1))
    rules = dataclasses.replace(preset.rules, unstack=())
    with pytest.raises(PlanError, match=r"gate_up_proj_blocks: every expert in one tensor.*takes a slice of each"):
        build_plan(open_checkpoint(tmp_path / "ck"), preset.targets, rules)


def test_the_same_checkpoint_into_packed_targets_keeps_the_bytes(tmp_path):
    t = _checkpoint(tmp_path / "ck")
    preset = build_preset(CONFIG)
    targets = {n: poison_(torch.empty(s.shape, dtype=s.dtype)) for n, s in preset.targets.items()}
    report = pyloader.load(targets, tmp_path / "ck", backend="torch", progress=False)
    assert report.missing == [] and report.unexpected == []
    p = "model.layers.1.mlp.experts"
    assert torch.equal(targets[f"{p}.w13_weight"], t[f"{p}.gate_up_proj_blocks"].reshape(E, 2 * I, H // 2))
    assert torch.equal(targets[f"{p}.w2_weight_scale"], t[f"{p}.down_proj_scales"])
    assert_bitwise_equal(targets[f"{p}.w2_bias"], t[f"{p}.down_proj_bias"])
