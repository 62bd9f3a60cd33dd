"""The vLLM loader's name matching, without an engine: a preset's targets against the parameter
names vLLM 0.32 gives (experts one module down, other stages' embedding / norm / head kept)."""

import pytest
import torch

pytest.importorskip("vllm")

from pyloader.integrations.vllm import engine_targets, expert_sharding_problem  # noqa: E402
from pyloader.parallel import Parallel  # noqa: E402
from pyloader.routing.presets import build_preset  # noqa: E402
from tiny_configs import QWEN3_MOE  # noqa: E402


def test_experts_one_module_down_and_other_stages_parameters():
    stage = build_preset(QWEN3_MOE, parallel=Parallel(pp_rank=0, pp_size=2)).targets
    whole = build_preset(QWEN3_MOE).targets
    params = {}
    for name, spec in stage.items():
        vllm_name = name.replace(".mlp.experts.", ".mlp.experts.routed_experts.")
        params[vllm_name] = torch.empty(spec.shape)
    params["lm_head.weight"] = torch.empty(whole["lm_head.weight"].shape)  # stage 0 keeps the head
    params["model.norm.weight"] = torch.empty(whole["model.norm.weight"].shape)
    params["model.layers.0.mlp.extra.weight"] = torch.empty(3)  # nothing routes it: left for the load's error
    targets, aliases, foreign = engine_targets(params, stage, whole)
    assert set(stage) <= set(targets) and "model.layers.0.mlp.extra.weight" in targets
    assert aliases["model.layers.0.mlp.experts.w13_weight"] == "model.layers.0.mlp.experts.routed_experts.w13_weight"
    assert targets["model.layers.0.mlp.experts.w13_weight"] is params[aliases["model.layers.0.mlp.experts.w13_weight"]]
    assert foreign == ["lm_head.weight", "model.norm.weight"]


def test_a_same_named_parameter_of_another_shape_is_not_taken():
    stage = build_preset(QWEN3_MOE).targets
    params = {n.replace(".mlp.experts.", ".mlp.experts.routed_experts."): torch.empty(s.shape) for n, s in stage.items()}
    bad = "model.layers.1.mlp.experts.routed_experts.w2_weight"
    params[bad] = torch.empty(1, 2, 3)
    targets, aliases, _ = engine_targets(params, stage)
    assert "model.layers.1.mlp.experts.w2_weight" not in targets and bad in targets


def test_padded_packed_experts_one_module_down_are_taken():
    """gpt-oss's MXFP4 experts as vLLM pads them for its kernels, one module down: matched by name
    though larger than the preset's shape (the load writes their leading block)."""
    import json
    from pathlib import Path

    config = json.loads((Path(__file__).parents[1] / "data/checkpoints/gpt-oss-20b/config.json").read_text())
    stage = build_preset(config, parallel=Parallel(tp_rank=1, tp_size=8)).targets
    params = {}
    for name, spec in stage.items():
        shape = spec.shape
        if spec.padded:  # Marlin: hidden to 256 (2880 -> 3072), this rank's intermediate (384) to 384
            shape = tuple(3072 * d // 2880 if d in (2880, 1440, 90) else d for d in shape)
            name = name.replace(".mlp.experts.", ".mlp.experts.routed_experts.")
        params[name] = torch.empty(shape, dtype=torch.uint8 if spec.dtype == torch.uint8 else torch.bfloat16)
    targets, aliases, _ = engine_targets(params, stage)
    w13 = "model.layers.0.mlp.experts.w13_weight"
    assert aliases[w13] == "model.layers.0.mlp.experts.routed_experts.w13_weight"
    assert targets[w13].shape[-1] == 1536 > stage[w13].shape[-1] == 1440
    assert set(stage) <= set(targets)


def test_experts_split_over_data_parallel_ranks_are_refused_by_name():
    """vLLM folds data parallelism into the experts' tensor-parallel split when expert parallelism is
    off; the presets do not, so that deployment is refused up front with the way out, not left to a
    shape mismatch. A dense model, expert parallelism, or no data parallelism is fine."""
    moe = build_preset(QWEN3_MOE, parallel=Parallel(tp_rank=0, tp_size=2)).targets
    problem = expert_sharding_problem(moe, dp_fold=2, ep_size=1)
    assert problem and "model.layers.0.mlp.experts" in problem and "--enable-expert-parallel" in problem
    assert expert_sharding_problem(moe, dp_fold=1, ep_size=1) is None
    assert expert_sharding_problem(moe, dp_fold=2, ep_size=4) is None
    dense = dict(QWEN3_MOE, model_type="qwen3", architectures=["Qwen3ForCausalLM"])
    assert expert_sharding_problem(build_preset(dense).targets, dp_fold=2, ep_size=1) is None
