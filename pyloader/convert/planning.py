"""What a conversion writes: every output tensor (dequantized or copied) and file, with headers known before any data."""

import math
import re
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
    # --to fp8-block: this weight is (re)quantized to 128x128 block FP8; ``scale_out`` is its
    # ``weight_scale_inv`` output, written by this tensor's chunks (``scale_of`` points back)
    requant: bool = False
    scale_out: Optional["OutTensor"] = None
    scale_of: Optional["OutTensor"] = None
    out_shape: Optional[Tuple[int, ...]] = None  # a scale output's grid shape

    @property
    def shape(self):
        if self.out_shape is not None:
            return self.out_shape
        return self.quant.out_shape if self.quant is not None else self.source.shape

    @property
    def row_group(self) -> int:
        """Rows a chunk must hold whole: a transposed tensor is written a whole plane at a time, a
        requantized one whole 128-row blocks."""
        if self.requant:
            return FP8_BLOCK[0]
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


FP8_BLOCK = (128, 128)
# Not requantized by --to fp8-block (DeepSeek's recipe keeps them in BF16): embeddings, the head,
# norms, MoE routers.
KEEP_HIGH_PRECISION = (r"embed", r"lm_head", r"norm", r"\.gate\.weight$", r"\.router\.", r"(^|\.)head\.weight$")


def requantizable(name: str, info: TensorInfo) -> bool:
    """A 2-D float linear weight --to fp8-block quantizes."""
    return (name.endswith(".weight") and info.dtype in ("BF16", "F16", "F32") and info.shape is not None
            and len(info.shape) == 2 and not any(re.search(p, name) for p in KEEP_HIGH_PRECISION))


def _fp8_pair(name: str, info: TensorInfo, q: Optional[Quantized]) -> List[OutTensor]:
    rows, cols = (q.shape if q is not None else info.shape)
    w = OutTensor(name, info, "F8_E4M3", q, requant=True)
    base = name[: -len("weight")] if name.endswith("weight") else name + "."
    s = OutTensor(base + "weight_scale_inv", info, "F32", None, scale_of=w,
                  out_shape=(-(-rows // FP8_BLOCK[0]), -(-cols // FP8_BLOCK[1])))
    w.scale_out = s
    return [w, s]


def plan_conversion(ck, config: dict, out_dtype: torch.dtype, max_shard_size: Optional[int],
                    hf_quant_config: Optional[dict] = None, read_small=None, to: str = "float") -> List[OutFile]:
    """Every output tensor and file: quantized weights (as :func:`pyloader.format.quant.recognize`
    finds them) dequantized under their dequantized names, their scales dropped, the rest copied.
    ``to="fp8-block"``: quantized 2-D weights and float linear weights become 128x128 block FP8
    with F32 ``weight_scale_inv`` instead (block FP8 of that grid is copied with its scale)."""
    check_methods(config)
    rec = recognize(ck.tensors, config, hf_quant_config, read_small)
    fp8 = to == "fp8-block"
    out: List[OutTensor] = []
    names = set()
    for name, info in ck.tensors.items():
        q = rec.quantized.get(name)
        if fp8 and q is not None and q.scheme == "fp8-block" and q.block == FP8_BLOCK \
                and q.scale.dtype == "F32" and info.dtype == "F8_E4M3":
            out += [OutTensor(name, info, info.dtype), OutTensor(q.scale.name, q.scale, "F32")]  # already the target
        elif fp8 and q is not None and len(q.shape) == 2:
            out += _fp8_pair(q.name, info, q)
        elif fp8 and q is None and requantizable(name, info):
            out += _fp8_pair(name, info, None)
        elif q is not None:
            out.append(OutTensor(q.name, info, TORCH_TO_SAFETENSORS[out_dtype], q))
        elif name in rec.consumed:
            continue
        elif info.dtype in FP8_SAFETENSORS:
            raise CheckpointError(info.file, f"{info.dtype} tensor that is not a quantized weight with its scale: "
                                             "FP8 values are never copied into a dequantized checkpoint", name)
        else:
            out.append(OutTensor(name, info, info.dtype))  # copied byte for byte
    for t in out:
        if t.name in names:
            raise CheckpointError(t.source.file, f"two tensors would be written as {t.name!r}", t.source.name)
        names.add(t.name)
    files: List[OutFile] = []
    if max_shard_size is None:  # keep the source's file layout (a scale output beside its weight)
        groups: Dict[str, List[OutTensor]] = {}
        for t in out:
            groups.setdefault(t.source.file.name, []).append(t)
        files = [OutFile(f, sorted(ts, key=lambda t: (t.source.start, t.scale_of is not None)))
                 for f, ts in sorted(groups.items())]
    else:
        ordered = sorted(out, key=lambda t: (str(t.source.file), t.source.start, t.scale_of is not None))
        cur: List[OutTensor] = []
        size = 0
        for t in ordered:
            if cur and size + t.nbytes > max_shard_size and t.scale_of is None:  # a scale stays with its weight
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
