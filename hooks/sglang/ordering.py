"""Cache-aware order of SGLang's waiting queue (``SchedulePolicy.calc_priority``).

Contract:
- ``around_calc_priority`` wraps the original AROUND and binds nothing by position:
  SGLang's own policy runs first, unchanged (its prefix matching sets fields the
  scheduler reads later); then the list it sorted in place is re-sorted, in place,
  by ``hooks.scheduling.schedule_order``: requests sharing a prompt prefix run
  consecutively, depth-first, and a request older than
  ``CP_ENGINE_SCHEDULE_MAX_WAIT_S`` goes first in arrival order (aging);
- there is no queue-length cut-off (SGLang's LPM falls back to FCFS above 128
  waiting); the cost is O(n log n) per call and a call on an unchanged queue with
  nothing newly aged is O(n);
- with priority scheduling on, priority classes keep SGLang's order between them;
- prefix key of a ``Req``: chained hashes of 64-token chunks of its prompt, computed
  once per request (what the radix cache matches on, whatever marked the request);
- every request is shown once to ``observers`` (eviction tracking) with its policy;
- any failure leaves the order SGLang chose (fail open, counted).
"""
from __future__ import annotations

import time
import weakref
from typing import Any, Callable

from .. import faults, metrics
from ..scheduling import chained_key, schedule_order

__all__ = ["around_calc_priority", "req_key", "observers", "CHUNK_TOKENS"]

CHUNK_TOKENS = 64
_MAX_CHUNKS = 64  # keys look at the first 4k tokens: grouping is decided near the start

# Callables given (req, policy) for each newly seen Req (eviction tracking registers here).
observers: list[Callable[[Any], None]] = []

_keys: "weakref.WeakKeyDictionary[Any, tuple]" = weakref.WeakKeyDictionary()
# Per SchedulePolicy: the queue order we produced last and the key served first.
_last: "weakref.WeakKeyDictionary[Any, tuple[list[int], tuple, float]]" = weakref.WeakKeyDictionary()


def req_key(req: Any, policy: Any = None) -> tuple:
    """Prefix key of a scheduler ``Req`` (cached per request); never raises."""
    try:
        key = _keys.get(req)
        if key is not None:
            return key
    except TypeError:
        pass
    key = ()
    try:
        ids = req.origin_input_ids
        n = min(len(ids) // CHUNK_TOKENS, _MAX_CHUNKS)
        chain, prev = [], 0
        for c in range(n):
            chunk = tuple(ids[c * CHUNK_TOKENS:(c + 1) * CHUNK_TOKENS])
            prev = hash((prev, chunk))  # chained: equal hash ⇒ equal prefix (in-process)
            chain.append(prev)
        if not chain and len(ids):
            chain.append(hash((0, tuple(ids))))  # short prompts group by exact text
        key = chained_key(chain)
        for obs in observers:
            faults.call_guarded("sglang_observer", obs, req, policy)
    except Exception as exc:
        faults.record_failure("sglang_req_key", exc)
    try:
        _keys[req] = key
    except TypeError:
        pass
    return key


def _arrival(req: Any, now: float) -> float:
    t = getattr(getattr(req, "time_stats", None), "wait_queue_entry_time", 0.0)
    # SGLang stamps with time.perf_counter(); 0.0 means "not stamped yet".
    return float(t) if t else now


def _reorder(policy: Any, queue: list, max_wait_s: float) -> None:
    faults.check_fault("sglang_schedule")
    n = len(queue)
    keys = [req_key(r, policy) for r in queue]
    if n < 2:
        return
    now = time.perf_counter()
    arrivals = [_arrival(r, now) for r in queue]
    ident = [id(r) for r in queue]
    oldest = min(arrivals)
    last = _last.get(policy)
    if last is not None and last[0] == ident and (now - oldest <= max_wait_s) == last[2]:
        return  # same queue, same aging state: the order we set still holds
    order = schedule_order(keys, arrivals, now=now, max_wait_s=max_wait_s,
                           last_key=last[1] if last is not None else None)
    if getattr(policy, "enable_priority_scheduling", False):
        sign = getattr(policy, "priority_sign", 1)
        rank = {i: pos for pos, i in enumerate(order)}
        order.sort(key=lambda i: ((getattr(queue[i], "priority", 0) or 0) * sign, rank[i]))
    moved = sum(1 for pos, i in enumerate(order) if pos != i)
    queue[:] = [queue[i] for i in order]
    _last[policy] = ([id(r) for r in queue], keys[order[0]], now - oldest <= max_wait_s)
    if moved:
        metrics.inc("queue_reorders", 1, engine="sglang")


def around_calc_priority(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    """wrapt wrapper for ``SchedulePolicy.calc_priority`` (see module contract)."""
    result = wrapped(*args, **kwargs)
    try:
        from ..runtime import config

        cfg = config()
        queue = kwargs.get("waiting_queue", args[0] if args else None)
        if not isinstance(queue, list):
            return result
        if cfg.schedule:
            _reorder(instance, queue, cfg.schedule_max_wait_s)
        else:
            for r in queue:
                req_key(r, instance)  # still feeds the observers (eviction tracking)
    except Exception as exc:
        faults.record_failure("sglang_schedule", exc)
    return result
