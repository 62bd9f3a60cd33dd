import os
import sys

import pytest
import torch

# test modules live in folders that mirror the package; their shared helpers live here
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Triton kernels run under the interpreter on machines without a GPU; the switch must be set
# before any @triton.jit function is created.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
