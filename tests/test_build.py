"""The package imports everywhere; the extension is what the build promised."""

import os

import pytest
import torch


def test_import_pyloader_and_extension():
    import pyloader
    import pyloader._C as C

    assert pyloader.__version__
    assert isinstance(C.cuda_built, bool)
    assert C.device_count() >= 0
    from pyloader.ops.jobs import JOB_FIELDS

    assert C.job_fields == JOB_FIELDS == 19  # the packed table layout the Python side writes


@pytest.mark.skipif(os.environ.get("PYLOADER_EXPECT_CUDA_BUILD") != "1", reason="only where the build must include CUDA")
def test_cuda_extension_was_built():
    import pyloader._C as C

    assert C.cuda_built, "nvcc was present but the extension is the pure-Python stand-in"


def test_default_backend_on_cpu_is_torch_and_logged(caplog):
    from pyloader.backend import _logged, resolve_backend

    _logged.clear()
    with caplog.at_level("INFO", logger="pyloader"):
        assert resolve_backend(None, torch.device("cpu"), "test_op") == "torch"
    assert "uses backend 'torch'" in caplog.text


def test_env_backend_and_unknown_backend(monkeypatch):
    from pyloader.backend import resolve_backend
    from pyloader.errors import BackendUnavailableError

    monkeypatch.setenv("PYLOADER_BACKEND", "torch")
    assert resolve_backend(None, torch.device("cpu"), "op") == "torch"
    monkeypatch.setenv("PYLOADER_BACKEND", "fast")
    with pytest.raises(BackendUnavailableError, match="unknown backend 'fast'"):
        resolve_backend(None, torch.device("cpu"), "op")


def test_kernel_call_without_gpu_raises_clearly():
    import pyloader._C as C

    if C.device_count() > 0:
        pytest.skip("a GPU is present")
    from pyloader.ops.jobs import TransformJob, pack_jobs

    src = torch.zeros(4, 32, dtype=torch.bfloat16)
    table = pack_jobs([TransformJob(src, torch.empty_like(src))])
    if C.cuda_built:
        with pytest.raises(ValueError, match="null job table"):
            C.multi_tensor_transform(0, 1, 0)
        with pytest.raises(RuntimeError, match="CUDA error"):
            C.multi_tensor_transform(table.data_ptr(), 1, 0)
    else:
        with pytest.raises(RuntimeError, match="without its CUDA extension"):
            C.multi_tensor_transform(table.data_ptr(), 1, 0)
