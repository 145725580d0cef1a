"""Find and stop a server's whole process tree on Linux (read from ``/proc``).

A process is named by ``(pid, start_time)`` so that a pid the kernel has since handed to
an unrelated process is never signalled. Only processes the caller tracked (descendants
of the process it started) are ever signalled; where ``/proc`` is missing every
function returns nothing.
"""
from __future__ import annotations

import os
import signal
import time

Proc = tuple[int, int]  # (pid, start time in clock ticks since boot)


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, start time) of ``pid``, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2:].split()  # after "pid (comm) "
    if len(fields) < 20 or fields[0] == "Z":
        return None  # a zombie has exited already
    return int(fields[1]), int(fields[19])


def _all_pids() -> list[int]:
    try:
        return [int(n) for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        return []


def identify(pid: int) -> Proc | None:
    st = _stat(pid)
    return (pid, st[1]) if st else None


def descendants(root: int) -> set[Proc]:
    """Every live process below ``root`` (children, grandchildren, ...), not ``root``."""
    children: dict[int, list[Proc]] = {}
    for pid in _all_pids():
        st = _stat(pid)
        if st:
            children.setdefault(st[0], []).append((pid, st[1]))
    out: set[Proc] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in out:
                out.add(child)
                todo.append(child[0])
    return out


def alive(proc: Proc) -> bool:
    st = _stat(proc[0])
    return st is not None and st[1] == proc[1]


def signal_procs(procs: set[Proc], sig: int) -> None:
    for p in procs:
        if alive(p):
            try:
                os.kill(p[0], sig)
            except OSError:
                pass


def wait_gone(procs: set[Proc], timeout: float) -> set[Proc]:
    """Wait until none of ``procs`` is alive or ``timeout`` passes; return the living."""
    deadline = time.monotonic() + timeout
    left = {p for p in procs if alive(p)}
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = {p for p in left if alive(p)}
    return left


def with_environ(key: str, value: str) -> set[Proc]:
    """Live processes whose environment holds ``key=value`` (readable ones only): finds a
    server's processes by a value unique to it, even ones that left its tree."""
    needle = f"{key}={value}".encode()
    out: set[Proc] = set()
    for pid in _all_pids():
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if needle in env:
            p = identify(pid)
            if p:
                out.add(p)
    return out


def listening_pids(port: int) -> set[int]:
    """Pids holding a TCP socket that listens on ``port`` (any address)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(cols[9])
    if not inodes:
        return set()
    targets = {f"socket:[{i}]" for i in inodes}
    out: set[int] = set()
    for pid in _all_pids():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in targets:
                    out.add(pid)
                    break
            except OSError:
                continue
    return out


def stop_tree(leader: int, tracked: set[Proc], leader_unreaped: bool, grace_s: float = 30.0) -> set[Proc]:
    """SIGTERM the process group led by ``leader`` (a session leader started by the caller)
    and every tracked process, SIGKILL what is left after ``grace_s``; return the tracked
    processes still alive after that (should be none). The group is signalled only while
    ``leader_unreaped`` (the caller has not reaped it, so its pid cannot have been reused)."""
    everyone = set(tracked) | descendants(leader)
    me = identify(leader)
    if me:
        everyone.add(me)
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        if leader_unreaped:
            try:
                os.killpg(leader, sig)
            except OSError:
                pass
        signal_procs(everyone, sig)
        everyone = wait_gone(everyone, wait)
        if not everyone:
            break
    return everyone
