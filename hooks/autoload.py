"""What the ``cp_engine_autoload.pth`` line runs in every Python process.

Contract: ``install()`` is cheap (no engine import; only wrapt's post-import
machinery), idempotent, never raises, and does nothing when ``CP_ENGINE_DISABLE`` is
set. It registers post-import hooks so the real work (``bootstrap.activate``) runs only
in processes that import vLLM or SGLang, right after that import completes.
"""
from __future__ import annotations

import os

__all__ = ["PTH_NAME", "PTH_LINE", "install", "disabled"]

PTH_NAME = "cp_engine_autoload.pth"
# One line (site only executes .pth lines that start with "import"). The env check runs
# before anything of ours is imported; the exec'd try/except keeps a broken or
# half-removed install from printing tracebacks at every interpreter start.
PTH_LINE = (
    "import os; os.environ.get('CP_ENGINE_DISABLE', '').strip().lower() in ('1', 'true', 'yes', 'on') "
    "or exec(\"try:\\n import cp_engine.hooks.autoload as _cpa; _cpa.install()\\nexcept Exception:\\n pass\")"
)

ENGINES = ("vllm", "sglang")
_installed = False


def disabled() -> bool:
    return os.environ.get("CP_ENGINE_DISABLE", "").strip().lower() in ("1", "true", "yes", "on")


def _on_engine_import(module) -> None:
    try:
        from . import bootstrap

        bootstrap.activate(module.__name__, source="pth")
    except Exception:
        pass  # bootstrap logs and counts its own failures; this guards its import


def install() -> bool:
    """Register the engine post-import hooks once; return whether they are registered."""
    global _installed
    if _installed:
        return True
    if disabled():
        return False
    try:
        from wrapt import register_post_import_hook

        for name in ENGINES:
            register_post_import_hook(_on_engine_import, name)
        _installed = True
    except Exception:
        return False
    return True
