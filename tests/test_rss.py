"""Peak resident memory over a stretch of work: reset, then the kernel's high-water mark."""

import sys

import pytest
import torch

from pyloader.rss import peak_rss, reset_peak_rss


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_the_peak_follows_an_allocation_and_resets():
    if not reset_peak_rss():
        pytest.skip("this kernel refuses /proc/self/clear_refs")
    base = peak_rss()
    big = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
    grown = peak_rss()
    assert grown - base >= 60 << 20
    del big
    assert reset_peak_rss()
    assert peak_rss() < grown - (32 << 20)  # the mark starts again from what is resident now
