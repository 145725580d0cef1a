"""Plugin counters, exported on the engine's Prometheus ``/metrics`` when possible.

Contract:
- ``inc(name, n=1, **labels)`` adds to an in-process counter; thread-safe, never raises;
  unknown names are accepted (a typo shows up in ``/metrics``, it does not crash);
- ``value(name, **labels)`` / ``snapshot()`` read them (tests, status, channel);
- ``merge(snapshot, source=...)`` adds counts reported by another process (EngineCore
  sends its own through the eviction channel) so one ``/metrics`` shows both;
- ``export_prometheus()`` registers one collector on ``prometheus_client.REGISTRY``
  (the registry vLLM's and SGLang's ``/metrics`` serve) if prometheus_client is
  importable; idempotent; returns whether a collector is registered. ``register_on`` /
  ``unexport_prometheus`` are the same registration as a reversible patch-table row.
Exported names: ``cp_engine_<name>_total`` (counters), label ``hook`` for failures.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Iterable

__all__ = ["COUNTERS", "inc", "value", "snapshot", "merge", "reset", "export_prometheus", "register_on",
           "unexport_prometheus"]

# name -> help text; every name the hooks increment must be here (tests/unit/test_hooks_metrics.py
# scans hooks/ for metrics.inc calls), so /metrics documents each counter.
COUNTERS: dict[str, str] = {
    "requests_rewritten": "Requests whose context blocks cp_engine rendered into the prompt.",
    "blocks_reordered": "Context blocks rendered at a position other than their given one.",
    "dedup_tokens_saved": "Estimated prompt tokens removed by per-conversation de-duplication.",
    "evictions_applied": "Engine prefix-cache evictions applied to the context index.",
    "hook_failures": "Plugin hook calls that failed open (engine behaviour unchanged).",
    "hook_stalls": "Hooks switched off for the rest of the process because one call stalled "
                   "longer than CP_ENGINE_HOOK_STALL_S.",
    "hook_calls_skipped": "Calls of a switched-off hook (the engine ran them unmodified).",
    "hook_cpu_seconds": "CPU time of the calling thread inside a per-request hook (the API server's "
                        "prompt rewrite; on vLLM also the settling of its answer), by hook.",
    "hook_calls": "Calls of a per-request hook whose CPU time hook_cpu_seconds counts, by hook.",
    "requests_rejected": "Requests rejected with HTTP 400 for malformed context fields.",
    "requests_passed_through": "Marked requests passed through unmodified (over limits).",
    "requests_rolled_back": "Rewritten requests the engine rejected; their index path was dropped, "
                            "their dedup history never committed.",
    "cache_resets_applied": "Engine prefix-cache resets applied to the context index (index emptied).",
    "evictions_sent": "Prefix evictions EngineCore sent to the API server's context index.",
    "evictions_untracked": "Requests whose evictions cannot be mapped to the index (salted or "
                           "extra-keyed prompts); their prefixes age out of the index instead.",
    "queue_pops": "Requests admitted from cp_engine's cache-aware waiting queue.",
    "queue_reorders": "Scheduler passes in which cp_engine changed the waiting-queue order.",
    "channel_sent": "Messages the engine process delivered to the local eviction channel.",
    "channel_dropped": "Channel messages dropped without blocking (no receiver, or receiver full).",
    "channel_malformed": "Channel messages ignored as malformed (not JSON, wrong shape, too "
                         "large); nothing is ever unpickled.",
    # blend (KV connector, hooks/vllm/blend_*.py)
    "blend_recomputed_tokens": "Claimed prompt tokens blend computed itself, in full-depth-equivalent "
                               "tokens (tokens per layer summed, divided by the layers).",
    "blend_reused_tokens": "Claimed prompt tokens whose stored KV blend kept (not recomputed).",
    "blend_claimed_tokens": "Prompt tokens blend claimed from the block store (vLLM counts them as "
                            "external cache hits).",
    "blend_loads": "Requests whose claim blend loaded and stitched.",
    "blend_load_failures": "Claims that could not be loaded (store miss, error); vLLM recomputed them.",
    "blend_fallbacks": "Requests or engines that fell back to prefix-only, by reason.",
    "blend_disabled": "Engines where blend was asked for and not installed or not usable, by reason.",
    "blend_stored_tokens": "Tokens of blocks put into the blend block store.",
    "blend_store_bytes": "Host bytes held by the blend block store (a gauge: the current value).",
    "blend_store_entries": "Blocks held by the blend block store (a gauge: the current value).",
    "blend_hits": "Blend store lookups that returned a verified block.",
    "blend_misses": "Blend store lookups that found no usable block (rejects included).",
    "blend_evictions": "Blocks evicted from the blend store to stay within its byte bound.",
    "blend_rejects": "Blend store entries dropped on lookup: token ids, shape or dtype did not match.",
    "blend_store_refused": "Blocks the blend store refused (wrong shape, dtype, device, or too large).",
}

_Key = tuple[str, tuple[tuple[str, str], ...]]
_lock = threading.Lock()
_values: dict[_Key, float] = {}
_exported: tuple[Any, Any] | None = None  # (registry, collector) while registered


def _key(name: str, labels: dict[str, Any]) -> _Key:
    # Most counts on the request path carry no label or one: no sort, no generator.
    # (Keyword names are always str.)
    if not labels:
        return name, ()
    if len(labels) == 1:
        ((k, v),) = labels.items()
        return name, ((k, str(v)),)
    return name, tuple(sorted((str(k), str(v)) for k, v in labels.items()))


def inc(name: str, n: float = 1, **labels: Any) -> None:
    try:
        k = _key(name, labels)
        with _lock:
            _values[k] = _values.get(k, 0) + n
    except Exception:  # counting must never break a hook
        pass


def value(name: str, **labels: Any) -> float:
    """Counter value for exactly these labels (0 if never counted)."""
    with _lock:
        return _values.get(_key(name, labels), 0)


def total(name: str) -> float:
    """Sum of a counter over all label sets."""
    with _lock:
        return sum(v for (n, _), v in _values.items() if n == name)


def snapshot() -> list[tuple[str, dict[str, str], float]]:
    with _lock:
        return [(n, dict(lbl), v) for (n, lbl), v in _values.items()]


def merge(items: Iterable[tuple[str, dict[str, str], float]]) -> None:
    """Add counts from another process (deltas, not totals)."""
    for name, labels, n in items:
        inc(str(name), float(n), **dict(labels))


def reset() -> None:
    with _lock:
        _values.clear()


class _Collector:
    """prometheus_client custom collector reading the in-process counters."""

    def collect(self):  # pragma: no cover - exercised through a live /metrics
        from prometheus_client.core import CounterMetricFamily

        by_name: dict[str, list[tuple[dict[str, str], float]]] = {n: [] for n in COUNTERS}
        for name, labels, v in snapshot():
            by_name.setdefault(name, []).append((labels, v))
        for name, rows in by_name.items():
            label_names = sorted({k for labels, _ in rows for k in labels})
            fam = CounterMetricFamily(f"cp_engine_{name}", COUNTERS.get(name, name), labels=label_names)
            if not rows and not label_names:
                fam.add_metric([], 0.0)
            for labels, v in rows:
                fam.add_metric([labels.get(k, "") for k in label_names], v)
            yield fam

    def describe(self):  # no eager collect at registration time
        return []


def register_on(registry: Any) -> Callable[[], None] | None:
    """Put the collector on ``registry`` (idempotent); returns the undo, None on failure.

    The registry row of each engine's patch table applies this; ``unexport_prometheus``
    (the undo) takes the collector off again.
    """
    global _exported
    with _lock:
        if _exported is None:
            collector = _Collector()
            try:
                registry.register(collector)
            except Exception:
                return None
            _exported = (registry, collector)
    return unexport_prometheus


def unexport_prometheus() -> None:
    """Take the collector off the registry it was put on (idempotent)."""
    global _exported
    with _lock:
        done, _exported = _exported, None
    if done is not None:
        try:
            done[0].unregister(done[1])
        except Exception:
            pass


def export_prometheus() -> bool:
    """The collector on ``prometheus_client.REGISTRY``; whether it is there."""
    if _exported is not None:
        return True
    try:
        from prometheus_client import REGISTRY
    except Exception:
        return False
    return register_on(REGISTRY) is not None
