"""Which part of a model each rank owns: tensor-parallel row ranges, expert-parallel expert maps,
pipeline-parallel layer ranges, and the ``Parallel`` record of one rank's three coordinates."""

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from .errors import PyloaderInputError

Range = Tuple[int, int]


def tp_range(size: int, rank: int, world: int) -> Range:
    """Rows (or columns) ``[start, stop)`` that tensor-parallel ``rank`` of ``world`` owns of ``size``.

    Balanced split: the first ``size % world`` ranks take one extra row, so the sizes differ by at
    most one and every row is owned exactly once (``size=10, world=4`` → 3, 3, 2, 2). When
    ``world`` divides ``size`` this is the even split every engine uses.
    """
    if world <= 0 or not 0 <= rank < world:
        raise PyloaderInputError(f"tensor-parallel rank {rank} is not in [0, {world})")
    if size < 0:
        raise PyloaderInputError(f"cannot split a negative size {size}")
    base, extra = divmod(size, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def ep_expert_map(num_experts: int, ep_rank: int, ep_size: int) -> Dict[int, int]:
    """Global expert id → local slot for a contiguous expert-parallel split (balanced like :func:`tp_range`)."""
    start, stop = tp_range(num_experts, ep_rank, ep_size)
    return {g: g - start for g in range(start, stop)}


@dataclass(frozen=True)
class Parallel:
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    layers: Optional[Range] = None  # explicit [start, stop) layer range instead of the PP partition

    def __post_init__(self):
        for what, r, n in (("tp", self.tp_rank, self.tp_size), ("pp", self.pp_rank, self.pp_size),
                           ("ep", self.ep_rank, self.ep_size)):
            if n < 1 or not 0 <= r < n:
                raise PyloaderInputError(f"{what} rank {r} is not in [0, {n})")


def pp_layer_range(num_layers: int, pp_rank: int, pp_size: int) -> Range:
    """vLLM's even partition: ``num_layers // pp_size`` layers a stage; the ``num_layers % pp_size``
    extra layers go one each to the stages before the last, from the second-to-last backwards
    (the first stage also holds the embeddings and the last the head)."""
    if pp_size < 1 or not 0 <= pp_rank < pp_size:
        raise PyloaderInputError(f"pp rank {pp_rank} is not in [0, {pp_size})")
    if num_layers < pp_size:
        raise PyloaderInputError(f"{num_layers} layers cannot be split over {pp_size} pipeline stages")
    sizes = [num_layers // pp_size] * pp_size
    for i in range(2, num_layers % pp_size + 2):
        sizes[-i] += 1
    start = sum(sizes[:pp_rank])
    return start, start + sizes[pp_rank]
