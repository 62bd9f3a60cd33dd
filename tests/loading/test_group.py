"""``pyloader.load(..., group=…)`` in several processes over gloo: every rank ends with bitwise the
parameters of a one-process load at its own ``tp``/``pp``/``ep`` (TP, uneven PP, EP, TP x PP; FP8
and gpt-oss MXFP4 dequantized per expert), and each checkpoint byte is read by exactly one process:
the ranks' reads add up to the bytes of the tensors anyone needs, each needed tensor once."""

import json

import pytest
import torch
import torch.multiprocessing as mp

import pyloader
from pyloader.format.checkpoint import open_checkpoint
from pyloader.format.quant import recognize_checkpoint
from pyloader.loading.group import assign_readers, exchange_schedule, layer_windows, needs_by_layer, tensor_owner
from pyloader.parallel import Parallel
from pyloader.routing.layout import ABSENT
from pyloader.routing.plan import build_plan
from pyloader.routing.presets import build_preset
from pyloader.synthetic import allocate_targets, write_checkpoint

from helpers import assert_bitwise_equal, poison_
from tiny_models import TINY


def _specs(config, par):
    """The rank's target specs, in the dequantized layout where a preset has one (gpt-oss's experts)."""
    specs = {}
    for n, spec in build_preset(config, parallel=par).targets.items():
        alt = spec.alternative
        if alt is None:
            specs[n] = spec
        elif alt != ABSENT:
            specs[n] = alt
    return specs


def _targets(config, par):
    return {n: poison_(t) for n, t in allocate_targets(_specs(config, par), "cpu").items()}


def needed_tensors(c, config, par, quant):
    """The checkpoint tensors a rank's one-process load reads, from its plan."""
    p = build_preset(config, parallel=par)
    plan = build_plan(c, _specs(config, par), p.rules, block_size=p.block_size, quant=quant)
    return set().union(*needs_by_layer(plan, tensor_owner(c)).values())


def _worker(rank, world, store, ck, config, layouts, out, nodes=None, window=None):
    import torch.distributed as dist

    from pyloader.loading import group as group_module

    if window is not None:
        group_module.WINDOW_BYTES = window
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        tp, pp, ep = layouts[rank]
        par = Parallel(tp[0], tp[1], pp[0], pp[1], ep[0], ep[1])
        got = _targets(config, par)
        report = pyloader.load(got, ck, tp=tp, pp=pp, ep=ep, backend="torch", progress=False, group=dist.group.WORLD,
                               node=nodes[rank] if nodes else None)
        want = _targets(config, par)
        pyloader.load(want, ck, tp=tp, pp=pp, ep=ep, backend="torch", progress=False)
        for name in want:
            assert_bitwise_equal(got[name], want[name], f"rank {rank} {name}")
        assert report.missing == [] and report.unexpected == []
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"read": report.bytes_read, "received": report.bytes_received, "io": report.io,
                       "held": report.bytes_held}, f)
    finally:
        dist.destroy_process_group()


def _run(tmp_path, ck, config, layouts, nodes=None, window=None):
    world = len(layouts)
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), str(ck), config, layouts, str(tmp_path / "out"), nodes,
                            window), nprocs=world, join=True)
    reports = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(world)]
    c = open_checkpoint(ck)
    quant = recognize_checkpoint(c, config)
    needs = [needed_tensors(c, config, Parallel(t[0], t[1], p[0], p[1], e[0], e[1]), quant) for t, p, e in layouts]
    nodes = nodes or [None] * world
    for node in set(nodes):  # each byte a node's ranks need, read once on that node
        ranks = [i for i in range(world) if nodes[i] == node]
        node_bytes = sum(c.tensors[n].nbytes for n in set().union(*(needs[i] for i in ranks)))
        assert sum(reports[i]["read"] for i in ranks) == node_bytes, node
    total = sum(c.tensors[n].nbytes for n in set().union(*needs))
    assert all(r["io"] == f"group of {world}" for r in reports)
    return reports, total


ONE = ((0, 1), (0, 1), (0, 1))


