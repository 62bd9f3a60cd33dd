"""Family presets over real checkpoint tensor lists: every PP and TP layout routes, TP ranks tile each source, vLLM's PP partition."""

import json
import re

import pytest
import torch

from pyloader.errors import PyloaderInputError
from pyloader.routing.plan import build_plan, targets_of_module
from pyloader.parallel import Parallel, pp_layer_range
from pyloader.routing.presets import build_preset
from pyloader.routing.layout import ZEROS
from pyloader.routing.router import Router, Rules

from checkpoint_lists import (DUMPS, SHARED, cached_checkpoint, config_of, config_of_folder, dense_entries, dump_rows,
                              synthetic)


@pytest.mark.parametrize("tp", [1, 2, 8])
@pytest.mark.parametrize("folder", sorted(DUMPS))
def test_real_checkpoints_route_for_every_pp_and_tp(folder, tp):
    ck = cached_checkpoint(folder)
    config = config_of(folder)
    n = config["num_hidden_layers"]
    origin = _origins(ck.tensors)
    for pp in (1, 2, 3, 4, 8):
        owned, routed, zeroed = [], [], set()  # zeroed: biases that only TP rank 0 reads
        for rank in range(pp):
            preset = build_preset(config, parallel=Parallel(tp_rank=tp - 1, tp_size=tp, pp_rank=rank, pp_size=pp))
            plan = build_plan(ck, preset.targets, preset.rules, block_size=preset.block_size)
            assert plan.summary.unexpected == [] and plan.missing == [], (folder, tp, pp, rank, plan.missing[:3])
            layers = set(range(*preset.owned_layers))
            assert {p.layer for p in plan.pieces if p.layer is not None} <= layers
            owned.append(layers)
            routed += [p.source for p in plan.pieces] + [p.scale for p in plan.pieces if p.scale]
            zero = {name for name, spec in preset.targets.items() if spec.fill_from == ZEROS}
            if zero:
                router = Router(preset.rules, preset.targets)
                zeroed |= {name for name in ck.tensors if router.route(name).target in zero}
        assert set().union(*owned) == set(range(n)) and sum(map(len, owned)) == n, "layers disjoint and complete"
        # every tensor that is not an MTP/next-n draft tensor is read by exactly one stage (stacked
        # experts read expert by expert: each slice once, the slices within the tensor)
        mtp = [name for name in ck.tensors if re.search(rf"\.layers\.{n}\.", name)]
        spans = [(str(t.file), t.start, t.end) for t in routed]
        assert len(spans) == len(set(spans)), (folder, pp)
        assert sorted({origin[(str(t.file), t.start, t.end)] for t in routed}) == \
            sorted(set(ck.tensors) - set(mtp) - zeroed), (folder, pp)


class _origins(dict):
    """(file, start, end) of a read → the checkpoint tensor holding those bytes."""

    def __init__(self, tensors):
        super().__init__(((str(t.file), t.start, t.end), name) for name, t in tensors.items())
        self.by_file = {}
        for name, t in tensors.items():
            self.by_file.setdefault(str(t.file), []).append((t.start, t.end, name))

    def __missing__(self, key):
        file, start, end = key
        inside = [name for a, z, name in self.by_file.get(file, ()) if a <= start and end <= z and a < z]
        assert len(inside) == 1, key
        return inside[0]


def test_tensor_parallel_ranks_tile_each_source():
    ck = cached_checkpoint("qwen3-30b-a3b-thinking-2507-fp8")  # 4 KV heads: at TP 8 each is held by 2 ranks
    config = config_of("qwen3-30b-a3b-thinking-2507-fp8")
    rows = {}
    for rank in range(8):
        preset = build_preset(config, parallel=Parallel(tp_rank=rank, tp_size=8))
        plan = build_plan(ck, preset.targets, preset.rules, block_size=preset.block_size)
        for p in plan.pieces:
            if p.layer == 5:
                rng = p.placement.src_rows or p.placement.src_cols or (0, p.source.shape[0])
                rows.setdefault(p.source.name, []).append(rng)
    q = sorted(rows["model.layers.5.self_attn.q_proj.weight"])
    assert q[0][0] == 0 and q[-1][1] == 4096 and all(a[1] == b[0] for a, b in zip(q, q[1:]))
    k = rows["model.layers.5.self_attn.k_proj.weight"]
    assert sorted(set(k)) == [(0, 128), (128, 256), (256, 384), (384, 512)] and len(k) == 8  # replicated twice
    down = sorted(rows["model.layers.5.mlp.experts.3.down_proj.weight"])
    assert down == [(i * 96, (i + 1) * 96) for i in range(8)]


