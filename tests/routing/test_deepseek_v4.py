"""DeepSeek-V4 Flash and Pro at full width (their real configs, the first layers: a hash-routed
layer, layers of compress ratio 4 and 128): every tensor of the checkpoint in DeepSeek's own naming
routes into the deepseek_v4 preset's vLLM targets with none unexpected and every target covered,
at both pipeline stages and under expert parallelism; the FP8 dense weights (E8M0 ``.scale``) and
the FP4 (E8M0 per-32, or NVIDIA's ModelOpt NVFP4 release) experts are dequantizing reads; MTP
modules are skipped."""

import json

import pytest

from pyloader.errors import PyloaderInputError
from pyloader.format.checkpoint import Checkpoint
from pyloader.format.quant import recognize
from pyloader.parallel import Parallel
from pyloader.routing.plan import build_plan
from pyloader.routing.presets import build_preset

from checkpoint_lists import SHARED, config_of_folder, deepseek_v4_entries, synthetic


def _config(folder):
    c = config_of_folder(folder)
    if c is None:
        pytest.skip("shared checkpoints not here")
    return dict(c, num_hidden_layers=4, compress_ratios=[0, 4, 128, 4])


@pytest.mark.parametrize("folder,experts", [("deepseek-v4-flash", "fp4"), ("deepseek-v4-pro", "fp4"),
                                            ("deepseek-v4-flash-fp8", "fp8"), ("deepseek-v4-flash-nvfp4", "nvfp4")])
@pytest.mark.parametrize("par", [Parallel(pp_rank=0, pp_size=2), Parallel(pp_rank=1, pp_size=2),
                                 Parallel(ep_rank=1, ep_size=4), Parallel(tp_rank=1, tp_size=4)],
                         ids=["pp0", "pp1", "ep1", "tp1"])
def test_deepseek_v4_release_routes_into_vllm_targets(folder, experts, par):
    c = _config(folder)
    entries = deepseek_v4_entries(c, experts=experts)
    entries += [("mtp.0.attn.wq_a.weight", (c["q_lora_rank"], c["hidden_size"]), "BF16")]
    ck = synthetic(entries, folder)
    hq = SHARED / folder / "hf_quant_config.json"
    rec = recognize(ck.tensors, c, json.loads(hq.read_text()) if hq.is_file() else None)
    preset = build_preset(c, parallel=par)
    plan = build_plan(ck, preset.targets, preset.rules, quant=rec)
    assert plan.summary.unexpected == [] and plan.missing == []
    assert plan.summary.skipped.get("MTP draft module (loaded by the draft model)") == 1
    dequant = {p.source.name for p in plan.pieces if p.transform == "dequant"}
    a = f"layers.{preset.owned_layers[0]}"
    assert f"{a}.attn.wq_a.weight" in dequant and f"{a}.ffn.shared_experts.w2.weight" in dequant
    expert = f"{a}.ffn.experts.{par.ep_rank * c['n_routed_experts'] // par.ep_size}.w1.weight"
    assert expert in dequant
    kinds = {p.quant.scheme for p in plan.pieces if p.quant is not None}
    assert kinds == {"fp4": {"fp4-e8m0"}, "nvfp4": {"nvfp4"}}.get(experts, set())


def test_deepseek_v4_tensor_parallel_splits_heads_and_output_groups():
    c = _config("deepseek-v4-flash")  # 64 heads of 512, 8 output groups of rank 1024
    t = build_preset(c, parallel=Parallel(tp_rank=3, tp_size=8)).targets
    a = "model.layers.1.attn"
    assert t[f"{a}.wq_b.weight"].shape == (8 * 512, 1024) and t[f"{a}.attn_sink"].shape == (8,)
    assert t[f"{a}.wo_a.weight"].shape == (1024, 64 * 512 // 8) and t[f"{a}.wo_b.weight"].shape == (4096, 1024)
    assert t[f"{a}.wo_a.weight"].shards[None].src_rows == (3 * 1024, 4 * 1024)
    assert t[f"{a}.fused_wqa_wkv.weight"].shape == (1024 + 512, 4096)  # the latent KV: replicated
    with pytest.raises(PyloaderInputError, match="do not split over tp_size 16"):
        build_preset(c, parallel=Parallel(tp_rank=0, tp_size=16))
