"""Stand-in for the CUDA extension when pyloader was installed without it.

A built extension (``_C.cpython-*.so`` beside this file) takes precedence on import. This
module keeps ``import pyloader._C`` working on pure-Python installs, and every kernel call
raises a clear error instead of failing somewhere deeper.
"""

cuda_built = False
job_fields = 19
max_jobs_per_launch = 224
quant_fields = 13
max_quant_jobs_per_launch = 320

_WHY = (
    "pyloader was installed without its CUDA extension (no nvcc at build time, or "
    "PYLOADER_BUILD_CUDA=0); reinstall with nvcc on PATH or use backend='triton' or 'torch'"
)


def device_count() -> int:
    return 0


def multi_tensor_transform(packed_jobs, num_jobs, stream):
    raise RuntimeError(_WHY)


def multi_tensor_quantize(packed_jobs, num_jobs, stream):
    raise RuntimeError(_WHY)


class HostReader:
    def __init__(self, *args, **kwargs):
        raise RuntimeError(_WHY)
