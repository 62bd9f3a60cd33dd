"""Peak resident memory over a stretch of work: reset, then the kernel's high-water mark."""

import subprocess
import sys

import pytest

CODE = """
import mmap
from pyloader.rss import peak_rss, reset_peak_rss
if not reset_peak_rss():
    print("refused"); raise SystemExit
base = peak_rss()
m = mmap.mmap(-1, 64 << 20)
m.write(b"x" * (64 << 20))  # 64 MiB touched
grown = peak_rss()
m.close()
assert reset_peak_rss()
print(grown - base, grown - peak_rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_the_peak_follows_an_allocation_and_resets():
    """In a fresh process (what this one held before does not blur it): 64 MiB touched raise the
    mark by as much, and a reset after they are unmapped starts it again from what is resident."""
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True).stdout.split()
    if out == ["refused"]:
        pytest.skip("this kernel refuses /proc/self/clear_refs")
    rise, drop = map(int, out)
    assert rise >= 60 << 20 and drop >= 32 << 20
