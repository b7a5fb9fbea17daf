"""The peak memory of one stretch of work, and which stretch the number covers.

On CUDA it is the allocator's peak since the stretch began. On CPU it is the resident set's high-water mark:
Linux lets a process reset it (writing 5 to /proc/self/clear_refs), so the peak is that of the stretch alone;
elsewhere it is the process's lifetime peak (``ru_maxrss``, which includes loading the model), and ``scope``
says "process" instead of the stretch's name.

    >>> peak = PeakMemory("cpu", "scoring")
    >>> data = [0] * 10**6
    >>> bytes_, scope = peak.read()
    >>> bytes_ > 0, scope in ("scoring", "process")
    (True, True)
"""

from __future__ import annotations

import resource
from pathlib import Path

import torch

CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")
PROCESS = "process"


class PeakMemory:
    """Made where the stretch begins, ``read()`` where it ends."""

    def __init__(self, device: str | torch.device, stretch: str) -> None:
        self.device, self.stretch = torch.device(device), stretch
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.reset = True
        else:
            self.reset = _reset_rss_peak()

    def read(self) -> tuple[int, str]:
        """The peak in bytes and what it covers: the stretch's name, or "process" for the lifetime peak."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device), self.stretch
        peak = _rss_peak() if self.reset else None
        if peak is not None:
            return peak, self.stretch
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, PROCESS


def _reset_rss_peak() -> bool:
    """Reset the resident set's high-water mark (VmHWM); False where the OS does not allow it."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _rss_peak() is not None


def _rss_peak() -> int | None:
    """VmHWM from /proc/self/status, in bytes."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
