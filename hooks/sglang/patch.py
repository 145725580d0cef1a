"""Switch cp_engine on and off in an SGLang process (``bootstrap`` calls ``patch()``).

``patch()`` runs right after ``import sglang`` (``.pth`` post-import hook) or from the
``sglang.srt.plugins`` entry point, in the HTTP server and in every spawned scheduler
process. It checks the version against the table (``hooks/sglang/table.py``), then
hands the table to ``hooks.installer``: each row is applied as soon as its module is
imported (or at once if it already is), whatever the import order; the API-server
rows are applied by ``chat_rewrite.after_init``. ``unpatch()`` undoes every applied row;
later imports are then left alone.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys

from .. import faults
from ..installer import Installer
from ..ledger import Row
from .table import TABLE, VERSIONS

__all__ = ["patch", "unpatch", "installed", "missing_optional", "engine_version", "import_all", "INSTALLER"]

logger = logging.getLogger("cp_engine.hooks")


def _wanted(row: Row) -> bool:
    if not row.features():
        return True
    from ..runtime import config

    cfg = config()
    return any(getattr(cfg, name) for name in row.features())


INSTALLER = Installer(TABLE, _wanted)


def engine_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("sglang")
    except Exception:
        mod = sys.modules.get("sglang")
        return getattr(mod, "__version__", None)


def patch() -> bool:
    """Enable the adapter in this process; False when SGLang's version is unsupported."""
    version = engine_version() or "unknown"
    if not VERSIONS.admits(version):
        faults.log_once("sglang:version", "cp_engine: SGLang %s is outside the supported range "
                        "%s; leaving it unpatched", version, VERSIONS)
        return False
    from .. import runtime
    from . import eviction, queue

    runtime.instance_id()  # fix the channel id before the launcher spawns the scheduler
    if queue.observers.count(eviction.observe) == 0:
        queue.observers.append(eviction.observe)
    INSTALLER.patch(version)
    cfg = runtime.config()
    faults.log_once("sglang:startup", "cp_engine active in SGLang %s (pid %d): features %s",
                    version, os.getpid(), ",".join(cfg.active_features()) or "none",
                    level=logging.INFO)
    return True


def unpatch() -> int:
    """Undo every applied row; returns how many were undone."""
    from . import eviction, queue

    n = INSTALLER.unpatch()
    while eviction.observe in queue.observers:
        queue.observers.remove(eviction.observe)
    return n


def installed() -> list[str]:
    """Names of the table rows applied right now."""
    return list(INSTALLER.status()["installed"])


def missing_optional() -> list[str]:
    """Optional targets absent from this SGLang version (for status output)."""
    skipped = INSTALLER.status()["skipped"]
    return [TABLE.row(n).target for n, why in skipped.items() if why == "absent in this version"]


def import_all() -> None:
    """Import every target module (drift tests): raises when one moved."""
    for name in sorted({r.module for r in TABLE.rows}):
        importlib.import_module(name)
