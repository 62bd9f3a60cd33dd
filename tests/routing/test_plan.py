"""The load plan: pairing, shape and coverage checks, every problem listed at once, layouts inferred from a module."""


import pytest
import torch

from pyloader.routing.plan import PlanError, build_plan, targets_of_module
from pyloader.routing.presets import build_preset
from pyloader.routing.router import Rules

from checkpoint_lists import config_of, dump_rows, synthetic


def test_nvfp4_input_scale_without_target_is_skipped_with_a_reason():
    config = config_of("qwen3-30b-a3b-thinking-2507-fp8")
    names = [(n, s, d) for n, s, d in dump_rows("qwen3-30b-a3b-thinking-2507-fp8")]
    names += [(f"model.layers.{i}.mlp.experts.{e}.down_proj.input_scale", (), "F32") for i in range(2) for e in range(128)]
    ck = synthetic(names)
    preset = build_preset(config)
    plan = build_plan(ck, preset.targets, preset.rules)
    assert plan.summary.skipped == {"activation input scale; activations are not quantized here": 256}
    assert plan.summary.unexpected == [] and plan.missing == []


def test_module_buffers_are_targets():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 3, bias=False)
            self.register_buffer("norm_mean", torch.zeros(4))
            self.register_buffer("norm_std", torch.ones(4), persistent=False)

    model = Model()
    ck = synthetic([("proj.weight", (3, 4), "F32"), ("norm_mean", (4,), "F32"), ("norm_std", (4,), "F32")])
    plan = build_plan(ck, targets_of_module(model), Rules())
    assert sorted(p.target for p in plan.pieces) == ["norm_mean", "norm_std", "proj.weight"] and plan.missing == []


def test_plan_reports_every_problem_at_once():
    rules = Rules(stacked_params_mapping=[(".qkv_proj", ".q_proj", "q"), (".qkv_proj", ".k_proj", "k"),
                                          (".qkv_proj", ".v_proj", "v")])
    targets = {"a.qkv_proj.weight": torch.empty(12, 8, dtype=torch.bfloat16), "b.weight": torch.empty(4, 4),
               "c.weight": torch.empty(256, 256, dtype=torch.bfloat16), "d.weight": torch.empty(2, 2)}
    ck = synthetic([("a.q_proj.weight", (4, 8), "BF16"), ("a.k_proj.weight", (4, 8), "BF16"),  # v missing
                    ("b.weight", (4, 5), "F32"),                                                # wrong shape
                    ("c.weight", (256, 256), "F8_E4M3"),                                        # no scale
                    ("e.weight_scale_inv", (1, 1), "F32"),                                      # scale of nothing
                    ("d.weight", (2, 2), "U8")])                                                # wrong dtype
    from pyloader.routing.plan import targets_from_tensors

    with pytest.raises(PlanError) as e:
        build_plan(ck, targets_from_tensors(targets), rules, unexpected="ignore")
    msg = "\n".join(e.value.problems)
    assert "b.weight: shape [4, 5]" in msg and "c.weight (F8_E4M3) has no scale" in msg
    assert "cannot load U8 into d.weight" in msg
    assert len(e.value.problems) == 3, msg


def test_user_rules_with_module_targets_infer_the_layout():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv_proj = torch.nn.Linear(8, 4 + 2 + 2, bias=False)
            self.experts = torch.nn.Module()
            self.experts.w13_weight = torch.nn.Parameter(torch.empty(3, 10, 8))

    m = Block()
    rules = Rules(stacked_params_mapping=[("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v")],
                  expert_params_mapping=[("experts.w13_", f"experts.{e}.{n}.", e, s) for e in range(3)
                                         for n, s in (("gate_proj", "w1"), ("up_proj", "w3"))])
    entries = [("v_proj.weight", (2, 8), "F32"), ("q_proj.weight", (4, 8), "F32"), ("k_proj.weight", (2, 8), "F32")]
    entries += [(f"experts.{e}.{n}.weight", (5, 8), "F32") for e in range(3) for n in ("up_proj", "gate_proj")]
    plan = build_plan(synthetic(entries), targets_of_module(m), rules)
    place = {p.source.name: (p.placement.offset, p.slot) for p in plan.pieces}
    assert place["q_proj.weight"] == (0, None) and place["k_proj.weight"] == (4, None) and place["v_proj.weight"] == (6, None)
    assert place["experts.2.gate_proj.weight"] == (0, 2) and place["experts.2.up_proj.weight"] == (5, 2)
    assert plan.missing == []


