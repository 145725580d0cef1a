"""Entry points that switch cp_engine on inside an engine process.

Contract:
- ``activate(engine, source)`` loads the engine's adapter (a registry maps engine name
  -> ``"module:function"``; adapters may add themselves with ``register_adapter``) and
  calls its ``patch()`` once per process, whichever path comes first (the ``.pth``
  post-import hook, the ``vllm.general_plugins`` / ``sglang.srt.plugins`` entry point,
  or both); later calls return the first outcome;
- it never raises into the host: a failure is logged once, counted as
  ``hook_failures{hook="bootstrap.<engine>"}``, and leaves the engine unpatched;
- ``CP_ENGINE_DISABLE=1`` makes it a no-op.
``state(engine)`` returns "patched", "failed", "skipped" (disabled / unsupported) or None.
"""
from __future__ import annotations

import importlib
import logging
import sys
import threading
from typing import Callable

from . import faults, metrics
from .autoload import disabled

__all__ = ["activate", "vllm_plugin_entry", "sglang_plugin_entry", "register_adapter", "state", "ensure_logging"]

logger = logging.getLogger("cp_engine.hooks")

_ADAPTERS: dict[str, str] = {
    "vllm": "cp_engine.hooks.vllm.patch:patch",
    "sglang": "cp_engine.hooks.sglang.patch:patch",
}
_lock = threading.RLock()
_state: dict[str, str] = {}


def register_adapter(engine: str, target: str | Callable[[], bool]) -> None:
    """Declare (or replace) the ``patch`` callable of an engine adapter."""
    with _lock:
        _ADAPTERS[engine] = target  # type: ignore[assignment]


def state(engine: str) -> str | None:
    return _state.get(engine)


def ensure_logging() -> None:
    """Give cp_engine's logger a stderr handler when the host configured none for it.

    vLLM configures only its own ``vllm`` logger, so without this the startup line and
    failure reports (INFO/WARNING) would be dropped or printed without context.
    """
    root_cp = logging.getLogger("cp_engine")
    if root_cp.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [cp_engine] %(message)s"))
    root_cp.addHandler(handler)
    root_cp.setLevel(logging.INFO)
    root_cp.propagate = False


def _resolve(target) -> Callable[[], bool]:
    if callable(target):
        return target
    mod_name, _, fn = str(target).partition(":")
    return getattr(importlib.import_module(mod_name), fn or "patch")


def activate(engine: str, source: str = "api") -> str:
    """Patch ``engine`` once in this process; returns the resulting state (never raises)."""
    try:
        if disabled():
            return "skipped"
        with _lock:
            done = _state.get(engine)
            if done is not None:
                return done
            _state[engine] = "pending"  # re-entrant calls during patch() see this
            try:
                ensure_logging()
                faults.check_fault(f"bootstrap.{engine}")
                patched = _resolve(_ADAPTERS[engine])()
                result = "patched" if patched else "skipped"
            except Exception as exc:
                metrics.inc("hook_failures", hook=f"bootstrap.{engine}")
                faults.log_once(f"bootstrap:{engine}", "cp_engine could not patch %s (via %s); "
                                "the engine runs unmodified: %r", engine, source, exc, exc_info=True)
                result = "failed"
            _state[engine] = result
            return result
    except Exception:  # even logging failed: stay silent, never break the host
        return "failed"


def vllm_plugin_entry() -> None:
    """``vllm.general_plugins`` entry point (loaded in API server and EngineCore)."""
    activate("vllm", source="entry_point")


def sglang_plugin_entry() -> None:
    """``sglang.srt.plugins`` entry point (loaded in the scheduler process)."""
    activate("sglang", source="entry_point")
