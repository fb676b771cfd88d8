"""Process memory as the kernel counts it (``/proc/self/status``)."""

from __future__ import annotations

from pathlib import Path


def _status_kb(field: str, pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size now (VmRSS)."""
    return _status_kb("VmRSS", pid) * 1024


def peak_rss_bytes(pid: int | str = "self") -> int:
    """Highest resident set size so far (VmHWM)."""
    return _status_kb("VmHWM", pid) * 1024