def test_scale_without_its_weight_is_a_problem():
    targets = {"a.q_proj.weight": torch.empty(4, 8, dtype=torch.bfloat16)}
    from pyloader.routing.plan import targets_from_tensors

    ck = synthetic([("a.q_proj.weight_scale_inv", (1, 1), "F32")])  # its FP8 weight is in no file
    with pytest.raises(PlanError) as e:
        build_plan(ck, targets_from_tensors(targets), Rules())
    assert "a.q_proj.weight_scale_inv: a scale with no weight" in str(e.value)




@pytest.mark.parametrize("scale_shape", [(2, 1), (4, 4), (3,), (1, 2), (2, 3)])
def test_a_scale_grid_that_contradicts_the_declared_blocks_is_a_plan_problem(scale_shape):
    """A 256x256 FP8 weight with 128x128 blocks has a [2, 2] grid; per-tensor [1] and per-channel
    [256, 1] are read too; any other scale shape is listed, naming the scale, before any read."""
    t = torch.empty(256, 256)
    ok = [("w.weight", (256, 256), "F8_E4M3"), ("w.weight_scale_inv", (2, 2), "F32")]
    assert build_plan(synthetic(ok), {"w.weight": _spec("w.weight", t)}, Rules()).pieces[0].block_size == (128, 128)
    for good, block in (((1,), (256, 256)), ((256, 1), (1, 256))):
        ck = synthetic([ok[0], ("w.weight_scale_inv", good, "F32")])
        assert build_plan(ck, {"w.weight": _spec("w.weight", t)}, Rules()).pieces[0].block_size == block
    ck = synthetic([ok[0], ("w.weight_scale_inv", scale_shape, "F32")])
    with pytest.raises(PlanError, match=r"w\.weight_scale_inv'? \(the scale of w\.weight\): scale shape"):
        build_plan(ck, {"w.weight": _spec("w.weight", t)}, Rules())


def _spec(name, t):
    from pyloader.routing.layout import TargetSpec

    return TargetSpec(name, tuple(t.shape), torch.bfloat16)


def test_a_packed_weight_sliced_from_an_odd_column_is_refused():
    """Two FP4 codes share a byte: a column slice starting between them cannot be read as bytes."""
    from pathlib import Path

    from pyloader.format.checkpoint import Checkpoint
    from pyloader.format.quant import recognize
    from pyloader.format.safetensors import TensorInfo
    from pyloader.routing.layout import ShardPlacement, TargetSpec
    from pyloader.routing.plan import PlanError, build_plan
    from pyloader.routing.router import Rules

    f = Path("/ck/model.safetensors")
    tensors = {"a.weight": TensorInfo("a.weight", "U8", (8, 32), f, 0, 256),
               "a.weight_scale": TensorInfo("a.weight_scale", "F8_E8M0", (8, 2), f, 256, 272)}
    ck = Checkpoint(None, [f], tensors)
    for start, ok in ((16, True), (3, False)):
        spec = TargetSpec("a.weight", (8, 32), torch.bfloat16,
                          shards={None: ShardPlacement(0, 8, src_cols=(start, start + 32 - 16), src_shape=(8, 64))})
        spec.shape = (8, 16)
        plan_args = (ck, {"a.weight": spec}, Rules())
        if ok:
            build_plan(*plan_args, quant=recognize(tensors))
        else:
            with pytest.raises(PlanError, match="start on a byte"):
                build_plan(*plan_args, quant=recognize(tensors))
