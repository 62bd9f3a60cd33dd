"""pyloader: fast, correct loading of large-model weights into GPU parameters.

Kernels live in ``pyloader.ops``; the backend is chosen explicitly (``backend=`` or
``PYLOADER_BACKEND``) or defaults to the fastest available, and the choice is logged on the
``pyloader`` logger (quiet unless the application configures logging). The names below are
imported on first use, so that the command line can answer Ctrl-C while torch is still loading.
"""

import importlib
import logging

from .errors import BackendUnavailableError, PyloaderError, PyloaderInputError

__version__ = "0.1.0"

logging.getLogger("pyloader").addHandler(logging.NullHandler())

_LAZY = {
    "ops": ("pyloader.ops", None),
    "refit": ("pyloader.refit", None),
    "load": ("pyloader.loading.loader", "load"),
    "from_pretrained": ("pyloader.integrations.transformers", "from_pretrained"),
    "LoadReport": ("pyloader.loading.loader", "LoadReport"),
    "ExecutorConfig": ("pyloader.loading.executor", "ExecutorConfig"),
    "BACKENDS": ("pyloader.backend", "BACKENDS"),
    "resolve_backend": ("pyloader.backend", "resolve_backend"),
}

__all__ = list(_LAZY) + ["PyloaderError", "PyloaderInputError", "BackendUnavailableError"]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'pyloader' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    value = value if attr is None else getattr(value, attr)
    globals()[name] = value  # once: later lookups find it without this hook
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
