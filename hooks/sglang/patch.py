"""Install / remove the SGLang adapter (``bootstrap`` calls ``patch()`` once per process).

``patch()`` runs right after ``import sglang`` (``.pth`` post-import hook) or from the
``sglang.srt.plugins`` entry point, in the HTTP server and in every spawned scheduler
process. It checks the version range, then registers post-import hooks so each target
module is wrapped as soon as it is imported (or at once if it already is), whatever
the import order. Every wrapped symbol is in the patch ledger (``PATCHES``).
``unpatch()`` restores every original; later imports are then left alone.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
from dataclasses import dataclass
from typing import Callable

from .. import faults, ledger
from ..wrapping import is_wrapped, unwrap_method, wrap_method
from . import chat, evictions, ordering

__all__ = ["patch", "unpatch", "installed", "engine_version", "PATCHES", "TARGETS", "MIN_VERSION", "MAX_VERSION"]

logger = logging.getLogger("cp_engine.hooks")

MIN_VERSION = "0.5.17"
MAX_VERSION = "0.5.23"


@dataclass(frozen=True)
class Target:
    module: str
    owner: str  # class name inside module
    attr: str
    wrapper: Callable
    feature: str  # config attribute gating it ("" = always)
    why: str
    optional: bool = False  # absent in part of the supported range


TARGETS: tuple[Target, ...] = (
    Target("sglang.srt.managers.schedule_policy", "SchedulePolicy", "calc_priority",
           ordering.around_calc_priority, "schedule|eviction_sync",
           "cache-aware depth-first waiting order with aging, no 128-request cut-off; "
           "also where requests are registered for eviction tracking"),
    Target("sglang.srt.mem_cache.radix_cache", "RadixCache", "__init__",
           evictions.around_cache_init, "eviction_sync",
           "switch the KV-event recorder on so evictions are visible without --kv-events-config"),
    Target("sglang.srt.mem_cache.base_prefix_cache", "BasePrefixCache", "take_events",
           evictions.after_take_events, "eviction_sync",
           "see every KV-event batch (BlockStored/BlockRemoved/AllBlocksCleared), unchanged; "
           "RadixCache inherits it"),
    Target("sglang.srt.mem_cache.unified_radix_cache", "UnifiedRadixCache", "__init__",
           evictions.around_cache_init, "eviction_sync",
           "same as RadixCache: default cache since 0.5.19, Python or Rust tree core", True),
    Target("sglang.srt.mem_cache.unified_radix_cache", "UnifiedRadixCache", "take_events",
           evictions.after_take_events, "eviction_sync",
           "same as RadixCache.take_events", True),
    Target("sglang.srt.managers.scheduler_components.kv_events_publisher",
           "SchedulerKvEventsPublisher", "publish_kv_events", evictions.around_publish,
           "eviction_sync", "drain the recorder when the user's publisher is off", True),
    Target("sglang.srt.entrypoints.openai.serving_chat", "OpenAIServingChat", "__init__",
           chat.after_init, "", "start the eviction receiver and /metrics export in the API server"),
    Target("sglang.srt.entrypoints.openai.serving_base", "OpenAIServingBase", "handle_request",
           chat.around_handle_request, "reorder|dedup|annotate",
           "chat requests only: read context_blocks / conversation_id from the raw body (the "
           "request model drops them); 400 on bad input. Defined on the base class only."),
    Target("sglang.srt.entrypoints.openai.serving_chat", "OpenAIServingChat",
           "_convert_to_internal_request", chat.around_convert, "reorder|dedup|annotate",
           "render the blocks into the last user turn and attach scheduler hints (thread-safe)"),
)

PATCHES = tuple(
    ledger.register(ledger.Patch(
        engine="sglang",
        target=f"{t.module}.{t.owner}.{t.attr}",
        why=t.why,
        how="wrapt FunctionWrapper on the class attribute, installed by a post-import hook; undone by unpatch()",
        min_version=MIN_VERSION,
        max_version=MAX_VERSION,
        upstream=f"python/sglang/srt/{t.module.split('sglang.srt.', 1)[1].replace('.', '/')}.py",
        remove_when="SGLang offers this as a plugin interface (HookRegistry cannot be undone or ordered)",
        feature=t.feature,
    ))
    for t in TARGETS
)

_lock = threading.RLock()
_active = False
_registered: set[str] = set()
_missing: list[str] = []
_wrapped: list[tuple[type, str]] = []  # what unpatch() restores, in wrap order


def engine_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("sglang")
    except Exception:
        mod = sys.modules.get("sglang")
        return getattr(mod, "__version__", None)


def _wanted(feature: str) -> bool:
    if not feature:
        return True
    from ..runtime import config

    cfg = config()
    return any(getattr(cfg, name) for name in feature.split("|"))


def _apply(module) -> None:
    """Post-import hook: wrap every target of ``module`` (idempotent, fail open)."""
    with _lock:
        if not _active:
            return
        for t in TARGETS:
            if t.module != module.__name__ or not _wanted(t.feature):
                continue
            try:
                owner = getattr(module, t.owner)
                if wrap_method(owner, t.attr, t.wrapper):
                    _wrapped.append((owner, t.attr))
            except Exception as exc:
                if t.optional and isinstance(exc, AttributeError):
                    _missing.append(f"{t.module}.{t.owner}.{t.attr}")
                    continue
                faults.record_failure(f"sglang_patch:{t.owner}.{t.attr}", exc)


def patch() -> bool:
    """Enable the adapter in this process; False when SGLang's version is unsupported."""
    global _active
    version = engine_version() or "unknown"
    if not ledger.supported(PATCHES[0], version):
        faults.log_once("sglang:version", "cp_engine: SGLang %s is outside the supported range "
                        "%s-%s; leaving it unpatched", version, MIN_VERSION, MAX_VERSION)
        return False
    from wrapt import register_post_import_hook

    from .. import runtime

    runtime.instance_id()  # fix the channel id before the launcher spawns the scheduler
    with _lock:
        _active = True
        if ordering.observers.count(evictions.observe) == 0:
            ordering.observers.append(evictions.observe)
        for name in sorted({t.module for t in TARGETS}):
            if name in _registered:
                if name in sys.modules:
                    _apply(sys.modules[name])
                continue
            _registered.add(name)
            register_post_import_hook(_apply, name)
    cfg = runtime.config()
    faults.log_once("sglang:startup", "cp_engine active in SGLang %s (pid %d): features %s",
                    version, os.getpid(), ",".join(cfg.active_features()) or "none",
                    level=logging.INFO)
    return True


def unpatch() -> int:
    """Restore every wrapped SGLang symbol; returns how many were restored."""
    global _active
    with _lock:
        _active = False
        while evictions.observe in ordering.observers:
            ordering.observers.remove(evictions.observe)
        restored = sum(unwrap_method(owner, attr) for owner, attr in reversed(_wrapped))
        _wrapped.clear()
        return restored


def installed() -> list[str]:
    """Dotted names of the SGLang symbols wrapped right now."""
    with _lock:
        return [f"{o.__module__}.{o.__qualname__}.{a}" for o, a in _wrapped if is_wrapped(o, a)]


def missing_optional() -> list[str]:
    """Optional targets absent from this SGLang version (for status output)."""
    return list(_missing)


def import_all() -> None:
    """Import every target module (drift tests): raises when one moved."""
    for name in sorted({t.module for t in TARGETS}):
        importlib.import_module(name)
