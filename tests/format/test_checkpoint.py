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
    (ck / "model.safetensors.index.json").unlink()  # the same link found by the glob: the same rule
    with pytest.raises(CheckpointError, match="link.safetensors resolves outside"):
        open_checkpoint(ck)
    inside = ck / "real.bin.safetensors"
    save_file({"y": torch.ones(3)}, str(inside))
    (ck / "link.safetensors").unlink()
    (ck / "alias.safetensors").symlink_to(inside)  # a link that stays inside is followed (and its tensor found twice)
    with pytest.raises(CheckpointError, match="also present"):
        open_checkpoint(ck)


@pytest.mark.parametrize("text,needle", [
    ("{", "cannot read the config"), ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("[1, 2]", "not a JSON object"), ('{"a": 1, "a": 2}', "duplicate key"), (b"\xff\xfe", "cannot read the config"),
])
def test_a_bad_json_file_is_an_input_error_naming_it(tmp_path, text, needle):
    from pyloader.format.checkpoint import read_json_object

    p = tmp_path / "config.json"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(CheckpointError, match=needle) as e:
        read_json_object(p, "config")
    assert str(p) in str(e.value)


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


