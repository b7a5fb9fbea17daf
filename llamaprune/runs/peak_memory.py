"""The peak memory of one stretch of work, and which stretch the number covers.

On CUDA it is the allocator's peak since the stretch began. On CPU it is the resident set's high-water mark:
Linux lets a process reset it (writing 5 to /proc/self/clear_refs), so the peak is that of the stretch alone;
elsewhere it is the process's lifetime peak (``ru_maxrss``, which includes loading the model), and ``scope``
says "process" instead of the stretch's name. ``available_bytes`` is what a device can still take (whether a second
model fits beside a first).

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
MEMINFO = Path("/proc/meminfo")
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
    return _proc_bytes(STATUS, "VmHWM:")


def _proc_bytes(path: Path, key: str) -> int | None:
    """The value of the ``key`` line of a /proc file (in kB there), in bytes; None where it cannot be read."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_bytes(device: str | torch.device) -> int | None:
    """Memory that new tensors on ``device`` can still take: on CUDA the device's free memory plus what the caching
    allocator holds unused; on CPU the kernel's estimate of what can be allocated without swapping (MemAvailable,
    Linux); None where it is not known."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return _proc_bytes(MEMINFO, "MemAvailable:") if device.type == "cpu" else None
