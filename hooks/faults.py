"""Fail-open execution of hook bodies, and the ``CP_ENGINE_FAULT`` test switch.

Contract:
- ``CP_ENGINE_FAULT`` is a comma-separated list of hook names; ``name`` makes that hook
  raise ``InjectedFault`` on entry, ``name:hang`` makes it sleep (5 s, or
  ``name:hang=SECONDS``, capped at 60 s) before running. Test use only.
- ``guarded(hook)`` is a context manager that swallows any exception from its body,
  logs it once per hook name, and counts it in ``metrics`` as
  ``hook_failures{hook=...}``; ``call_guarded(hook, fn, *a, default=..., **kw)`` returns
  ``default`` instead of raising. Neither ever raises (``BaseException`` such as
  ``KeyboardInterrupt`` is not swallowed).
- ``check_fault(hook)`` applies the switch; call it first thing inside a guarded body.
  A hang is logged once per hook (tests read the log to see the fault was reached).
- stall breaker: ``stall_watched(hook)`` (a decorator) times each call of a hook
  body; one call longer than ``CP_ENGINE_HOOK_STALL_S`` (0 = never) switches that
  hook off for the rest of the process, logged once and counted in ``hook_stalls``.
  A Python thread cannot be interrupted, so the stalled call itself is paid once;
  afterwards ``check_fault(hook)`` raises ``HookSwitchedOff`` at entry, which every
  hook already handles by leaving the request as the engine would have it; those
  calls count in ``hook_calls_skipped``, not in ``hook_failures``.
- fault points (``docs/reliability.md``): ``chat_rewrite``, ``completion_rewrite``
  (API-server prompt rewrite), ``index`` (every call into the API server's pipeline),
  ``channel`` (the API-server receiver, per message), ``vllm_queue`` (EngineCore's
  waiting-queue key), ``vllm_eviction`` (EngineCore's eviction capture),
  ``blend_load`` (the blend worker's load, after the stored KV is written and before
  the recompute),
  ``bootstrap.<engine>``, ``install.<component>``; SGLang's ``sglang_*`` names.
"""
from __future__ import annotations

import functools
import logging
import os
import threading
import time
import traceback
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from . import metrics

__all__ = ["InjectedFault", "HookSwitchedOff", "check_fault", "injecting", "guarded", "call_guarded", "log_once",
           "stall_watched", "switched_off", "reset_breaker"]

logger = logging.getLogger("cp_engine.hooks")

_DEFAULT_HANG_S = 5.0
_MAX_HANG_S = 60.0


class InjectedFault(RuntimeError):
    """Raised by a hook named in ``CP_ENGINE_FAULT``."""


class HookSwitchedOff(RuntimeError):
    """Raised at the entry of a hook that the stall breaker switched off."""


# Hooks switched off by the stall breaker (process lifetime; a set read without a
# lock on the hot path: membership of a str is atomic under the GIL).
_switched_off: set[str] = set()
_stall_budget: float | None = None


def _budget() -> float:
    global _stall_budget
    if _stall_budget is None:
        try:
            from .runtime import config

            _stall_budget = float(config().hook_stall_s)
        except Exception:  # no config: keep the documented default
            _stall_budget = 2.0
    return _stall_budget


def reset_breaker() -> None:
    """Switch every hook back on and re-read the budget (tests, ``runtime.reset_for_tests``)."""
    global _stall_budget
    _switched_off.clear()
    _stall_budget = None


def switched_off(hook: str) -> bool:
    """Whether the stall breaker switched ``hook`` off in this process."""
    return hook in _switched_off


def _trip(hook: str, elapsed: float, budget: float) -> None:
    if hook in _switched_off:
        return
    _switched_off.add(hook)
    metrics.inc("hook_stalls", 1, hook=hook)
    log_once(f"stall:{hook}", "cp_engine hook %r stalled %.2f s (budget %.2f s, CP_ENGINE_HOOK_STALL_S): "
             "switched off until restart; the engine now runs that step unmodified", hook, elapsed, budget)


