"""What a conversion writes: every output tensor (dequantized or copied) and file, with headers known before any data."""

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from ..dtypes import DTYPES, FP8_SAFETENSORS, TORCH_TO_SAFETENSORS
from ..errors import PyloaderInputError
from ..format.quant import Quantized, check_methods, recognize
from ..format.safetensors import CheckpointError, TensorInfo, write_safetensors_header


@dataclass
class OutTensor:
    name: str
    source: TensorInfo
    dtype: str                                  # safetensors dtype of the output
    quant: Optional[Quantized] = None           # None: copied byte for byte

    @property
    def shape(self):
        return self.quant.out_shape if self.quant is not None else self.source.shape

    @property
    def row_group(self) -> int:
        """Rows a chunk must hold whole: a transposed tensor is written a whole plane at a time."""
        q = self.quant
        return q.shape[-2] if q is not None and q.transpose else 1

    @property
    def scale(self) -> Optional[TensorInfo]:
        return self.quant.scale if self.quant is not None else None

    @property
    def rows(self) -> int:
        """Rows of the 2-D view chunks walk (a quantized tensor's leading dims folded in)."""
        if self.quant is not None:
            return self.quant.rows
        shape = self.shape
        return shape[0] if len(shape) >= 2 else 1

    @property
    def cols(self) -> int:
        if self.quant is not None:
            return self.quant.cols
        shape = self.shape
        return math.prod(shape[1:]) if len(shape) >= 2 else (shape[0] if shape else 1)

    @property
    def grid(self) -> Tuple[int, int]:
        """The scale viewed as the 2-D block grid of the values' 2-D view."""
        q = self.quant
        return -(-q.rows // q.block[0]), -(-q.cols // q.block[1])

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][0] // 8


@dataclass
class OutFile:
    name: str
    tensors: List[OutTensor]
    header: bytes = b""
    offsets: Dict[str, Tuple[int, int]] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.header) + sum(t.nbytes for t in self.tensors)


def plan_conversion(ck, config: dict, out_dtype: torch.dtype, max_shard_size: Optional[int],
                    hf_quant_config: Optional[dict] = None, read_small=None) -> List[OutFile]:
    """Every output tensor and file: quantized weights (as :func:`pyloader.format.quant.recognize`
    finds them) dequantized under their dequantized names, their scales dropped, the rest copied."""
    check_methods(config)
    rec = recognize(ck.tensors, config, hf_quant_config, read_small)
    out: List[OutTensor] = []
    names = set()
    for name, info in ck.tensors.items():
        q = rec.quantized.get(name)
        if q is not None:
            out.append(OutTensor(q.name, info, TORCH_TO_SAFETENSORS[out_dtype], q))
        elif name in rec.consumed:
            continue
        elif info.dtype in FP8_SAFETENSORS:
            raise CheckpointError(info.file, f"{info.dtype} tensor that is not a quantized weight with its scale: "
                                             "FP8 values are never copied into a dequantized checkpoint", name)
        else:
            out.append(OutTensor(name, info, info.dtype))  # copied byte for byte
        if out and out[-1].name in names:
            raise CheckpointError(info.file, f"two tensors would be written as {out[-1].name!r}", name)
        names.add(out[-1].name)
    by_name = {t.source.name: t for t in out}
    files: List[OutFile] = []
    if max_shard_size is None:  # keep the source's file layout
        groups: Dict[str, List[OutTensor]] = {}
        for name, info in ck.tensors.items():
            if name in by_name:
                groups.setdefault(info.file.name, []).append(by_name[name])
        files = [OutFile(f, sorted(ts, key=lambda t: t.source.start)) for f, ts in sorted(groups.items())]
    else:
        ordered = sorted(out, key=lambda t: (str(t.source.file), t.source.start))
        cur: List[OutTensor] = []
        size = 0
        for t in ordered:
            if cur and size + t.nbytes > max_shard_size:
                files.append(OutFile("", cur))
                cur, size = [], 0
            cur.append(t)
            size += t.nbytes
        if cur:
            files.append(OutFile("", cur))
        for i, f in enumerate(files):
            f.name = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
    for f in files:
        f.header, f.offsets = write_safetensors_header([(t.name, t.dtype, t.shape) for t in f.tensors], {"format": "pt"})
    return files
