"""``pyloader inspect``: JSON contract, human output, exit code 2 with a clear message on bad input."""

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from pyloader.cli import main

from checkpoint_lists import SHARED, dump_rows


@pytest.fixture(scope="module")
def index_only(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen3-30b-fp8-index")
    wm = {n: f"model-{i % 4 + 1:05d}-of-00004.safetensors" for i, (n, _, _) in
          enumerate(dump_rows("qwen3-30b-a3b-thinking-2507-fp8"))}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    shutil.copy(SHARED / "qwen3-30b-a3b-fp8" / "config.json", d / "config.json")
    return d


def run_json(capsys, *argv):
    assert main(["inspect", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_json_contract_from_an_index_alone(index_only, capsys):
    out = run_json(capsys, index_only / "model.safetensors.index.json", "--pp-rank", 1, "--pp-size", 4,
                   "--ep-rank", 1, "--ep-size", 2)
    assert out["preset"] == "qwen_moe" and out["unexpected"] == [] and out["missing"] == []
    assert out["layers"] == list(range(12, 24))
    assert out["skipped"]["layer owned by another pipeline stage"] > 0
    assert out["skipped"]["expert owned by another expert-parallel rank"] == 12 * 64 * 3 * 2  # weights + scales
    t = out["targets"]["model.layers.12.mlp.experts.w13_weight"]
    assert t["shape"] == [64, 1536, 2048] and t["dtype"] == "bfloat16" and len(t["sources"]) == 64 * 2
    assert out["read_bytes"] is None  # index only: no shard headers
    assert out["formats"] is None  # and no dtypes to recognize formats by


def test_inspect_real_files_and_human_output(tmp_path, capsys):
    config = json.loads((SHARED / "qwen3-0.6b" / "config.json").read_text())
    config.update(num_hidden_layers=2, vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8)
    (tmp_path / "config.json").write_text(json.dumps(config))
    t = {"model.embed_tokens.weight": torch.zeros(64, 32), "model.norm.weight": torch.zeros(32)}
    for i in range(2):
        p = f"model.layers.{i}"
        t.update({f"{p}.self_attn.q_proj.weight": torch.zeros(32, 32), f"{p}.self_attn.k_proj.weight": torch.zeros(16, 32),
                  f"{p}.self_attn.v_proj.weight": torch.zeros(16, 32), f"{p}.self_attn.o_proj.weight": torch.zeros(32, 32),
                  f"{p}.self_attn.q_norm.weight": torch.zeros(8), f"{p}.self_attn.k_norm.weight": torch.zeros(8),
                  f"{p}.mlp.gate_proj.weight": torch.zeros(48, 32), f"{p}.mlp.up_proj.weight": torch.zeros(48, 32),
                  f"{p}.mlp.down_proj.weight": torch.zeros(32, 48), f"{p}.input_layernorm.weight": torch.zeros(32),
                  f"{p}.post_attention_layernorm.weight": torch.zeros(32)})
    t = {k: v.bfloat16() for k, v in t.items()}
    save_file(t, str(tmp_path / "model.safetensors"))
    out = run_json(capsys, tmp_path)
    assert out["missing"] == [] and out["read_bytes"] == sum(v.numel() * 2 for v in t.values())
    assert out["formats"] == {}
    assert out["targets"]["lm_head.weight"]["sources"] == ["tied: model.embed_tokens.weight"]
    assert main(["inspect", str(tmp_path)]) == 0
    human = capsys.readouterr().out
    assert "every target is covered" in human and "formats      no quantized weights" in human
    # a wrong shape is a clear error with exit code 2
    t["model.layers.1.mlp.up_proj.weight"] = torch.zeros(47, 32, dtype=torch.bfloat16)
    save_file(t, str(tmp_path / "model.safetensors"))
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "model.layers.1.mlp.up_proj.weight: shape [47, 32]" in err and "Traceback" not in err


@pytest.mark.parametrize("setup,needle", [
    (lambda d: None, "no such checkpoint"),
    (lambda d: d.mkdir() or (d / "config.json").write_text("{}"), "no *.safetensors"),
    (lambda d: d.mkdir() or (d / "model.safetensors").write_bytes(b"\x01\x00\x00\x00\x00\x00\x00\x00{"), "model.safetensors"),
    (lambda d: d.mkdir() or (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "../../etc/passwd"}})), "leaves the checkpoint directory"),
])
def test_inspect_bad_input_exits_2(tmp_path, capsys, setup, needle):
    d = tmp_path / "ck"
    setup(d)
    assert main(["inspect", str(d)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_module_entry_point(index_only):
    r = subprocess.run([sys.executable, "-m", "pyloader", "inspect", str(index_only), "--tp-size", "3"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "do not split over tp_size 3" in r.stderr and "Traceback" not in r.stderr


def test_bench_on_cpu_reports_the_median_load_its_spread_and_its_phases(tmp_path, capsys):
    """``pyloader bench`` on a CPU: a row verified after every load, at the median load with the
    spread of all of them, whose phase times belong to the median load (the executor's wall time
    fits inside that load's seconds); the output says what was not measured."""
    out = tmp_path / "results.jsonl"
    assert main(["bench", "--device", "cpu", "--no-peers", "--size-gb", "0.02", "--repeats", "3",
                 "--results", str(out), "--tmpdir", str(tmp_path)]) == 0
    (logged,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert set(logged) == {"bench", "case", "provider", "gbps", "ceiling_gbps", "gpu", "commit", "date", "config"}
    row = dict(logged, **logged["config"])
    assert row["provider"] == "pyloader" and row["note"] == "every byte verified after each load"
    assert row["seconds"] == sorted(row["repeats"])[1] and len(row["repeats"]) == 3
    assert row["seconds_min"] == min(row["repeats"]) and row["seconds_max"] == max(row["repeats"])
    assert row["ceiling_gbps"] is None and row["peak_rss"] > 0
    out_text = capsys.readouterr().out
    assert "no GPU: no host→device ceiling to measure" in out_text and "peer loaders: not measured" in out_text
    assert 0 < row["executor_wall_s"] <= row["seconds"] and row["outside_executor_s"] >= 0
    assert set(row["executor_setup_parts"]) >= {"batches", "staging", "scales_queued", "reads_queued"}
    assert all(v >= 0 for v in row["executor_setup_parts"].values()), row["executor_setup_parts"]  # steps in order


def test_bench_takes_peers_on_and_off():
    from pyloader.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["bench"]).peers and parse(["bench", "--peers"]).peers
    assert not parse(["bench", "--no-peers"]).peers


def test_every_argument_of_every_subcommand_has_help():
    import argparse

    from pyloader.cli import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subs.choices.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"pyloader {name} {'/'.join(action.option_strings) or action.dest}: no --help text"


def test_a_scale_grid_that_contradicts_the_declared_blocks_is_refused_by_inspect_load_and_convert(tmp_path, capsys):
    """One decision for all three commands: a [4, 1] scale of a [256, 256] weight would fit 64x256
    blocks, but the config declares 128x128; each command refuses it naming the scale."""
    import pyloader
    from safetensors.torch import load_file, save_file

    from pyloader.routing.presets import build_preset
    from pyloader.synthetic import allocate_targets, write_checkpoint
    from tiny_models import TINY

    c = dict(TINY["llama"], quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
    d = write_checkpoint(tmp_path / "m", c)
    name = "model.layers.0.self_attn.q_proj.weight_scale_inv"
    index = json.loads((d / "model.safetensors.index.json").read_text())
    f = d / index["weight_map"][name]
    tensors = load_file(str(f))
    assert tuple(tensors[name].shape) == (2, 2)
    tensors[name] = torch.ones(4, 1)
    save_file(tensors, str(f))
    needle = f"{name}' (the scale of model.layers.0.self_attn.q_proj.weight): scale shape [4, 1]"
    assert main(["inspect", str(d)]) == 2
    assert needle in capsys.readouterr().err
    with pytest.raises(pyloader.PyloaderInputError, match=re.escape(needle)):
        pyloader.load(allocate_targets(build_preset(c).targets, "cpu"), d, backend="torch", progress=False)
    assert main(["convert", str(d), str(tmp_path / "out"), "--device", "cpu", "--no-progress"]) == 2
    assert needle in capsys.readouterr().err and not (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_bench_nproc_compares_the_group_with_every_rank_reading(tmp_path):
    """``pyloader bench --nproc 2``: two processes at tensor parallel 2, each byte read once over the
    group against every rank reading for itself; the group reads the checkpoint's bytes once in all
    (whole tensors), and its loads match each rank's own (checked inside the bench)."""
    out = tmp_path / "results.jsonl"
    assert main(["bench", "--nproc", "2", "--size-gb", "0.02", "--repeats", "2", "--results", str(out),
                 "--tmpdir", str(tmp_path)]) == 0
    rows = {r["provider"]: dict(r, **r["config"]) for r in map(json.loads, out.read_text().splitlines())}
    group, alone = rows["pyloader group (each byte read once)"], rows["pyloader, every rank reads"]
    assert group["bench"] == "e2e-group" and group["nproc"] == 2 and len(group["repeats"]) == 2
    assert sum(group["bytes_read_per_rank"]) == group["checkpoint_bytes"]
    assert all(0 < b < alone["checkpoint_bytes"] for b in alone["bytes_read_per_rank"])  # each its TP rows
