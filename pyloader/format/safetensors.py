"""Safetensors headers read and validated by pyloader itself (the loaders need byte offsets for
ranged reads), and headers written for outputs whose shapes are known before their data.

File layout (safetensors): 8 bytes little-endian header length ``N``, ``N`` bytes of UTF-8 JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then
the data; offsets are relative to the first data byte. Every check below rejects a file the
``safetensors`` library would also reject, or one that would make a ranged read return wrong
bytes; each error names the file and, where there is one, the tensor. Nothing is unpickled.
"""

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence, Tuple, Union

import torch

from ..dtypes import DTYPES
from ..errors import PyloaderInputError

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own cap
# A dimension must fit torch's int64 sizes (the safetensors library allows up to 2^64 - 1, which
# no torch tensor can have), and the running product of the dimensions, taken in order as the
# library takes it, must fit 64 bits: [2^40, 2^40, 0] is refused, [0, 2^40, 2^40] is an empty tensor.
MAX_DIM = (1 << 63) - 1
_PRODUCT_LIMIT = 1 << 64

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class CheckpointError(PyloaderInputError):
    """A checkpoint file or index is malformed; names the file and, where known, the tensor."""

    def __init__(self, file, message: str, tensor: Optional[str] = None):
        self.file, self.tensor = str(file), tensor
        where = f"{self.file}" + (f", tensor {tensor!r}" if tensor else "")
        super().__init__(f"{where}: {message}")


# Not frozen: a frozen dataclass sets each field through object.__setattr__ (1.8 us a tensor
# against 0.45 here), a third of reading the headers of a 37K-tensor checkpoint. Treat it as
# immutable all the same; it stays hashable.
@dataclass(slots=True, unsafe_hash=True)
class TensorInfo:
    """One tensor of a checkpoint: where its bytes are (absolute file offsets ``[start, end)``)."""

    name: str
    dtype: str                      # safetensors name: "BF16", "F8_E4M3", ...
    shape: Optional[Tuple[int, ...]]  # None when only an index was read (no header)
    file: Path
    start: int = -1
    end: int = -1

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> Optional[torch.dtype]:
        return DTYPES[self.dtype][1] if self.dtype in DTYPES else None

    @property
    def numel(self) -> int:
        return math.prod(self.shape) if self.shape is not None else -1


@dataclass
class SafetensorsFile:
    path: Path
    tensors: Dict[str, TensorInfo]
    metadata: Dict[str, str]
    data_start: int
    file_size: int


def no_duplicate_keys(pairs):
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise ValueError(f"duplicate key {k!r}")
        seen[k] = v
    return seen


def _refuse_constant(c):
    raise ValueError(f"non-finite number {c}")


def _keys_counted_once(obj, text: str) -> bool:
    """Whether the plain parse kept every key: json.loads keeps the last of repeated keys silently,
    and the hook that sees every pair costs a Python call per object. Outside strings a colon only
    ever follows a key, so ``text.count(":")`` is the keys written plus colons inside strings; it
    equals the keys parsed only when nothing was dropped and no string holds a colon. Otherwise
    the caller parses again with the hook, which tells which. Objects deeper than the entries are
    not counted: a valid header has none, and an invalid one is refused whatever they hold."""
    if type(obj) is not dict:
        return True
    return text.count(":") == len(obj) + sum(len(v) for v in obj.values() if type(v) is dict)


def _refuse_surrogates(path, obj: dict, metadata: dict) -> None:
    for text in (*obj, *metadata, *metadata.values()):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise CheckpointError(path, f"name or metadata {text!r} is not a valid UTF-8 string (a lone surrogate)") from None