def stall_watched(hook: str, cpu: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: time each call of a hook body; trip the breaker on a stall.

    Cost per call: two ``time.monotonic()`` reads. With ``cpu`` (per-request hooks, not
    per-block ones) the calling thread's CPU time in the body is also counted:
    ``hook_cpu_seconds{hook}`` and ``hook_calls{hook}`` (two more clock reads and two
    counter updates). The wrapped function's own result and exceptions pass through
    unchanged.
    """
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.monotonic()
            cpu_start = time.thread_time_ns() if cpu else 0
            try:
                return fn(*args, **kwargs)
            finally:
                if cpu:
                    count_cpu(hook, time.thread_time_ns() - cpu_start, calls=1)
                elapsed = time.monotonic() - start
                budget = _budget()
                if budget > 0 and elapsed > budget:
                    _trip(hook, elapsed, budget)
        return timed
    return wrap


def count_cpu(hook: str, cpu_ns: int, calls: int = 0) -> None:
    """Add ``cpu_ns`` of thread CPU time (and ``calls``) to ``hook``'s counters."""
    metrics.inc("hook_cpu_seconds", cpu_ns / 1e9, hook=hook)
    if calls:
        metrics.inc("hook_calls", calls, hook=hook)


_cache_lock = threading.Lock()
_cache: tuple[str, dict[str, float | None]] | None = None


# Every hook call on every request reads the switch. ``os.environ`` encodes the key and
# decodes the value on each read; its backing dict (CPython, every release) is read as
# is, and updated by every write to ``os.environ`` (``monkeypatch.setenv`` included).
_ENV_DATA = getattr(os.environ, "_data", None)
try:
    _FAULT_KEY: Any = os.environ.encodekey("CP_ENGINE_FAULT")  # type: ignore[attr-defined]
except Exception:
    _ENV_DATA = None


def _fault_switch() -> Any:
    """The raw CP_ENGINE_FAULT value (str or, from the backing dict, bytes); empty if unset."""
    if _ENV_DATA is not None:
        return _ENV_DATA.get(_FAULT_KEY, b"")
    return os.environ.get("CP_ENGINE_FAULT", "")


def _faults() -> dict[str, float | None]:
    """Parsed switch: hook name -> None (raise) or hang seconds. Re-read when env changes."""
    global _cache
    raw = _fault_switch()
    cached = _cache  # one read of the global: a tuple is swapped in whole, never edited
    if cached is not None and cached[0] == raw:
        return cached[1]  # every hook call on every request: no lock on this path
    with _cache_lock:
        if _cache is not None and _cache[0] == raw:
            return _cache[1]
        parsed: dict[str, float | None] = {}
        text = os.fsdecode(raw) if isinstance(raw, bytes) else raw  # as os.environ decodes it
        for item in text.split(","):
            item = item.strip()
            if not item:
                continue
            name, _, mode = item.partition(":")
            if mode.startswith("hang"):
                _, _, secs = mode.partition("=")
                try:
                    hang = float(secs) if secs else _DEFAULT_HANG_S
                except ValueError:
                    hang = _DEFAULT_HANG_S
                parsed[name.strip()] = min(max(hang, 0.0), _MAX_HANG_S)
            else:
                parsed[name.strip()] = None
        _cache = (raw, parsed)
        return parsed


def injecting(hook: str) -> bool:
    """Whether CP_ENGINE_FAULT names ``hook`` (a hook then takes its full path on every
    call, so the fault meets each one)."""
    return hook in _faults()


def check_fault(hook: str) -> None:
    if hook in _switched_off:
        raise HookSwitchedOff(hook)
    faults = _faults()
    if hook not in faults:
        return
    hang = faults[hook]
    if hang is None:
        raise InjectedFault(f"CP_ENGINE_FAULT injected a failure into hook {hook!r}")
    log_once(f"hang:{hook}", "cp_engine: CP_ENGINE_FAULT hangs hook %r for %.1f s per call", hook, hang)
    time.sleep(hang)


_logged: set[str] = set()
_logged_lock = threading.Lock()


def log_once(key: str, msg: str, *args: Any, exc_info: bool = False, level: int = logging.WARNING) -> None:
    """Log ``msg`` the first time ``key`` is seen in this process, never again."""
    with _logged_lock:
        if key in _logged:
            return
        _logged.add(key)
    try:
        logger.log(level, msg, *args, exc_info=exc_info)
    except Exception:  # logging must not break the hook path either
        pass


def _where(exc: BaseException) -> str:
    """Innermost frames of ``exc`` as ``file:line in function``; never its message."""
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    return "; ".join(f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}" for f in frames) or "?"


def record_failure(hook: str, exc: BaseException) -> None:
    """Count a failed-open hook call and log it once per hook.

    The log names the exception type and where it was raised, not its message: a
    message may quote the request (a validation error echoes its input), and request
    content must never reach the logs at the default level. DEBUG logs the full
    exception, every time. (``InjectedFault`` messages, ours and content-free, are kept.)
    """
    if isinstance(exc, HookSwitchedOff):  # the trip was logged; count the skip only
        metrics.inc("hook_calls_skipped", 1, hook=hook)
        return
    metrics.inc("hook_failures", 1, hook=hook)
    # Our own test switch's message names only the hook: safe, and tests look for it.
    what = f"{type(exc).__name__}: {exc}" if isinstance(exc, InjectedFault) else type(exc).__name__
    log_once(f"failure:{hook}", "cp_engine hook %r failed open (request unaffected): %s at %s; "
             "further failures of this hook are only counted", hook, what, _where(exc))
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("cp_engine hook %r failure", hook, exc_info=exc)


@contextmanager
def guarded(hook: str) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        record_failure(hook, exc)


def call_guarded(hook: str, fn: Callable[..., Any], *args: Any, default: Any = None, **kwargs: Any) -> Any:
    try:
        check_fault(hook)
        return fn(*args, **kwargs)
    except Exception as exc:
        record_failure(hook, exc)
        return default
