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


