"""Which checkpoint tensor scales which weight, and the block grid a scale must have: one rule for
``load``, ``inspect`` and ``convert``.

A weight ``….weight`` is scaled by the tensor that replaces its final ``weight`` with one of
:data:`SCALE_SUFFIXES` (``….weight_scale_inv`` in DeepSeek and Qwen FP8 releases,
``….weight_scale`` in compressed-tensors and ModelOpt ones, ``….scale_inv``). A block scale of a
``[rows, cols]`` weight with ``bm x bn`` blocks is the grid ``[ceil(rows / bm), ceil(cols / bn)]``.
"""

import math
from typing import Iterable, Optional, Tuple

from ..errors import PyloaderInputError

SCALE_SUFFIXES = ("weight_scale_inv", "weight_scale", "scale_inv")


def scale_names(weight: str) -> Tuple[str, ...]:
    """The names the scale of ``weight`` may have, in the order they are looked for."""
    base = weight[: -len("weight")] if weight.endswith("weight") else weight + "."
    return tuple(base + suffix for suffix in SCALE_SUFFIXES)


def find_scale(weight: str, names: Iterable[str]) -> Optional[str]:
    """The scale of ``weight`` among ``names`` (a set), or None."""
    return next((s for s in scale_names(weight) if s in names), None)


def block_grid(shape: Tuple[int, ...], block: Tuple[int, int]) -> Tuple[int, ...]:
    """The scale grid of a weight of ``shape`` with ``block`` = (bm, bn) blocks (leading dims kept;
    a 1-D weight is one row)."""
    if len(shape) == 1:
        return (-(-shape[0] // block[1]),)
    return tuple(shape[:-2]) + (-(-shape[-2] // block[0]), -(-shape[-1] // block[1]))


def infer_block(shape, scale_shape, preferred: Tuple[int, int], what: str) -> Tuple[int, int]:
    """The block shape whose grid is the scale's shape, the preferred (declared) one first;
    per-tensor (one scale), per-channel and 1x32 grids included. ``what`` names the weight in errors."""
    rows = shape[0] if len(shape) >= 1 else 1
    cols = math.prod(shape[1:]) if len(shape) >= 2 else (shape[0] if shape else 1)
    if len(shape) == 1:
        rows, cols = 1, shape[0]
    if math.prod(scale_shape) == 1:
        return max(1, rows), max(1, cols)
    s = tuple(scale_shape)
    if len(s) == 1:
        s = (s[0], 1) if s[0] == rows and rows != 1 else (1, s[0])
    if len(s) != 2:
        raise PyloaderInputError(f"{what}: scale of shape {list(scale_shape)} is not a 2-D block grid for weight "
                                 f"{list(shape)}")
    for bm in dict.fromkeys((preferred[0], 128, 1, 32, 64, 256, rows)):
        for bn in dict.fromkeys((preferred[1], 128, 32, 1, 64, 256, cols)):
            if bm > 0 and bn > 0 and -(-rows // bm) == s[0] and -(-cols // bn) == s[1]:
                return bm, bn
    raise PyloaderInputError(f"{what}: scale shape {list(scale_shape)} matches no block shape for weight {list(shape)} "
                             "(blockwise FP8 with 128x128, per-tensor, per-channel or 1x32 scales is supported)")
