"""Checkpoint directories: an index (its files confined to the directory), a glob, index-only opens and duplicate names."""

import json

import pytest
import torch
from safetensors.torch import save_file

from pyloader.format.checkpoint import open_checkpoint
from pyloader.format.safetensors import CheckpointError


def _index(tmp_path, weight_map, files=("a.safetensors",)):
    for f in files:
        save_file({"x": torch.zeros(2), "y": torch.ones(3)}, str(tmp_path / f))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 20},
                                                                       "weight_map": weight_map}))
    return tmp_path


def test_directory_with_index(tmp_path):
    ck = open_checkpoint(_index(tmp_path, {"x": "a.safetensors", "y": "a.safetensors"}))
    assert set(ck.tensors) == {"x", "y"} and ck.index_metadata["total_size"] == 20 and ck.total_bytes() == 20


@pytest.mark.parametrize("weight_map,needle", [
    ({"x": "../a.safetensors"}, "leaves the checkpoint directory"),
    ({"x": "/etc/passwd"}, "leaves the checkpoint directory"),
    ({"x": "b.safetensors"}, "do not exist"),
    ({"z": "a.safetensors"}, "not in this file"),
    ({"x": 5}, "not a file name"),
])
def test_bad_index(tmp_path, weight_map, needle):
    with pytest.raises(CheckpointError, match=needle):
        open_checkpoint(_index(tmp_path, weight_map))


def test_symlink_escaping_the_directory_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file({"x": torch.zeros(2)}, str(outside / "o.safetensors"))
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "link.safetensors").symlink_to(outside / "o.safetensors")
    (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "link.safetensors"}}))
    with pytest.raises(CheckpointError, match="outside"):
        open_checkpoint(ck)


def test_index_only_and_glob_and_duplicates(tmp_path):
    d = tmp_path / "idx"
    d.mkdir()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "a.safetensors"}}))
    ck = open_checkpoint(d / "model.safetensors.index.json", require_files=False)
    assert not ck.headers_read and ck.tensors["x"].shape is None
    g = tmp_path / "glob"
    g.mkdir()
    save_file({"x": torch.zeros(2)}, str(g / "a.safetensors"))
    save_file({"x": torch.zeros(2)}, str(g / "b.safetensors"))
    with pytest.raises(CheckpointError, match="also present"):
        open_checkpoint(g)
    p = tmp_path / "pk"
    p.mkdir()
    (p / "pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(CheckpointError, match="pickle"):
        open_checkpoint(p)


