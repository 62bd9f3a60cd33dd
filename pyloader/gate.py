"""The sanity gate: a dequantized tensor whose magnitude no weight has is a bug to report, not a
value to load. The transform's gate slots give, per tensor, max |value| and max |decoded code|;
a tensor above the band (the E8M0-read-as-float class of bug: ~1e40; infinity included), with
NaN values (no shipped weight has them; FP4 bytes read as FP8 make them), or all zero while its
codes are not (scales of zero) stops the load or conversion with its name (policy ``error``), or
is reported (``warn``)."""

import logging
import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .errors import PyloaderInputError

logger = logging.getLogger("pyloader")

POLICIES = ("error", "warn", "off")
DEFAULT_LIMIT = 1e4  # max |x| of a plausible weight (formats table: far above every shipped model's)


def merge_maxima(prev: Optional[Tuple[float, float]], seen: Sequence[float]) -> Tuple[float, float]:
    """Elementwise max of two (max |value|, max |code|) pairs; a NaN stays."""
    if prev is None:
        return float(seen[0]), float(seen[1])
    return tuple(a if (math.isnan(a) or a >= b) else b for a, b in zip(prev, seen))  # type: ignore[return-value]


@dataclass
class Gate:
    policy: str = "error"
    limit: float = DEFAULT_LIMIT

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise PyloaderInputError(f"gate policy must be one of {', '.join(POLICIES)}, not {self.policy!r}")
        if not self.limit > 0:
            raise PyloaderInputError(f"gate limit must be positive, got {self.limit!r}")

    @property
    def on(self) -> bool:
        return self.policy != "off"

    def problem(self, name: str, source, maxima: Tuple[float, float]) -> Optional[str]:
        out_max, code_max = maxima
        where = "its source"
        if source is not None:
            where = f"{source.file}, tensor {source.name!r}" if getattr(source, "file", None) else f"tensor {source.name!r}"
        if math.isnan(out_max):
            return (f"{name}: NaN values after dequantization (no shipped weight has them: codes of another "
                    f"format, or a NaN scale?) ({where})")
        if out_max > self.limit:  # inf included
            return (f"{name}: max |x| = {out_max:.3g} after dequantization, beyond the band of plausible weights "
                    f"(|x| <= {self.limit:g}): a misread scale format? ({where})")
        if out_max == 0 and code_max > 0:
            return (f"{name}: all zero after dequantization although its codes are not (scales of zero or "
                    f"underflowing?) ({where})")
        return None

    def check(self, name: str, source, maxima: Tuple[float, float]) -> Optional[str]:
        """Raise (policy error) or return the warning (policy warn) for an implausible tensor."""
        msg = self.problem(name, source, maxima) if self.on else None
        if msg is None:
            return None
        if self.policy == "error":
            raise PyloaderInputError(msg + "; pass --gate warn (gate='warn') to write it anyway")
        logger.warning("pyloader gate: %s", msg)
        return msg

    def enforce(self, maxima: Dict[str, Tuple[float, float]], sources: Dict[str, object]) -> List[str]:
        """Check every tensor at once: raise one error listing them all (policy error), or return the
        warnings (policy warn)."""
        problems = [m for m in (self.problem(n, sources.get(n), v) for n, v in sorted(maxima.items())) if m]
        if not problems or not self.on:
            return []
        if self.policy == "error":
            raise PyloaderInputError(f"sanity gate: {len(problems)} dequantized tensor(s) hold values no weight has "
                                     "(pass gate='warn' to load them anyway):\n  " + "\n  ".join(problems))
        for m in problems:
            logger.warning("pyloader gate: %s", m)
        return problems


class GateSlots:
    """One float32 [2] gate slot per dequantized checkpoint tensor, in one device tensor: jobs of
    a tensor split over batches share its slot; one read at the end gives every maximum."""

    def __init__(self, device: torch.device):
        self.device = device
        self.rows: Dict[str, Tuple[torch.Tensor, int]] = {}
        self.blocks: List[torch.Tensor] = []

    def reserve(self, names: Iterable[str]) -> None:
        new = [n for n in dict.fromkeys(names) if n not in self.rows]
        if not new:
            return
        block = torch.zeros(len(new), 2, dtype=torch.float32, device=self.device)
        self.blocks.append(block)
        for i, n in enumerate(new):
            self.rows[n] = (block, i)

    def slot(self, name: str) -> Optional[torch.Tensor]:
        hit = self.rows.get(name)
        return None if hit is None else hit[0][hit[1]]

    def maxima(self) -> Dict[str, Tuple[float, float]]:
        host = [b.cpu().tolist() for b in self.blocks]  # waits for the transforms that fill them
        index = {id(b): k for k, b in enumerate(self.blocks)}
        return {n: tuple(host[index[id(b)]][i]) for n, (b, i) in self.rows.items()}