def parse_header(path: Union[str, Path], head: bytes, file_size: int) -> SafetensorsFile:
    """Validate a header given the file's first bytes (at least ``8 + N``) and its size."""
    path = Path(path)
    if len(head) < 8 or file_size < 8:
        raise CheckpointError(path, f"file is {file_size} bytes: too short for a safetensors header length")
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(path, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte cap (corrupt or not safetensors)")
    if 8 + n > file_size:
        raise CheckpointError(path, f"header length {n} runs past the end of the {file_size}-byte file (truncated?)")
    raw = head[8:8 + n]
    if len(raw) < n:
        raise CheckpointError(path, f"header truncated: {len(raw)} of {n} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(path, f"header is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not text.startswith("{"):
        raise CheckpointError(path, "header does not start with '{' (not a safetensors file?)")
    try:
        obj = json.loads(text, parse_constant=_refuse_constant)
        if not _keys_counted_once(obj, text):  # a key may be repeated: parse again, keeping every pair
            obj = json.loads(text, object_pairs_hook=no_duplicate_keys, parse_constant=_refuse_constant)
    except ValueError as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(path, f"header is not well-formed JSON: {e}") from None
    except RecursionError:
        raise CheckpointError(path, "header nests JSON too deeply to be a safetensors header") from None
    if not isinstance(obj, dict):
        raise CheckpointError(path, "header is not a JSON object")
    metadata = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CheckpointError(path, "__metadata__ must map strings to strings")
    if "\\u" in text:  # an escape may encode a lone surrogate, which is no UTF-8 string (and no file name)
        _refuse_surrogates(path, obj, metadata)
    data_start = 8 + n
    data_len = file_size - data_start
    tensors: Dict[str, TensorInfo] = {}
    spans = []
    for name, entry in obj.items():  # type() is, not isinstance: bool is an int subclass, and this loop runs per tensor
        if type(entry) is not dict or len(entry) != 3 or not ("dtype" in entry and "shape" in entry
                                                              and "data_offsets" in entry):
            raise CheckpointError(path, "entry must have exactly dtype, shape and data_offsets", name)
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if type(dtype) is not str or dtype not in DTYPES:
            raise CheckpointError(path, f"unknown dtype {dtype!r} (known: {', '.join(DTYPES)})", name)
        if type(shape) is not list:
            raise CheckpointError(path, f"shape {shape!r} must be a list of non-negative integers", name)
        numel = 1
        for d in shape:  # a loop, not all(generator): this runs per dimension of every tensor
            if type(d) is not int or d < 0:
                raise CheckpointError(path, f"shape {shape!r} must be a list of non-negative integers", name)
            if d > MAX_DIM or numel * d >= _PRODUCT_LIMIT:
                raise CheckpointError(path, f"shape {shape!r}: a dimension past 2^63 - 1 or a product past 64 bits",
                                      name)
            numel *= d
        if (type(offsets) is not list or len(offsets) != 2 or type(offsets[0]) is not int
                or type(offsets[1]) is not int or not 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(path, f"data_offsets {offsets!r} must be [begin, end] with 0 <= begin <= end", name)
        bits = DTYPES[dtype][0]
        if (numel * bits) % 8:
            raise CheckpointError(path, f"{numel} elements of {bits}-bit {dtype} do not fill whole bytes", name)
        want = numel * bits // 8
        if offsets[1] - offsets[0] != want:
            raise CheckpointError(path, f"byte length {offsets[1] - offsets[0]} != {want} (numel {numel} x {dtype}, shape {shape})", name)
        if offsets[1] > data_len:
            raise CheckpointError(path, f"data_offsets {offsets} run past the {data_len} data bytes of the file", name)
        spans.append((offsets[0], offsets[1], name))
        tensors[name] = TensorInfo(name, dtype, tuple(shape), path, data_start + offsets[0], data_start + offsets[1])
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else f"leaves a gap of {begin - pos} bytes before it"
            raise CheckpointError(path, f"data_offsets [{begin}, {end}] {what}", name)
        pos = end
    if pos != data_len:
        raise CheckpointError(path, f"tensor data ends at byte {pos} of {data_len}: {data_len - pos} trailing bytes "
                                    "(the file and its header disagree)")
    return SafetensorsFile(path, tensors, metadata, data_start, file_size)


def read_safetensors_header(path: Union[str, Path]) -> SafetensorsFile:
    """Read and validate one ``.safetensors`` file's header (reads only the header bytes)."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(path, "pickle checkpoints are refused (they can run code); convert to safetensors")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            first = f.read(8)
            n = struct.unpack("<Q", first)[0] if len(first) == 8 else 0
            head = first + (f.read(min(n, MAX_HEADER_BYTES + 1)) if n <= MAX_HEADER_BYTES else b"")
    except OSError as e:
        raise CheckpointError(path, f"cannot read: {e.strerror or e}") from None
    return parse_header(path, head, size)


def write_safetensors_header(tensors: Iterable[Tuple[str, str, Sequence[int]]], metadata: Optional[Dict[str, str]] = None,
                             align: int = 8) -> Tuple[bytes, Dict[str, Tuple[int, int]]]:
    """Header bytes (length prefix included, padded with spaces to ``align``) for tensors given as
    ``(name, safetensors dtype, shape)`` in data order, and each tensor's ``[begin, end)`` data offsets.
    Used by writers that know every shape before any data (``pyloader convert``)."""
    header: Dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offsets, pos = {}, 0
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * DTYPES[dtype][0] // 8
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets[name] = (pos, pos + nbytes)
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % align)
    return struct.pack("<Q", len(raw)) + raw, offsets
