"""Which checkpoint tensor scales which weight, and the block grid a scale must have: one rule for
``load``, ``inspect`` and ``convert``.

A weight ``….weight`` is scaled by the tensor that replaces its final ``weight`` with one of
:data:`SCALE_SUFFIXES` (``….weight_scale_inv`` in DeepSeek and Qwen FP8 releases,
``….weight_scale`` in compressed-tensors and ModelOpt ones, ``….scale_inv``). A block scale of a
``[rows, cols]`` weight with the declared ``bm x bn`` blocks (``weight_block_size``, 128x128 by
default) is the grid ``[ceil(rows / bm), ceil(cols / bn)]``; one value is a per-tensor scale and
``[rows]`` or ``[rows, 1]`` a per-channel one. Any other shape contradicts the declared format and
is an error: a grid that some other block shape would fit is never taken for it.
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




def weight_of_scale(name: str) -> Optional[str]:
    """The weight a tensor named like a scale belongs to (None: not a scale's name)."""
    for suffix in SCALE_SUFFIXES:
        if name.endswith("." + suffix):
            return name[: -len(suffix)] + "weight"
    return None


def scale_block(shape: Tuple[int, ...], scale_shape: Tuple[int, ...], declared: Tuple[int, int],
                what: str) -> Tuple[int, int]:
    """The block shape (bm, bn) that ``scale_shape`` gives a weight of ``shape`` (1-D or 2-D; a 1-D
    weight is one row): the declared block when the scale is its grid, the whole tensor for one
    value, (1, cols) for one value a row. Anything else raises, naming ``what``."""
    rows, cols = (shape[0], math.prod(shape[1:])) if len(shape) >= 2 else (1, shape[0] if shape else 1)
    s = tuple(scale_shape)
    if math.prod(s) == 1:
        return max(1, rows), max(1, cols)
    if s == block_grid(tuple(shape), declared):
        return tuple(declared)
    if rows > 1 and s in ((rows,), (rows, 1)):
        return 1, max(1, cols)
    want = list(block_grid(tuple(shape), declared))
    raise PyloaderInputError(
        f"{what}: scale shape {list(s)} does not fit weight {list(shape)} with the declared {declared[0]}x{declared[1]} "
        f"blocks (expected {want}; a per-tensor [1] or per-channel [{rows}, 1] scale is also read)")