@pytest.mark.parametrize("case", ["tp2", "pp2_uneven", "ep2", "tp2_layer_windows"])
def test_two_ranks_read_each_byte_once_and_load_what_one_process_loads(tmp_path, case):
    family = {"tp2": "qwen3_moe", "pp2_uneven": "deepseek_v3", "ep2": "qwen3_moe", "tp2_layer_windows": "llama"}[case]
    c = dict(TINY[family], quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
    if case == "pp2_uneven":
        c["num_hidden_layers"] = 3
    ck = write_checkpoint(tmp_path / "ck", c, fp8=True, shard_bytes=300_000)
    layouts = {"tp2": [((r, 2), (0, 1), (0, 1)) for r in range(2)],
               "pp2_uneven": [((0, 1), (r, 2), (0, 1)) for r in range(2)],
               "ep2": [((0, 1), (0, 1), (r, 2)) for r in range(2)],
               "tp2_layer_windows": [((r, 2), (0, 1), (0, 1)) for r in range(2)]}[case]
    # a window of one layer at a time (what a large model does at 2 GiB windows): same bytes, same reads
    reports, total = _run(tmp_path, ck, c, layouts, window=1 if case == "tp2_layer_windows" else None)
    if case.startswith("tp2"):  # both ranks need every tensor: what one did not read, it received
        assert all(r["read"] + r["received"] == total for r in reports) and all(r["read"] for r in reports)
    if case.startswith("tp2"):  # a window's tensors at a time (every rank needs every tensor)
        per_layer = {}
        for name, info in open_checkpoint(ck).tensors.items():
            key = name.split(".")[2] if name.startswith("model.layers.") else None
            per_layer[key] = per_layer.get(key, 0) + info.nbytes
        # one layer a window: the largest layer, or the embeddings and head; else those and all the layers
        held = max(per_layer.values()) if case == "tp2_layer_windows" else max(per_layer[None], total - per_layer[None])
        assert all(r["held"] == held for r in reports) and held < total, (reports, per_layer)
    if case == "pp2_uneven":  # the stages need disjoint tensors: each byte travels at most once
        assert sum(r["read"] + r["received"] for r in reports) <= 2 * total


def test_four_ranks_tp2_by_pp2_with_gpt_oss_mxfp4_experts_dequantized(tmp_path):
    from test_gpt_oss_dequantized import CONFIG, _checkpoint

    _checkpoint(tmp_path / "ck")
    layouts = [((r % 2, 2), (r // 2, 2), (0, 1)) for r in range(4)]
    _run(tmp_path, tmp_path / "ck", CONFIG, layouts)


def test_two_nodes_of_two_ranks_each_read_the_checkpoint_once(tmp_path):
    """Ranks of one node share a page cache: each node reads every needed byte once and sends only
    inside itself (the node names stand in for two hosts)."""
    c = dict(TINY["qwen3_moe"], quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
    ck = write_checkpoint(tmp_path / "ck", c, fp8=True, shard_bytes=300_000)
    layouts = [((r % 2, 2), (0, 1), (r // 2, 2)) for r in range(4)]
    _run(tmp_path, ck, c, layouts, nodes=["a", "a", "b", "b"])


def _failing_worker(rank, store, ck, out):
    import torch.distributed as dist

    from pyloader.loading import group as group_module

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        if rank == 1:  # a read error on one rank only
            def pread(*args):
                raise OSError(5, "Input/output error")
            group_module.os.pread = pread
        _load_llama_tp2_noting_the_error(rank, ck, out, dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def _load_llama_tp2_noting_the_error(rank, ck, out, group, node=None):
    try:
        pyloader.load(_targets(TINY["llama"], Parallel(rank, 2)), ck, tp=(rank, 2), backend="torch", progress=False,
                      group=group, node=node)
    except pyloader.PyloaderInputError as e:
        with open(f"{out}.{rank}", "w") as f:
            f.write(str(e))


def test_a_read_error_on_one_rank_stops_every_rank_naming_it(tmp_path):
    """The other ranks would otherwise wait forever for what the failed reader never sends."""
    ck = write_checkpoint(tmp_path / "ck", TINY["llama"], fp8=False)
    ctx = mp.start_processes(_failing_worker, args=(str(tmp_path / "store"), str(ck), str(tmp_path / "err")),
                             nprocs=2, join=False, start_method="spawn")
    deadline = 120
    while not ctx.join(timeout=5):
        deadline -= 5
        assert deadline > 0, "a rank is still waiting"
    for rank in (0, 1):
        msg = (tmp_path / f"err.{rank}").read_text()
        assert "rank 1 reading" in msg and "Input/output error" in msg and ".safetensors, tensor '" in msg


def _subgroup_worker(rank, store, ck, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=3)
    try:
        pair = dist.new_group([0, 1])
        if rank < 2:
            _load_llama_tp2_noting_the_error(rank, ck, out, pair, node=f"host{rank}")
    finally:
        dist.destroy_process_group()


def test_across_nodes_a_group_smaller_than_the_job_is_refused(tmp_path):
    """Every process of the job must create the nodes' groups; a subgroup's ranks alone would hang."""
    ck = write_checkpoint(tmp_path / "ck", TINY["llama"], fp8=False)
    mp.spawn(_subgroup_worker, args=(str(tmp_path / "store"), str(ck), str(tmp_path / "err")), nprocs=3, join=True)
    for rank in (0, 1):
        assert "needs the whole job as its group" in (tmp_path / f"err.{rank}").read_text()


def test_readers_split_the_bytes_in_file_order():
    from pyloader.format.safetensors import TensorInfo

    infos = [TensorInfo(f"t{i}", "U8", (n,), "f", 0, n) for i, n in enumerate([10, 10, 40, 20, 20])]
    assert assign_readers(infos, 2) == {"t0": 0, "t1": 0, "t2": 0, "t3": 1, "t4": 1}
    assert set(assign_readers(infos, 5).values()) <= set(range(5))


def test_layer_windows_keep_the_embeddings_apart_and_fill_up_to_the_budget():
    sizes = {None: 5, 0: 3, 1: 3, 2: 3, 3: 9, 4: 1}
    assert layer_windows([None, 0, 1, 2, 3, 4], sizes.get, 6) == [[None], [0, 1], [2], [3], [4]]
    assert layer_windows([0, 1], sizes.get, 100) == [[0, 1]]


def test_a_tensor_travels_in_the_first_window_any_rank_needs_it_and_stays_until_the_last():
    needs = [{None: {"emb"}, 0: {"a"}, 1: {"b", "emb"}}, {0: {"a"}, 1: {"c"}}]
    first, last, users = exchange_schedule(needs, [0, 1], 0, {None: 0, 0: 1, 1: 2})
    assert first == {"emb": 0, "a": 1, "b": 2, "c": 2}
    assert last == {"emb": 2, "a": 1, "b": 2}  # rank 0 keeps the embedding for layer 1
    assert users == {"emb": {0}, "a": {0, 1}, "b": {0}, "c": {1}}
    assert exchange_schedule(needs, [1], 1, {None: 0, 0: 1, 1: 2})[0] == {"a": 1, "c": 2}  # another node's view


def test_a_group_needs_a_checkpoint_directory(tmp_path):
    with pytest.raises(pyloader.PyloaderInputError, match="checkpoint directory"):
        pyloader.load({"x": torch.zeros(1)}, {"x": torch.zeros(1)}, group=object())


def _gpu_worker(rank, world, store, ck, config, backend, out):
    import torch.distributed as dist

    torch.cuda.set_device(0)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        par = Parallel(rank, world)
        specs = _specs(config, par)
        got = {n: poison_(t) for n, t in allocate_targets(specs, "cuda").items()}
        report = pyloader.load(got, ck, tp=(rank, world), progress=False, group=dist.group.WORLD)
        want = {n: poison_(t) for n, t in allocate_targets(specs, "cuda").items()}
        pyloader.load(want, ck, tp=(rank, world), progress=False)
        for name in want:
            assert_bitwise_equal(got[name], want[name], f"rank {rank} {name}")
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"read": report.bytes_read, "backend": report.backend}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.parametrize("backend,world", [("nccl", 1), ("gloo", 2)])
def test_group_load_onto_the_gpu(tmp_path, backend, world):
    """NCCL with one rank (device buffers, the CUDA transforms), and two gloo ranks sharing the GPU
    (host buffers exchanged, then moved to the device): bitwise the one-process CUDA load."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    c = dict(TINY["qwen3_moe"], quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
    ck = write_checkpoint(tmp_path / "ck", c, fp8=True, shard_bytes=300_000)
    mp.spawn(_gpu_worker, args=(world, str(tmp_path / "store"), str(ck), c, backend, str(tmp_path / "out")),
             nprocs=world, join=True)
    reports = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(world)]
    assert all(r["backend"] == "cuda" for r in reports) and sum(r["read"] for r in reports) > 0
