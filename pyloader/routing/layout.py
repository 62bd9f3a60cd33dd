"""Where checkpoint tensors land: a target (parameter or buffer) of this rank, and the placement of
each checkpoint tensor (or this rank's rows or columns of it) in the target's plane."""

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple, Union

import torch

from ..parallel import Range


@dataclass
class ShardPlacement:
    """Where one checkpoint tensor (or this rank's part of it) lands in a target's plane."""

    offset: int                            # first row of the target plane (dim 0; a 1-D target: element)
    size: int                              # rows (elements) taken on this rank
    src_rows: Optional[Range] = None       # range of the source's rows (dim 0) taken; None: all
    src_cols: Optional[Range] = None       # range of the source's columns (dim 1) taken; None: all
    src_shape: Optional[Tuple[int, ...]] = None  # expected shape of the whole source (one expert's)
    # A source whose rank-local part is several row ranges (the Mamba2 in_proj [z|x|B|C|dt] split
    # segment by segment): each is its own placement; the plan makes one piece per segment.
    segments: Optional[Tuple["ShardPlacement", ...]] = None


# ``fill_from`` of a target that holds zeros on this rank (vLLM's gpt-oss ``w2_bias`` on tensor-parallel
# ranks other than 0: the experts add it once, on rank 0)
ZEROS = "<zeros>"
ABSENT = "<absent>"


@dataclass
class TargetSpec:
    """A parameter or buffer on this rank, and how checkpoint tensors fill it."""

    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    layer: Optional[int] = None
    shards: Dict[Any, ShardPlacement] = field(default_factory=dict)  # shard id (None: unstacked) → placement
    experts: Optional[Dict[int, int]] = None   # expert targets: global expert id → local slot
    experts_stacked_in_source: bool = False    # one checkpoint tensor holds all experts [E, ...]
    fill_from: Optional[str] = None            # tied: filled from this target after loading (ZEROS: zeroed)
    shape_known: bool = True                   # False: a pass-through target seen through an index only
    # the same parameter in another layout, taken when the model's tensor has its shape and a float
    # dtype (gpt-oss experts dequantized into BF16 instead of kept as MXFP4 bytes); ABSENT: that
    # layout has no such parameter (the packed weights' scales)
    alternative: Optional[Union["TargetSpec", str]] = None
    # the engine may allocate it larger in every dimension and read only its leading block (vLLM
    # pads MXFP4 experts to its kernel's tile): the load writes that block and leaves the rest
    padded: bool = False

    def holds_padded(self, shape) -> bool:
        """Whether a tensor of ``shape`` is this target as the engine padded it (``padded``)."""
        return self.padded and len(shape) == len(self.shape) and all(h >= w for h, w in zip(shape, self.shape))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()
