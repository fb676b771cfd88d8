"""Process memory as the kernel counts it (``/proc/self/status``)."""

from __future__ import annotations

import threading
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


def anon_rss_bytes(pid: int | str = "self") -> int:
    """Resident anonymous memory now (RssAnon): the process's own data (weights, KV cache,
    buffers), without the file-backed pages of its shared libraries, which the kernel maps
    in as code runs (more of them when they happen to be in the page cache), shares with
    other processes and can drop at any time."""
    return _status_kb("RssAnon", pid) * 1024


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def _libc():  # -> ctypes.CDLL | None
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def return_freed_memory_promptly(threshold_bytes: int = 1024 * 1024) -> bool:
    """Make glibc give large freed blocks back to the kernel at once.

    By default glibc raises its mmap threshold each time a large block is freed, after
    which blocks of that size come from the heap and stay resident after ``free``: the
    tensors a device frees after measuring itself, or a streamed layer it drops, would
    then count against its memory budget. A fixed threshold turns that off. Returns
    whether it could be set (not glibc: nothing happens).
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes))


def trim_heap() -> None:
    """Give free heap memory back to the kernel (glibc ``malloc_trim``), if possible."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


class AnonPeakSampler:
    """The highest resident anonymous memory (RssAnon) of some processes, read from
    /proc/PID/status every ``period_s`` by a thread, until :meth:`stop`. The kernel keeps
    a peak only of the whole RSS (VmHWM), which also counts the pages of shared libraries
    mapped in as code runs; this is the process's own data."""

    def __init__(self, pids: list[int], period_s: float = 0.002) -> None:
        self.peaks = dict.fromkeys(pids, 0)
        self._period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self._period_s):  # a sampling period, not a synchronisation
            for pid in self.peaks:
                try:
                    self.peaks[pid] = max(self.peaks[pid], anon_rss_bytes(pid))
                except OSError:
                    pass  # the process has ended

    def stop(self) -> dict[int, int]:
        self._stop.set()
        self._thread.join()
        return self.peaks
