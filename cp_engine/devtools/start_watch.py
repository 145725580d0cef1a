"""Wait for a starting server by its progress (its log advancing), not by a fixed clock.

A server start on a loaded 2-core machine has taken from 20 s to over 500 s; what tells
a slow start from a hung one is whether the server keeps writing its log. The wait
ends when ``ready()`` is true, and fails when the process exits, when the log has not
grown for ``stall_s`` seconds, or after ``cap_s`` seconds in all. While it waits it
reports each startup phase the log shows and, every ``heartbeat_s`` seconds, the last
log line.

Limits from the environment (``StartLimits.from_env``):
``CP_VLLM_START_STALL_S`` (default 180), ``CP_VLLM_START_CAP_S`` (default 1800; the
older ``CP_TEST_START_TIMEOUT_S`` is read as the cap when the new name is unset).
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Callable

# Log lines that mark a startup phase of vLLM's API server (reported once each).
PHASES = (
    (re.compile(r"\[cp_engine\] cp_engine \S+ active"), "cp_engine plugin active"),
    (re.compile(r"non-default args|vLLM API server version"), "parsing arguments"),
    (re.compile(r"Resolved architecture|Using max model len"), "model config resolved"),
    (re.compile(r"Initializing a V1 LLM engine"), "engine process starting"),
    (re.compile(r"Starting to load model|Loading weights(?! took)"), "loading weights"),
    (re.compile(r"Loading weights took|Model loading took"), "weights loaded"),
    (re.compile(r"[CG]PU KV cache size"), "KV cache allocated"),
    (re.compile(r"init engine .* took"), "engine initialised"),
    (re.compile(r"Starting vLLM (API )?server|Available routes"), "HTTP server starting"),
    (re.compile(r"Application startup complete"), "HTTP server up"),
)


@dataclass(frozen=True)
class StartLimits:
    stall_s: float = 180.0
    cap_s: float = 1800.0
    heartbeat_s: float = 30.0
    poll_s: float = 1.0

    @classmethod
    def from_env(cls, cap_s: float | None = None) -> "StartLimits":
        """Limits from the environment; an explicit ``cap_s`` wins over it."""
        env = os.environ
        if cap_s is None:
            raw = env.get("CP_VLLM_START_CAP_S") or env.get("CP_TEST_START_TIMEOUT_S")
            cap_s = float(raw) if raw else cls.cap_s
        return cls(stall_s=float(env.get("CP_VLLM_START_STALL_S") or cls.stall_s), cap_s=float(cap_s))


class StartFailed(RuntimeError):
    """The server exited, stalled or ran past the cap; ``reason`` says which."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _last_line(text: str) -> str:
    for line in reversed(text.splitlines()):
        if line.strip():
            line = line.strip()
            return line if len(line) <= 160 else line[:157] + "..."
    return "(no output yet)"


def wait_for_start(ready: Callable[[], bool], exit_code: Callable[[], int | None],
                   read_log: Callable[[], str], limits: StartLimits,
                   report: Callable[[str], None] = lambda line: None,
                   clock: Callable[[], float] = time.monotonic,
                   sleep: Callable[[float], None] = time.sleep) -> float:
    """Poll until ``ready()``; return the seconds it took.

    ``exit_code()`` is None while the process runs; ``read_log()`` returns the whole log
    so far (its growth is the progress signal). Raises ``StartFailed`` with reason
    ``"exited"``, ``"stalled"`` or ``"cap"``.
    """
    t0 = clock()
    seen_len, last_growth, last_beat = 0, t0, t0
    phases_left = list(PHASES)
    text = ""
    while True:
        if ready():
            return clock() - t0
        now = clock()
        text = read_log()
        if len(text) != seen_len:  # a shorter log (rotated, rewritten) counts as new output too
            new = text[seen_len:] if len(text) > seen_len else text
            seen_len, last_growth = len(text), now
            for pat, label in list(phases_left):
                if pat.search(new):
                    phases_left.remove((pat, label))
                    report(f"{now - t0:5.0f} s  {label}")
        code = exit_code()
        if code is not None:
            raise StartFailed("exited", f"server exited with code {code} after {now - t0:.0f} s")
        if now - last_growth > limits.stall_s:
            raise StartFailed("stalled", f"server log silent for {now - last_growth:.0f} s "
                              f"(stall window {limits.stall_s:.0f} s, CP_VLLM_START_STALL_S)")
        if now - t0 > limits.cap_s:
            raise StartFailed("cap", f"server not ready after {now - t0:.0f} s "
                              f"(cap {limits.cap_s:.0f} s, CP_VLLM_START_CAP_S)")
        if now - last_beat >= limits.heartbeat_s:
            last_beat = now
            report(f"{now - t0:5.0f} s  still starting; last log line: {_last_line(text)}")
        sleep(limits.poll_s)