def test_pp_partition_is_vllms():
    sizes = [b - a for a, b in (pp_layer_range(61, r, 8) for r in range(8))]
    assert sizes == [7, 7, 8, 8, 8, 8, 8, 7]
    assert [pp_layer_range(10, r, 3) for r in range(3)] == [(0, 3), (3, 7), (7, 10)]
    with pytest.raises(PyloaderInputError):
        pp_layer_range(2, 0, 4)


def test_tied_embeddings_fill_the_head_from_the_embedding():
    config = config_of_folder("qwen3-0.6b")
    assert config["tie_word_embeddings"]
    preset = build_preset(config)
    entries = dense_entries(config)
    # a checkpoint without lm_head (the usual tied case): naive coverage finds lm_head missing
    ck = synthetic(entries)
    assert "lm_head.weight" not in ck.tensors
    plan = build_plan(ck, preset.targets, preset.rules)
    assert plan.missing == [] and preset.targets["lm_head.weight"].fill_from == "model.embed_tokens.weight"
    # a checkpoint that stores lm_head anyway: skipped with the reason, never loaded twice
    ck2 = synthetic(entries + [("lm_head.weight", (config["vocab_size"], config["hidden_size"]), "BF16")])
    plan2 = build_plan(ck2, preset.targets, preset.rules)
    assert any("tie_word_embeddings" in k for k in plan2.summary.skipped)
    # pipeline parallel: the last stage reads the embedding into its head
    last = build_preset(config, parallel=Parallel(pp_rank=1, pp_size=2))
    plan3 = build_plan(ck, last.targets, last.rules)
    assert plan3.sources_of("lm_head.weight") == ["model.embed_tokens.weight"] and plan3.missing == []


