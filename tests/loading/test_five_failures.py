"""The real failures pyloader was built against, byte by byte: a faithful naive loader (vLLM's
``load_weights`` loop: stacked-params mapping tuples, one ``params[name]`` lookup and copy a
tensor) fails for the original reason on the same checkpoint, and pyloader loads it bitwise right.
(Failure 1, a streaming source that reuses its buffer, is ``test_load.py``'s poisoning test.)"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import pyloader
from pyloader.parallel import Parallel
from pyloader.routing.presets import LLAMA_STACKED, build_preset
from pyloader.synthetic import allocate_targets, write_checkpoint

from helpers import assert_bitwise_equal, poison_
from tiny_models import TINY


def naive_load(params, weights, stacked=LLAMA_STACKED, pipeline_stage=False):
    """vLLM-style: a name that contains a stacked shard's name goes to its fused parameter, at the
    shard's rows (shards in mapping order, equal sizes); any other name is ``params[name]``. A
    pipeline stage skips plain parameters of layers it does not own (``is_pp_missing_parameter``),
    but the stacked branch forgot to (the GLM-5.1-FP8 PP=8 bug)."""
    order = {}
    for param, shard, sid in stacked:
        order.setdefault(param, []).append(sid)
    for name, w in weights:
        for param, shard, sid in stacked:
            if shard in name:
                fused = params[name.replace(shard, param)]  # KeyError for a layer this stage does not own
                sids = order[param]
                if param == ".qkv_proj":  # q, then k and v of equal (kv) size
                    rows = {"q": 0, "k": fused.shape[0] - 2 * w.shape[0], "v": fused.shape[0] - w.shape[0]}[sid]
                else:
                    rows = sids.index(sid) * w.shape[0]
                fused[rows:rows + w.shape[0]].copy_(w)
                break
        else:
            if pipeline_stage and name not in params:  # is_pp_missing_parameter: another stage's
                continue
            params[name].copy_(w)  # KeyError for a name with no parameter


def _checkpoint(tmp_path, **config):
    c = dict(TINY["llama"], **config)
    d = write_checkpoint(tmp_path / "m", c, fp8=False)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    raw = {}
    for f in sorted(set(index["weight_map"].values())):
        raw.update(load_file(str(d / f)))
    return c, d, raw


def _targets(c, parallel=Parallel()):
    return {n: poison_(t) for n, t in allocate_targets(build_preset(c, parallel=parallel).targets, "cpu").items()}


def test_failure_2_input_scales_with_no_parameter(tmp_path):
    """NVFP4 checkpoints carry activation input scales the BF16 model has no parameter for: the
    naive loop raises KeyError on the first; pyloader skips them with a reason and loads the rest."""
    c, d, raw = _checkpoint(tmp_path)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    f = sorted(set(index["weight_map"].values()))[0]
    extra = {f"model.layers.{i}.mlp.down_proj.input_scale": torch.tensor([0.5]) for i in range(2)}
    save_file(dict(load_file(str(d / f)), **extra), str(d / f))
    index["weight_map"].update({n: f for n in extra})
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    naive = _targets(c)
    with pytest.raises(KeyError, match="input_scale"):
        naive_load(naive, sorted({**raw, **extra}.items()))
    out = _targets(c)
    report = pyloader.load(out, d, backend="torch", progress=False)
    assert sum(1 for r in report.skipped.values() if "input scale" in r) == 2
    naive = _targets(c)
    naive_load(naive, sorted(raw.items()))  # the naive loop on the checkpoint without them: the reference
    for n in out:
        assert_bitwise_equal(out[n], naive[n], what=n)


def test_failure_3_tied_embeddings_leave_the_head_unwritten(tmp_path):
    """A tied model's checkpoint has no lm_head: the naive loop leaves it as allocated (garbage);
    pyloader fills it from the embedding."""
    c, d, raw = _checkpoint(tmp_path, tie_word_embeddings=True)
    naive = _targets(c)
    naive_load(naive, sorted(raw.items()))
    assert not torch.equal(naive["lm_head.weight"].view(torch.uint8), raw["model.embed_tokens.weight"].view(torch.uint8))
    out = _targets(c)
    pyloader.load(out, d, backend="torch", progress=False)
    assert_bitwise_equal(out["lm_head.weight"], raw["model.embed_tokens.weight"], what="lm_head")
    for n in out:
        if n != "lm_head.weight":
            assert_bitwise_equal(out[n], naive[n], what=n)


def test_failure_4_registered_buffers(tmp_path):
    """A module's registered buffers (a vision tower's norm_mean and norm_std) are not parameters:
    the naive loop over named_parameters raises KeyError; pyloader loads them bitwise."""
    class Tower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 4, bias=False)
            self.register_buffer("norm_mean", torch.zeros(8))
            self.register_buffer("norm_std", torch.ones(8), persistent=False)

    g = torch.Generator().manual_seed(4)
    raw = {"proj.weight": torch.randn(4, 8, generator=g), "norm_mean": torch.randn(8, generator=g),
           "norm_std": torch.rand(8, generator=g) + 0.5}
    save_file(raw, str(tmp_path / "model.safetensors"))
    naive = Tower()
    with pytest.raises(KeyError, match="norm_mean"):
        naive_load(dict(naive.named_parameters()), sorted(raw.items()), stacked=())
    tower = Tower()
    pyloader.load(tower, tmp_path, rules=pyloader.routing.router.Rules(), backend="torch", progress=False)
    for n, t in {**dict(tower.named_parameters()), **dict(tower.named_buffers())}.items():
        assert_bitwise_equal(t.detach(), raw[n], what=n)


def test_failure_5_a_stacked_tensor_of_another_pipeline_stage(tmp_path):
    """Pipeline stage 1 of 2 meets layer 0's q_proj: the naive stacked branch looks up a fused
    parameter this stage does not have (KeyError), where its plain branch skips what another stage
    owns; pyloader never reads another stage's layers and fills stage 1 bitwise as the whole-model
    load does."""
    c, d, raw = _checkpoint(tmp_path, num_hidden_layers=4)
    stage = Parallel(pp_rank=1, pp_size=2)
    naive = _targets(c, stage)
    with pytest.raises(KeyError, match=r"layers\.[01]\.(self_attn\.qkv_proj|mlp\.gate_up_proj)"):
        naive_load(naive, sorted(raw.items()), pipeline_stage=True)
    whole = _targets(c)
    pyloader.load(whole, d, backend="torch", progress=False)
    out = _targets(c, stage)
    report = pyloader.load(out, d, backend="torch", progress=False, pp=(1, 2))
    assert "layer owned by another pipeline stage" in set(report.skipped.values())
    for n in out:
        assert_bitwise_equal(out[n], whole[n], what=n)
