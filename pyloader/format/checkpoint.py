"""Checkpoint directories: a ``model.safetensors.index.json`` (its files confined to the directory),
a glob of ``*.safetensors``, or a list of files, opened into one table of every tensor."""

import contextlib
import gc
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from .safetensors import PICKLE_SUFFIXES, CheckpointError, TensorInfo, no_duplicate_keys, read_safetensors_header


@dataclass
class Checkpoint:
    """All tensors of a checkpoint (a directory, an index file, or a list of files)."""

    directory: Optional[Path]
    files: List[Path]
    tensors: Dict[str, TensorInfo]
    index_metadata: Dict[str, object] = field(default_factory=dict)
    headers_read: bool = True

    @property
    def config_path(self) -> Optional[Path]:
        if self.directory is not None and (self.directory / "config.json").is_file():
            return self.directory / "config.json"
        return None

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values()) if self.headers_read else -1


INDEX_NAME = "model.safetensors.index.json"


def _file_in_directory(directory: Path, index_path: Path, fname) -> Path:
    if not isinstance(fname, str) or not fname or "\x00" in fname:
        raise CheckpointError(index_path, f"weight_map file name {fname!r} is not a file name")
    p = Path(fname)
    if p.is_absolute() or ".." in p.parts:
        raise CheckpointError(index_path, f"weight_map file {fname!r} leaves the checkpoint directory")
    return confined(directory, directory / p, index_path, f"weight_map file {fname!r}")


def confined(directory: Path, path: Path, where: Path, what: str) -> Path:
    """``path`` if it resolves inside ``directory`` (a symlink may point elsewhere in it, not out of
    it); one rule for the files an index names and the files a directory holds."""
    try:
        path.resolve().relative_to(directory.resolve())
    except ValueError:
        raise CheckpointError(where, f"{what} resolves outside the checkpoint directory") from None
    return path


def read_json_object(path: Path, what: str) -> dict:
    """A JSON file that must hold one object (config.json, an index, hf_quant_config.json): any
    problem reading or parsing it is an input error naming the file, never a traceback."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"), object_pairs_hook=no_duplicate_keys)
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(path, f"cannot read the {what}: {e}") from None
    except RecursionError:
        raise CheckpointError(path, f"cannot read the {what}: JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"the {what} is not a JSON object")
    return obj


def read_index(index_path: Path) -> Tuple[Dict[str, str], Dict[str, object]]:
    obj = read_json_object(index_path, "index")
    if not isinstance(obj.get("weight_map"), dict):
        raise CheckpointError(index_path, "index has no weight_map object")
    meta = obj.get("metadata") or {}
    if not isinstance(meta, dict):
        raise CheckpointError(index_path, "index metadata must be an object")
    return obj["weight_map"], meta


@contextlib.contextmanager
def gc_paused():
    """Pause Python's cyclic garbage collector (if it runs) for a bulk step that only allocates:
    parsing a 92K-tensor checkpoint's headers builds ~1M objects, and the collections they trigger
    scan every object already built (docs/decisions.md#gc-pause). Nothing here makes reference cycles."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def open_checkpoint(source: Union[str, Path, Sequence[Union[str, Path]]], require_files: bool = True) -> Checkpoint:
    """Open a checkpoint: a directory (index or ``*.safetensors`` glob), an index file, or files.

    ``require_files=False`` accepts an index whose shard files are absent (``pyloader inspect`` on
    an index alone): names and files are known, shapes are not.
    """
    with gc_paused():
        return _open_checkpoint(source, require_files)


def _open_checkpoint(source, require_files: bool) -> Checkpoint:
    if isinstance(source, (list, tuple)):
        files = [Path(p) for p in source]
        return _from_files(None, files)
    path = Path(source)
    if path.is_file() and path.name.endswith(".index.json"):
        return _from_index(path.parent, path, require_files)
    if path.is_file():
        return _from_files(path.parent, [path])
    if not path.is_dir():
        raise CheckpointError(path, "no such checkpoint file or directory")
    index = path / INDEX_NAME
    if index.is_file():
        return _from_index(path, index, require_files)
    files = [confined(path, f, f, f"{f.name}") for f in sorted(path.glob("*.safetensors"))]
    if not files:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        hint = f" (found pickle files {pickles[:3]}: refused, they can run code; convert to safetensors)" if pickles else ""
        raise CheckpointError(path, f"no *.safetensors files and no {INDEX_NAME}{hint}")
    return _from_files(path, files)


def _from_files(directory: Optional[Path], files: List[Path]) -> Checkpoint:
    tensors: Dict[str, TensorInfo] = {}
    for f in files:
        header = read_safetensors_header(f)
        for name, info in header.tensors.items():
            if name in tensors:
                raise CheckpointError(f, f"tensor also present in {tensors[name].file}", name)
            tensors[name] = info
    return Checkpoint(directory, files, tensors)


def _from_index(directory: Path, index_path: Path, require_files: bool) -> Checkpoint:
    weight_map, meta = read_index(index_path)
    by_file: Dict[Path, List[str]] = {}
    checked: Dict[str, Path] = {}
    for name, fname in weight_map.items():
        path = checked.get(fname) if isinstance(fname, str) else None
        if path is None:
            path = checked[fname] = _file_in_directory(directory, index_path, fname)
        by_file.setdefault(path, []).append(name)
    missing = [p.name for p in by_file if not p.is_file()]
    tensors: Dict[str, TensorInfo] = {}
    if missing and require_files:
        raise CheckpointError(index_path, f"{len(missing)} file(s) listed in weight_map do not exist: {missing[:5]}")
    if missing:  # index only: names and files, no shapes
        for f, names in by_file.items():
            for name in names:
                tensors[name] = TensorInfo(name, "?", None, f)
        return Checkpoint(directory, sorted(by_file), tensors, meta, headers_read=False)
    for f, names in by_file.items():
        header = read_safetensors_header(f)
        for name in names:
            if name not in header.tensors:
                raise CheckpointError(f, f"listed in {index_path.name} but not in this file", name)
            tensors[name] = header.tensors[name]
    return Checkpoint(directory, sorted(by_file), tensors, meta)
