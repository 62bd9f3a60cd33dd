"""Backend choice: ``cuda`` (csrc, the fast path), ``triton``, ``torch`` (reference; the CPU path).

Chosen explicitly with ``backend=`` or ``PYLOADER_BACKEND``; otherwise the fastest available for
the tensors' device, logged once per (op, device, backend). A backend that was chosen and then
fails raises: there is no silent fallback to a slower path.
"""

import functools
import logging
import os
from typing import Optional

import torch

from .errors import BackendUnavailableError

logger = logging.getLogger("pyloader")

BACKENDS = ("cuda", "triton", "torch")
_logged = set()


@functools.lru_cache(maxsize=None)
def cuda_extension_status() -> Optional[str]:
    """None when the CUDA extension is built and sees a device, else the reason it cannot run."""
    from . import _C

    if not getattr(_C, "cuda_built", False):
        return _C._WHY if hasattr(_C, "_WHY") else "the CUDA extension was not built"
    if _C.device_count() == 0:
        return "the CUDA extension is built but no CUDA device is visible"
    return None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_status() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install triton)"
    return None


def _unavailable(backend: str, device: torch.device) -> Optional[str]:
    if backend == "torch":
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' needs CUDA tensors, got {device.type} tensors"
        return cuda_extension_status()
    if backend == "triton":
        why = triton_status()
        if why:
            return why
        if device.type != "cuda" and not triton_interpreting():
            return f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device.type}"
        return None
    return f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}"


def resolve_backend(requested: Optional[str], device: torch.device, op: str) -> str:
    """The backend that runs ``op`` on ``device``; raises BackendUnavailableError for an impossible choice."""
    source = "argument"
    if requested is None:
        requested = os.environ.get("PYLOADER_BACKEND") or None
        source = "PYLOADER_BACKEND"
    if requested is not None:
        requested = requested.lower()
        why = _unavailable(requested, device)
        if why:
            raise BackendUnavailableError(f"{op}: {why} (backend chosen by {source})")
        choice, how = requested, f"chosen by {source}"
    else:
        if device.type == "cuda":
            order = ("cuda", "triton", "torch")
        else:
            order = ("torch",)
        choice = next(b for b in order if _unavailable(b, device) is None)
        how = "default: fastest available"
    key = (op, device.type, choice)
    if key not in _logged:
        _logged.add(key)
        logger.info("pyloader: %s on %s uses backend %r (%s)", op, device.type, choice, how)
    return choice
