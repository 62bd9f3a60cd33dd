"""Exceptions. Bad input is a ``PyloaderInputError`` (a ``ValueError``): the CLI maps it to exit code 2."""


class PyloaderError(Exception):
    """Base of pyloader's own errors."""


class PyloaderInputError(PyloaderError, ValueError):
    """Bad input: a malformed checkpoint, a shape or dtype mismatch, a missing scale, ..."""


class BackendUnavailableError(PyloaderError, RuntimeError):
    """The requested backend cannot run here (not built, no GPU, wrong device)."""
