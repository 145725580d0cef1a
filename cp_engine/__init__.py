"""cp_engine: reuse KV cache for context blocks that recur across requests."""
from __future__ import annotations

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

from .api import (  # noqa: E402  (public API, after the source-layout shim)
    BatchMessages,
    build_batch_messages,
    build_messages,
    deduplicate,
    default_pipeline,
    plan_batch,
    reorder,
)
from .blocks import block_id  # noqa: E402
from .config import Config, load_config  # noqa: E402
from .dedup import Deduplicator  # noqa: E402
from .index import ContextIndex  # noqa: E402
from .pipeline import ContextPipeline, InvalidBlocks, Prepared  # noqa: E402
from .planner import BatchPlan  # noqa: E402
from .sim import simulate  # noqa: E402

__all__ = [
    "BatchMessages", "BatchPlan", "Config", "ContextIndex", "ContextPipeline", "Deduplicator",
    "InvalidBlocks", "Prepared", "block_id", "build_batch_messages", "build_messages",
    "deduplicate", "default_pipeline", "load_config", "plan_batch", "reorder", "simulate",
]
