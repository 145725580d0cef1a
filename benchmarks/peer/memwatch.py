"""Peak-memory of one call on Linux, stdlib only (imported by run_peer.py in the peer venv
and by benchmarks/plan_worker.py, so both planners are measured the same way).

``reset_peak()`` resets the kernel's peak-RSS counter (VmHWM, via /proc/self/clear_refs)
so that ``peak_mb()`` afterwards covers only what ran in between. Where that is not
possible, ``peak_mb()`` falls back to ru_maxrss: the process lifetime peak, an upper bound.
"""
from __future__ import annotations

import resource


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mb() -> float:
    now = _status_mb("VmRSS")
    return now if now is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_reset = False


def reset_peak() -> bool:
    global _reset
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _reset = True
    except OSError:
        _reset = False
    return _reset


def peak_mb() -> float:
    hwm = _status_mb("VmHWM") if _reset else None
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def children_peak_mb() -> float:
    """Largest peak RSS of any waited-for child process (e.g. a process pool's workers)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
