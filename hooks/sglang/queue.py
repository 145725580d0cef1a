"""Cache-aware order of SGLang's waiting queue (``SchedulePolicy.calc_priority``).

Contract:
- ``around_calc_priority`` wraps the original AROUND and binds nothing by position:
  SGLang's own policy runs first, unchanged (its prefix matching sets fields the
  scheduler reads later); then the list it sorted in place is re-sorted, in place,
  by ``cp_engine.queue_order.schedule_order``: requests sharing a prompt prefix run
  consecutively, depth-first, and a request older than
  ``CP_ENGINE_SCHEDULE_MAX_WAIT_S`` goes first in arrival order (aging);
- there is no queue-length cut-off (SGLang's LPM falls back to FCFS above 128
  waiting): a full depth-first sort (O(n log n)) runs every 32 calls or when many
  requests are new; in between a call is O(n): departed requests drop out, new ones
  go right after the last waiting request sharing their deepest prefix (≤ 1,024 tokens);
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

from cp_engine.queue_order import chained_key, schedule_order

from .. import faults, metrics

__all__ = ["around_calc_priority", "req_key", "observers", "CHUNK_TOKENS"]

CHUNK_TOKENS = 64
_MAX_CHUNKS = 64  # keys look at the first 4k tokens: grouping is decided near the start

# Callables given (req, policy) for each newly seen Req (eviction tracking registers here).
observers: list[Callable[[Any], None]] = []

_keys: "weakref.WeakKeyDictionary[Any, tuple]" = weakref.WeakKeyDictionary()
_arrivals: "weakref.WeakKeyDictionary[Any, float]" = weakref.WeakKeyDictionary()
_last: "weakref.WeakKeyDictionary[Any, _State]" = weakref.WeakKeyDictionary()  # per SchedulePolicy
# Between full depth-first sorts (O(n log n)), calls only drop departed requests and
# place new ones after the last waiting request of their group (O(n)); a full sort
# runs every _FULL_EVERY calls or when many requests are new.
_FULL_EVERY = 32
_INCR_MAX_NEW = 64
_INCR_DEPTH = 16  # prefixes up to 1,024 tokens place a new request (long system prompts)


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
    """Enqueue time on ``time.perf_counter()``'s clock (SGLang's), cached once stamped."""
    t = _arrivals.get(req)
    if t is not None:
        return t
    t = getattr(getattr(req, "time_stats", None), "wait_queue_entry_time", 0.0)
    if not t:
        return now  # 0.0: not stamped yet
    try:
        _arrivals[req] = float(t)
    except TypeError:
        pass
    return float(t)


class _State:
    """What the last call decided for one ``SchedulePolicy``."""

    __slots__ = ("order", "calls", "oldest", "aged")

    def __init__(self, order: list) -> None:
        self.order = order  # our last output (Req objects)
        self.calls = 0  # incremental updates since the last full sort
        self.oldest = 0.0  # earliest arrival in ``order``
        self.aged = False  # whether it had passed the aging bound

    def holds(self, queue: list, now: float, max_wait_s: float) -> bool:
        """The queue is exactly our last output and no request has newly aged."""
        order = self.order
        return (len(order) == len(queue) and (now - self.oldest > max_wait_s) == self.aged
                and all(a is b for a, b in zip(order, queue)))


def _full(policy: Any, queue: list, now: float, max_wait_s: float, last: _State | None) -> list:
    keys = [req_key(r, policy) for r in queue]
    arrivals = [_arrival(r, now) for r in queue]
    last_key = req_key(last.order[0], policy) if last is not None and last.order else None
    order = schedule_order(keys, arrivals, now=now, max_wait_s=max_wait_s, last_key=last_key)
    return [queue[i] for i in order]


def _incremental(policy: Any, queue: list, last: _State, now: float, max_wait_s: float) -> list | None:
    """Last order minus departed requests, new ones placed after their group; None when
    too much changed (the caller then sorts from scratch)."""
    present = {id(r) for r in queue}
    kept = [r for r in last.order if id(r) in present]
    if len(queue) - len(kept) > max(_INCR_MAX_NEW, len(queue) // 8):
        return None
    known = {id(r) for r in kept}
    # Key parts are chained hashes: one part names its whole prefix, so "last waiting
    # request under this prefix" is a dict keyed by single parts (first _INCR_DEPTH).
    last_at: dict = {}
    for i, r in enumerate(kept):
        for part in req_key(r, policy)[:_INCR_DEPTH]:
            last_at[part] = i
    after: dict[int, list] = {}
    tail: dict = {}
    for r in sorted((r for r in queue if id(r) not in known), key=lambda r: _arrival(r, now)):
        key = req_key(r, policy)[:_INCR_DEPTH]
        pos = next((last_at[p] for p in reversed(key) if p in last_at), None)
        if pos is not None:  # right after the deepest shared prefix's last request
            after.setdefault(pos, []).append(r)
        else:
            tail.setdefault(key[:1], []).append(r)
    out: list = []
    for i, r in enumerate(kept):
        out.append(r)
        if i in after:
            out.extend(after[i])
    for rs in tail.values():
        out.extend(rs)
    aged = [r for r in out if now - _arrival(r, now) > max_wait_s]
    if aged:  # the aging bound: oldest first, in arrival order
        aged_ids = {id(r) for r in aged}
        aged.sort(key=lambda r: _arrival(r, now))
        out = aged + [r for r in out if id(r) not in aged_ids]
    return out


@faults.stall_watched("sglang_schedule")
def _reorder(policy: Any, queue: list, max_wait_s: float) -> None:
    faults.check_fault("sglang_schedule")
    if len(queue) < 2:
        for r in queue:
            req_key(r, policy)  # observers see every request
        return
    now = time.perf_counter()
    last = _last.get(policy)
    if last is not None and last.holds(queue, now, max_wait_s):
        return
    out = None
    if last is not None and last.calls < _FULL_EVERY:
        out = _incremental(policy, queue, last, now, max_wait_s)
    if out is None:
        out = _full(policy, queue, now, max_wait_s, last)
        state = _State(out)
    else:
        state = last
        state.order = out
        state.calls += 1
    if getattr(policy, "enable_priority_scheduling", False):
        sign = getattr(policy, "priority_sign", 1)
        out.sort(key=lambda r: (getattr(r, "priority", 0) or 0) * sign)  # stable
    moved = any(a is not b for a, b in zip(out, queue))
    queue[:] = out
    state.order = list(out)
    state.oldest = min(_arrival(r, now) for r in out)
    state.aged = now - state.oldest > max_wait_s
    _last[policy] = state
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
