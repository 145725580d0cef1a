"""Top-k block-overlap scoring between many block lists (``cp_engine.kernels``).

Needs only numpy; torch and triton are imported lazily when the Triton backend runs.
Public API, loaded on first use (so ``cp_engine.kernels.planning`` is cheap to plug in):
``topk_overlap``, ``partner_candidates`` (the planner's entry point), ``pack_lists``,
``pack_pair``, ``PackedLists``, ``TopK``, ``BackendUnavailable``, ``TRITON_MIN_PAIRS``.
"""
from cp_engine import lazy as _lazy

_EXPORTS = {
    "ALPHA": "overlap", "METRICS": "overlap", "TopK": "overlap", "partner_candidates": "overlap",
    "topk_overlap": "overlap",
    "MAX_K": "backend", "TRITON_MIN_PAIRS": "backend", "BackendUnavailable": "backend",
    "triton_status": "backend",
    "PackedLists": "packing", "pack_lists": "packing", "pack_pair": "packing",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = _lazy.exports(__name__, _EXPORTS, globals())
