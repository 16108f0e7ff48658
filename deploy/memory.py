"""Resident memory as the kernel counts it (/proc/self/status), for `rtdp profile`'s per-backend peak.

The peak (VmHWM) is reset between backends through /proc/self/clear_refs, so each backend's figure is the most
this process held while that backend was built and run, not the most since the process started. Where the reset
is refused (not Linux, or a locked-down /proc), the figure is the peak since start, and says so.
"""

from __future__ import annotations

from pathlib import Path

_STATUS = Path("/proc/self/status")


def _status_kb(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set size to the current one
        return True
    except OSError:
        return False


class PeakMemory:
    """`with PeakMemory() as m: ...` then `m.result()`: resident MB before, the peak while inside, resident MB
    when it ended, and the peak above what was resident before."""

    def __enter__(self) -> PeakMemory:
        self.reset = _reset_peak()
        self.before_kb = _status_kb("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        self.peak_kb = _status_kb("VmHWM")
        self.after_kb = _status_kb("VmRSS")

    def result(self) -> dict | None:
        if self.before_kb is None or self.peak_kb is None:
            return None
        return {"rss_before_mb": round(self.before_kb / 1024, 1), "peak_rss_mb": round(self.peak_kb / 1024, 1),
                "rss_after_mb": round((self.after_kb or 0) / 1024, 1),
                "peak_added_mb": round(max(0, self.peak_kb - self.before_kb) / 1024, 1),
                "peak_since": "backend build" if self.reset else "process start"}
