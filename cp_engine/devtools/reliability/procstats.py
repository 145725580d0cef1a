"""Open file descriptors, threads and resident memory of a process tree.

``tree_stats(pid)`` sums over ``pid`` and all its descendants (vLLM's API server,
EngineCore and workers): ``{"procs", "fds", "threads", "rss_mb"}``. Uses psutil when
importable, else ``/proc`` (Linux). Processes that exit mid-sample are skipped.
"""
from __future__ import annotations

import os

__all__ = ["tree_stats"]


def tree_stats(pid: int) -> dict:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil ships with vLLM
        return _proc_stats(pid)
    out = {"procs": 0, "fds": 0, "threads": 0, "rss_mb": 0.0}
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.Error:
        return out
    for p in procs:
        try:
            with p.oneshot():
                fds, threads, rss = p.num_fds(), p.num_threads(), p.memory_info().rss
        except psutil.Error:
            continue
        out["procs"] += 1
        out["fds"] += fds
        out["threads"] += threads
        out["rss_mb"] += rss / 2**20
    out["rss_mb"] = round(out["rss_mb"], 1)
    return out


def _children(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                ppid = int(f.read().decode("ascii", "replace").rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(name))
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(kids.get(p, []))
    return out


def _proc_stats(pid: int) -> dict:
    out = {"procs": 0, "fds": 0, "threads": 0, "rss_mb": 0.0}
    for p in _children(pid):
        try:
            fds = len(os.listdir(f"/proc/{p}/fd"))
            with open(f"/proc/{p}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        out["procs"] += 1
        out["fds"] += fds
        out["threads"] += int(status.get("Threads", "0").strip() or 0)
        out["rss_mb"] += int(status.get("VmRSS", "0 kB").split()[0]) / 1024
    out["rss_mb"] = round(out["rss_mb"], 1)
    return out
