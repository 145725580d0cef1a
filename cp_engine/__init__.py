"""cp_engine: reuse KV cache for context blocks that recur across requests."""
# No ``from __future__`` import: this package is imported at every interpreter start
# (hooks/autoload.py), so it loads nothing it does not need.
import os as _os

__version__ = "0.1.0"

# In a source checkout hooks/ and kernels/ sit beside this package at the
# repository top level; installed wheels carry them as cp_engine/hooks and
# cp_engine/kernels. Let the source layout resolve the same import names.
_here = _os.path.dirname(_os.path.abspath(__file__))
_root = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "hooks")) and _os.path.isfile(
    _os.path.join(_root, "hooks", "__init__.py")
):
    __path__.append(_root)  # type: ignore[name-defined]

from . import lazy as _lazy  # noqa: E402  (after the source-layout shim)

# The public API, loaded on first use (PEP 562): the autoload .pth imports this package
# in every Python process, which must not pay for numpy and the core.
_EXPORTS = {
    "BatchMessages": "api", "build_batch_messages": "api", "build_messages": "api",
    "deduplicate": "api", "default_pipeline": "api", "reorder": "api",
    "block_id": "blocks",
    "Config": "config", "load_config": "config",
    "Deduplicator": "dedup",
    "ContextIndex": "index",
    "ContextPipeline": "pipeline", "InvalidBlocks": "pipeline", "Prepared": "pipeline",
    "BatchPlan": "planner", "plan_batch": "api",  # api: the planner with the kernels' partner search
    "simulate": "sim",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = _lazy.exports(__name__, _EXPORTS, globals())
