"""This process's peak resident memory over a stretch of work (Linux): the kernel's high-water mark
(VmHWM), reset at the start through /proc/self/clear_refs. Not ``ru_maxrss``: a forked child
starts with its parent's peak, and the peak of a long-lived process is not this step's."""

from pathlib import Path
from typing import Optional

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_rss() -> bool:
    """Start a new high-water mark at the current resident size; False where the kernel refuses."""
    try:
        _CLEAR_REFS.write_text("5\n")
        return True
    except OSError:
        return False


def peak_rss() -> Optional[int]:
    """Bytes: the high-water mark of resident memory since the last reset (None off Linux)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