def _glm_fp8_entries():
    """GLM-5.1-FP8 as published: linear weights FP8 with 128x128 weight_scale_inv, except the
    modules its quantization_config leaves in BF16 (embeddings, head, router, indexer weights_proj, eh_proj)."""
    keep_bf16 = re.compile(r"(embed_tokens|lm_head|mlp\.gate\.weight|indexer\.weights_proj|eh_proj|shared_head\.head)")
    out = []
    for name, shape, dtype in dump_rows("glm-5.1"):
        if len(shape) == 2 and name.endswith(".weight") and not keep_bf16.search(name):
            out.append((name, shape, "F8_E4M3"))
            out.append((name + "_scale_inv", (-(-shape[0] // 128), -(-shape[1] // 128)), "F32"))
        else:
            out.append((name, shape, dtype))
    return out


def test_glm51_fp8_indexer_routes_under_pp8():
    ck = synthetic(_glm_fp8_entries(), "glm-5.1-fp8")
    config = config_of_folder("glm-5.1-fp8")
    read = set()
    for rank in range(8):
        preset = build_preset(config, parallel=Parallel(pp_rank=rank, pp_size=8))
        plan = build_plan(ck, preset.targets, preset.rules, block_size=preset.block_size)
        owned = set(range(*preset.owned_layers))
        names = [p.source.name for p in plan.pieces] + [p.scale.name for p in plan.pieces if p.scale]
        for n in names:
            m = re.search(r"\.layers\.(\d+)\.", n)
            assert m is None or int(m.group(1)) in owned, (rank, n)  # never read another stage's bytes
        wk = [p for p in plan.pieces if p.source.name.endswith("indexer.wk.weight")]
        assert wk and all(p.transform == "dequant" and p.scale.name.endswith("wk.weight_scale_inv") for p in wk)
        assert all(p.target.endswith("indexer.wk_weights_proj.weight") for p in wk)
        read.update(names)
    assert len(read) == len([n for n in ck.tensors if ".layers.78." not in n])


def nemotron_h_entries(c, nvfp4_input_scales=False):
    """Checkpoint names: every Linear module of the real ModelOpt module list of
    Nemotron-3.5-Lightning (hf_quant_config.json: quantized_layers + exclude_modules) as
    ``.weight``, plus the non-Linear parameters of its Mamba2, MoE and norm modules."""
    q = json.loads((SHARED / "nvidia-nemotron-3.5-lightning-30b-a3b-nvfp4" / "hf_quant_config.json").read_text())["quantization"]
    modules = sorted(set(q["quantized_layers"]) | {m for m in q["exclude_modules"] if not m.endswith("*")})
    H, E, I, Is = c["hidden_size"], c["n_routed_experts"], c["moe_intermediate_size"], c["moe_shared_expert_intermediate_size"]
    nh, d_inner = c["mamba_num_heads"], c["mamba_num_heads"] * c["mamba_head_dim"]
    conv = d_inner + 2 * c["n_groups"] * c["ssm_state_size"]
    heads, kv, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    shapes = {"embeddings": (c["vocab_size"], H), "lm_head": (c["vocab_size"], H), "in_proj": (d_inner + conv + nh, H),
              "out_proj": (H, d_inner), "conv1d": (conv, 1, c["conv_kernel"]), "gate": (E, H), "q_proj": (heads * hd, H),
              "k_proj": (kv * hd, H), "v_proj": (kv * hd, H), "o_proj": (H, heads * hd)}
    out = [("backbone.norm_f.weight", (H,), "BF16")]
    for m in modules:
        leaf = m.rsplit(".", 1)[-1]
        if ".experts." in m:
            shape = (I, H) if leaf == "up_proj" else (H, I)
            if nvfp4_input_scales:
                out.append((m + ".input_scale", (), "F32"))
        elif ".shared_experts." in m:
            shape = (Is, H) if leaf == "up_proj" else (H, Is)
        else:
            shape = shapes[leaf]
        out.append((m + ".weight", shape, "BF16"))
        if leaf == "conv1d":
            out.append((m + ".bias", (conv,), "BF16"))
            base = m.rsplit(".", 1)[0]
            out += [(base + ".A_log", (nh,), "F32"), (base + ".D", (nh,), "BF16"), (base + ".dt_bias", (nh,), "BF16"),
                    (base + ".norm.weight", (d_inner,), "BF16")]
        if leaf == "gate":
            out.append((m + ".e_score_correction_bias", (E,), "F32"))
    layers = sorted({int(re.search(r"layers\.(\d+)\.", m).group(1)) for m in modules if ".layers." in m})
    out += [(f"backbone.layers.{i}.norm.weight", (H,), "BF16") for i in layers]
    out += [("mtp.layers.0.mixer.q_proj.weight", (heads * hd, H), "BF16")]  # the MTP module the exclude list names
    return out


def test_nemotron_h_real_module_list_routes_for_every_pp_size():
    c = config_of_folder("nvidia-nemotron-3.5-lightning-30b-a3b-nvfp4")
    ck = synthetic(nemotron_h_entries(c), "nemotron-h")
    for pp in (1, 2, 3, 4, 8):
        owned, names = [], []
        for rank in range(pp):
            preset = build_preset(c, parallel=Parallel(pp_rank=rank, pp_size=pp))
            assert preset.name == "nemotron_h"
            plan = build_plan(ck, preset.targets, preset.rules)
            assert plan.summary.unexpected == [] and plan.missing == [], (pp, rank, plan.missing[:3])
            owned.append(set(range(*preset.owned_layers)))
            names += [p.source.name for p in plan.pieces]
        assert set().union(*owned) == set(range(52)) and len(set(names)) == len(ck.tensors) - 1
    preset = build_preset(c, parallel=Parallel(ep_rank=1, ep_size=4))
    plan = build_plan(ck, preset.targets, preset.rules)
    w13 = preset.targets["model.layers.1.mixer.experts.w13_weight"]
    assert w13.shape == (32, 1856, 2688) and sorted(w13.experts)[:2] == [32, 33]  # relu2: up only
    # tensor parallel: every rank covers its targets; the Mamba in_proj rows taken over the ranks
    # are every source row exactly once (groups split, 8 groups over up to 8 ranks)
    nh, d_inner = c["mamba_num_heads"], c["mamba_num_heads"] * c["mamba_head_dim"]
    rows_in = d_inner * 2 + 2 * c["n_groups"] * c["ssm_state_size"] + nh
    for tp in (2, 4, 8):
        taken = []
        for rank in range(tp):
            preset = build_preset(c, parallel=Parallel(tp_rank=rank, tp_size=tp))
            plan = build_plan(ck, preset.targets, preset.rules)
            assert plan.summary.unexpected == [] and plan.missing == [], (tp, rank, plan.missing[:3])
            in_proj = [p for p in plan.pieces if p.source.name == "backbone.layers.0.mixer.in_proj.weight"]
            assert len(in_proj) == 5 and preset.targets["model.layers.0.mixer.in_proj.weight"].shape == (rows_in // tp, 2688)
            taken += [r for p in in_proj for r in range(*p.placement.src_rows)]
        assert sorted(taken) == list(range(rows_in)), tp
    for rank in range(4):  # TP and PP together
        preset = build_preset(c, parallel=Parallel(tp_rank=rank // 2, tp_size=2, pp_rank=rank % 2, pp_size=2))
        plan = build_plan(ck, preset.targets, preset.rules)
        assert plan.summary.unexpected == [] and plan.missing == []
    with pytest.raises(PyloaderInputError, match="Mamba heads"):
        build_preset(c, parallel=Parallel(tp_rank=0, tp_size=3))


def test_nemotron_h_nvfp4_expert_input_scales_are_skipped():
    """The SGLang Nemotron-H KeyError: expert down_proj.input_scale has no target parameter."""
    c = config_of_folder("nvidia-nemotron-3.5-lightning-30b-a3b-nvfp4")
    ck = synthetic(nemotron_h_entries(c, nvfp4_input_scales=True), "nemotron-h")
    preset = build_preset(c)
    plan = build_plan(ck, preset.targets, preset.rules)
    assert plan.summary.skipped["activation input scale; activations are not quantized here"] == 2944 * 2
    assert plan.summary.unexpected == [] and plan.missing == []


def nemotron_vl_entries(c_llm):
    """Nemotron Nano VL: the Nemotron-H language model under ``language_model.`` and the RADIO
    tower as published (names and shapes of C-RADIOv2-H: 32 blocks of width 1280, the
    input-conditioner buffers), the mlp1 projector and an audio arm."""
    out = [("language_model." + n, s, d) for n, s, d in nemotron_h_entries(c_llm) if not n.startswith("mtp.")]
    out = [(n.replace("language_model.lm_head", "language_model.lm_head"), s, d) for n, s, d in out]
    r = "vision_model.radio_model."
    out += [(r + "input_conditioner.norm_mean", (3, 1, 1), "F32"), (r + "input_conditioner.norm_std", (3, 1, 1), "F32"),
            (r + "summary_idxs", (3,), "F32"),
            (r + "model.patch_generator.cls_token.token", (10, 1280), "BF16"),
            (r + "model.patch_generator.embedder.weight", (1280, 768), "BF16"),
            (r + "model.patch_generator.pos_embed", (1, 16384, 1280), "BF16")]
    for b in range(32):
        p = f"{r}model.blocks.{b}."
        out += [(p + "attn.qkv.weight", (3840, 1280), "BF16"), (p + "attn.qkv.bias", (3840,), "BF16"),
                (p + "attn.proj.weight", (1280, 1280), "BF16"), (p + "attn.proj.bias", (1280,), "BF16"),
                (p + "norm1.weight", (1280,), "BF16"), (p + "norm1.bias", (1280,), "BF16"),
                (p + "norm2.weight", (1280,), "BF16"), (p + "norm2.bias", (1280,), "BF16"),
                (p + "mlp.fc1.weight", (5120, 1280), "BF16"), (p + "mlp.fc1.bias", (5120,), "BF16"),
                (p + "mlp.fc2.weight", (1280, 5120), "BF16"), (p + "mlp.fc2.bias", (1280,), "BF16")]
    out += [("mlp1.0.weight", (5120,), "BF16"), ("mlp1.1.weight", (20480, 5120), "BF16"), ("mlp1.3.weight", (2688, 20480), "BF16"),
            ("sound_encoder.encoder.layers.0.weight", (16, 16), "BF16"), ("sound_projection.weight", (2688, 16), "BF16")]
    return out


def test_nemotron_vl_routes_language_vision_audio_for_every_pp_size():
    llm = config_of_folder("nvidia-nemotron-3.5-lightning-30b-a3b-nvfp4")
    c = {"architectures": ["NemotronH_Nano_VL_V2"], "model_type": "NemotronH_Nano_VL_V2", "llm_config": llm,
         "torch_dtype": "bfloat16"}
    ck = synthetic(nemotron_vl_entries(llm), "nemotron-vl")
    tower = [n for n in ck.tensors if not n.startswith("language_model.")]
    for pp in (1, 2, 4):
        names = []
        for rank in range(pp):
            preset = build_preset(c, parallel=Parallel(pp_rank=rank, pp_size=pp))
            preset.add_passthrough(ck.tensors)
            assert preset.name == "nemotron_vl"
            plan = build_plan(ck, preset.targets, preset.rules)
            assert plan.summary.unexpected == [] and plan.missing == [], (pp, rank, plan.missing[:3])
            names += list(dict.fromkeys(p.source.name for p in plan.pieces))  # a segmented source once
            if rank == 0:
                assert set(tower) <= set(names)  # towers, buffers included, load on the first stage
            else:
                assert not set(tower) & {p.source.name for p in plan.pieces}
        assert len(names) == len(set(names)) == len(ck.tensors)
    preset = build_preset(c, parallel=Parallel(tp_rank=1, tp_size=2))  # tensor parallel reaches the inner model
    preset.add_passthrough(ck.tensors)
    plan = build_plan(ck, preset.targets, preset.rules)
    assert plan.missing == [] and preset.targets["language_model.model.layers.0.mixer.A_log"].shape == (32,)
    preset = build_preset(c)
    assert "language_model.model.layers.1.mixer.experts.w13_weight" in preset.targets
    assert "language_model.lm_head.weight" in preset.targets


def test_nemotron_vl_radio_buffers_are_targets():
    """vLLM's AutoWeightsLoader: 'There is no module or parameter named ...norm_mean': the RADIO
    input conditioner's registered buffers. A module whose buffers are targets loads them."""
    class Conditioner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("norm_mean", torch.zeros(3, 1, 1))
            self.register_buffer("norm_std", torch.ones(3, 1, 1))

    class Radio(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.input_conditioner = Conditioner()
            self.proj = torch.nn.Linear(2, 2)

    class VL(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vision_model = torch.nn.Module()
            self.vision_model.radio_model = Radio()

    m = VL()
    ck = synthetic([("vision_model.radio_model.input_conditioner.norm_mean", (3, 1, 1), "F32"),
                    ("vision_model.radio_model.input_conditioner.norm_std", (3, 1, 1), "F32"),
                    ("vision_model.radio_model.proj.weight", (2, 2), "F32"),
                    ("vision_model.radio_model.proj.bias", (2,), "F32")])
    plan = build_plan(ck, targets_of_module(m), Rules())
    assert plan.missing == [] and len(plan.pieces) == 4


@pytest.mark.parametrize("folder", ["nvidia-nemotron-3-super-120b-a12b-fp8", "nvidia-nemotron-3-ultra-550b-a55b-bf16",
                                    "nemotron-h-56b-base-8k"])
def test_nemotron_3_latent_moe_and_mamba_shapes_per_tp_rank(folder):
    """Nemotron 3 Super/Ultra (LatentMoE: experts in moe_latent_size, fc1/fc2 latent projections;
    Ultra's config has no num_hidden_layers, only layers_block_type) and Nemotron-H 56B."""
    c = config_of_folder(folder)
    H, latent = c["hidden_size"], c.get("moe_latent_size")
    nh, hd, gss = c["mamba_num_heads"], c["mamba_head_dim"], c["n_groups"] * c["ssm_state_size"]
    for tp in (1, 2, 8):
        preset = build_preset(c, parallel=Parallel(tp_rank=tp - 1, tp_size=tp))
        t = preset.targets
        m = next(n[: -len(".in_proj.weight")] for n in t if n.endswith(".in_proj.weight"))
        assert t[f"{m}.in_proj.weight"].shape == ((2 * nh * hd + 2 * gss + nh) // tp, H)
        assert t[f"{m}.conv1d.weight"].shape == ((nh * hd + 2 * gss) // tp, 1, c["conv_kernel"])
        assert t[f"{m}.out_proj.weight"].shape == (H, nh * hd // tp) and t[f"{m}.A_log"].shape == (nh // tp,)
        moe = [n[: -len(".experts.w13_weight")] for n in t if n.endswith(".experts.w13_weight")]
        if latent:
            assert t[f"{moe[0]}.experts.w13_weight"].shape == (c["n_routed_experts"], c["moe_intermediate_size"] // tp, latent)
            assert t[f"{moe[0]}.fc1_latent_proj.weight"].shape == (latent, H)
            assert t[f"{moe[0]}.fc2_latent_proj.weight"].shape == (H, latent)
    assert preset.num_layers == len(c.get("layers_block_type") or c.get("hybrid_override_pattern"))


def test_config_missing_a_field_names_it():
    c = {k: v for k, v in config_of_folder("qwen3-32b").items() if k != "intermediate_size"}
    with pytest.raises(PyloaderInputError, match="'intermediate_size'.*llama"):
        build_preset(c)


def test_qwen3_moe_config_as_transformers_5_writes_it():
    """transformers >= 5 saves Qwen3-MoE's expert count as ``num_local_experts``: same targets."""
    c = config_of_folder("qwen3-30b-a3b-fp8")
    c5 = {k: v for k, v in c.items() if k != "num_experts"}
    c5["num_local_experts"] = c["num_experts"]
    a, b = build_preset(c), build_preset(c5)
    assert {n: t.shape for n, t in a.targets.items()} == {n: t.shape for n, t in b.targets.items()}
    assert a.rules.expert_params_mapping == b.rules.expert_params_mapping
