"""Blend's per-step counts: from the worker to EngineCore in vLLM's ``KVConnectorOutput``,
then into ``hooks.metrics`` (and through ``hooks.channel.forward_metrics`` to the API
server's ``/metrics`` as ``cp_engine_blend_*_total``).

Contract:
- ``BlendStats.data`` holds increments: ``recomputed_tokens`` (full-depth-equivalent,
  float), ``reused_tokens``, ``claimed_tokens``, ``loads``, ``load_failures``,
  ``fallback:<reason>``; and ``store``, the worker's latest ``BlockKVStore.stats()``
  (absolute values);
- ``aggregate`` adds increments and keeps the newer store snapshot; ``reduce`` gives the
  summary vLLM's logger prints; both only read ``data``, so the object survives the
  trip through vLLM's serialisation as a plain dict;
- ``feed_metrics(stats, last_store)`` counts ``stats`` into ``hooks.metrics`` and
  returns the store snapshot to diff against next time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from .. import metrics

__all__ = ["BlendStats", "feed_metrics"]

_FALLBACK = "fallback:"


@dataclass
class BlendStats(KVConnectorStats):
    def add(self, name: str, n: float = 1) -> None:
        self.data[name] = self.data.get(name, 0) + n

    def fallback(self, reason: str) -> None:
        self.add(_FALLBACK + reason)

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> "BlendStats":
        out = BlendStats(dict(self.data))
        for name, value in (other.data or {}).items():
            if name == "store":
                out.data["store"] = value
            elif isinstance(value, (int, float)):
                out.add(name, value)
        return out

    def reduce(self) -> dict[str, int | float]:
        return {k: v for k, v in self.data.items() if isinstance(v, (int, float))}

    def is_empty(self) -> bool:
        return not self.data


def _delta(store: dict, last: dict, name: str) -> float:
    return float(store.get(name, 0)) - float(last.get(name, 0))


def feed_metrics(stats: KVConnectorStats, last_store: dict[str, Any]) -> dict[str, Any]:
    """Count one step's worker stats into ``hooks.metrics`` (see module contract)."""
    data = stats.data or {}
    metrics.inc("blend_recomputed_tokens", float(data.get("recomputed_tokens", 0)))
    metrics.inc("blend_reused_tokens", float(data.get("reused_tokens", 0)))
    metrics.inc("blend_claimed_tokens", float(data.get("claimed_tokens", 0)))
    metrics.inc("blend_loads", float(data.get("loads", 0)))
    metrics.inc("blend_load_failures", float(data.get("load_failures", 0)))
    for name, value in data.items():
        if name.startswith(_FALLBACK):
            metrics.inc("blend_fallbacks", float(value), reason=name[len(_FALLBACK):])
    store = data.get("store")
    if not isinstance(store, dict):
        return last_store
    # Gauges travel as deltas too: the sum of the forwarded deltas is the current value.
    metrics.inc("blend_store_bytes", _delta(store, last_store, "blend_store_bytes"))
    metrics.inc("blend_store_entries", _delta(store, last_store, "blend_store_entries"))
    metrics.inc("blend_stored_tokens", _delta(store, last_store, "blend_stored_tokens"))
    metrics.inc("blend_hits", _delta(store, last_store, "blend_hits"))
    metrics.inc("blend_misses", _delta(store, last_store, "blend_misses"))
    metrics.inc("blend_evictions", _delta(store, last_store, "blend_evictions"))
    metrics.inc("blend_rejects", _delta(store, last_store, "blend_rejects"))
    metrics.inc("blend_store_refused", _delta(store, last_store, "blend_store_refused"))
    return dict(store)
