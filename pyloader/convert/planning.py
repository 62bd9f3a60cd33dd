"""What a conversion writes: every output tensor (dequantized or copied) and file, with headers known before any data."""

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from ..dtypes import DTYPES, FP8_SAFETENSORS, TORCH_TO_SAFETENSORS
from ..errors import PyloaderInputError
from ..format.safetensors import CheckpointError, TensorInfo, write_safetensors_header
from ..format.scales import find_scale, scale_block, weight_of_scale


@dataclass
class OutTensor:
    name: str
    source: TensorInfo
    dtype: str                                  # safetensors dtype of the output
    scale: Optional[TensorInfo] = None
    block: Tuple[int, int] = (128, 128)
    grid: Tuple[int, int] = (1, 1)                # the scale viewed as a 2-D block grid

    @property
    def shape(self):
        return self.source.shape

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


def plan_conversion(ck, config: dict, out_dtype: torch.dtype, max_shard_size: Optional[int]) -> List[OutFile]:
    q = config.get("quantization_config") or {}
    method = q.get("quant_method")
    if method not in (None, "fp8"):
        raise PyloaderInputError(f"quantization_config.quant_method {method!r} is not blockwise FP8: "
                                 "only FP8 weights with block scales are converted")
    preferred = tuple(q.get("weight_block_size") or (128, 128))
    names = set(ck.tensors)
    scales_used = {}
    out: List[OutTensor] = []
    for name, info in ck.tensors.items():
        if info.dtype in FP8_SAFETENSORS:
            s = find_scale(name, names)
            if s is None:
                raise CheckpointError(info.file, f"{info.dtype} weight has no scale tensor ({name}_scale_inv, "
                                                 f"{name}_scale or .scale_inv): not a blockwise FP8 weight", name)
            sinfo = ck.tensors[s]
            if sinfo.dtype not in ("F32", "BF16", "F16", "F8_E8M0", "U8"):
                raise CheckpointError(sinfo.file, f"scale dtype {sinfo.dtype} is not a supported scale format", s)
            if not info.shape or len(info.shape) > 2:
                raise CheckpointError(info.file, f"{info.dtype} tensor of shape {list(info.shape)}: only 1-D and 2-D "
                                                 "blockwise weights are converted", name)
            block = scale_block(info.shape, sinfo.shape, preferred, f"{sinfo.file}, tensor {s!r} (the scale of {name})")
            rows = info.shape[0] if len(info.shape) == 2 else 1
            cols = info.shape[-1]
            grid = (-(-rows // block[0]), -(-cols // block[1]))
            scales_used[s] = name
            out.append(OutTensor(name, info, TORCH_TO_SAFETENSORS[out_dtype], sinfo, block, grid))
    for name, info in ck.tensors.items():
        if info.dtype in FP8_SAFETENSORS or name in scales_used:
            continue
        if info.dtype == "F8_E8M0":
            raise CheckpointError(info.file, "an E8M0 tensor that scales no FP8 weight", name)
        weight = weight_of_scale(name)
        if weight is not None and weight not in names:
            raise CheckpointError(info.file, f"a scale with no weight (no {weight} in the checkpoint)", name)
        out.append(OutTensor(name, info, info.dtype))  # copied byte for byte
    by_name = {t.name: t for t in out}
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
