"""pyloader: fast, correct loading of large-model weights into GPU parameters.

Kernels live in ``pyloader.ops``; the backend is chosen explicitly (``backend=`` or
``PYLOADER_BACKEND``) or defaults to the fastest available, and the choice is logged on the
``pyloader`` logger (quiet unless the application configures logging).
"""

import logging

from . import ops
from .backend import BACKENDS, resolve_backend
from .errors import BackendUnavailableError, PyloaderError, PyloaderInputError
from .loading.executor import ExecutorConfig
from .loading.loader import LoadReport, load

__version__ = "0.1.0"

logging.getLogger("pyloader").addHandler(logging.NullHandler())

__all__ = ["ops", "load", "LoadReport", "ExecutorConfig", "BACKENDS", "resolve_backend", "PyloaderError", "PyloaderInputError", "BackendUnavailableError"]
