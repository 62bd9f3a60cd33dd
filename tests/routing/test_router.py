"""The name router: templates, O(1) routing at full scale, and unexpected names listed with hints."""


import pytest

from pyloader.errors import PyloaderInputError
from pyloader.routing.plan import build_plan
from pyloader.routing.presets import build_preset
from pyloader.routing.router import Router, templatize

from checkpoint_lists import cached_checkpoint, config_of, config_of_folder, dense_entries, synthetic


def test_routing_deepseek_is_fast_and_o1():
    ck = cached_checkpoint("deepseek-r1")
    preset = build_preset(config_of("deepseek-r1"))
    router = Router(preset.rules, preset.targets)
    routes = router.route_all(ck.tensors)
    # 768 expert mapping tuples per layer reduce to templates; the cache holds one entry per template
    assert len(router._cache) < 100 and len(routes) == 91991
    r = router.route("model.layers.7.mlp.experts.201.up_proj.weight_scale_inv")
    assert (r.kind, r.target, r.shard_id, r.expert_id, r.layer) == ("scale", "model.layers.7.mlp.experts.w13_weight", "w3", 201, 7)


def test_templatize():
    assert templatize("model.layers.3.mlp.experts.17.w1.weight") == ("model.layers.{}.mlp.experts.{}.w1.weight", (3, 17))
    assert templatize("h.0.attn.c_attn.weight") == ("h.{}.attn.c_attn.weight", (0,))
    assert templatize("a{b}.1") == ("a{{b}}.{}", (1,))


def test_unexpected_names_policy_lists_all_with_hints():
    config = config_of_folder("qwen3-0.6b")
    preset = build_preset(config)
    entries = dense_entries(config) + [("model.layers.0.mlp.gate_prj.weight", (3, 3), "BF16"),
                                        ("model.layers.1.self_attn.o_prj.weight", (3, 3), "BF16")]
    ck = synthetic(entries)
    with pytest.raises(PyloaderInputError) as e:
        build_plan(ck, preset.targets, preset.rules)
    msg = str(e.value)
    assert "2 checkpoint tensor(s) have no target" in msg and "gate_prj" in msg and "o_prj" in msg
    assert "did you mean model.layers.1.self_attn.o_proj.weight" in msg
    plan = build_plan(ck, preset.targets, preset.rules, unexpected="ignore")
    assert len(plan.summary.unexpected) == 2
    assert plan.summary.skipped["rotary inv_freq is recomputed, never loaded"] == config["num_hidden_layers"]




def test_a_name_whose_template_exists_but_not_on_this_layer_is_unexpected():
    """DeepSeek: layer 0 is dense, layer 2 MoE. A dense ``mlp.gate_proj`` in layer 2 matches the
    dense layers' template but no target: listed as unexpected with the others, never a KeyError."""
    from pyloader.synthetic import checkpoint_tensors

    config = dict(model_type="deepseek_v3", hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                  n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, num_attention_heads=2,
                  num_key_value_heads=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
                  v_head_dim=16, first_k_dense_replace=1, num_hidden_layers=3, vocab_size=128)
    preset = build_preset(config)
    entries = [(n, s, "BF16") for n, s, _ in checkpoint_tensors(config)]
    assert build_plan(synthetic(entries), preset.targets, preset.rules).missing == []
    stray = "model.layers.2.mlp.gate_proj.weight"
    assert Router(preset.rules, preset.targets).route(stray).kind == "unexpected"
    with pytest.raises(PyloaderInputError) as e:
        build_plan(synthetic(entries + [(stray, (96, 64), "BF16")]), preset.targets, preset.rules)
    assert "1 checkpoint tensor(s) have no target" in str(e.value) and stray in str(e.value)
