"""SGLang prefix-cache evictions → the API server's context index, via KV events.

Works for ``UnifiedRadixCache`` (Python or Rust tree core) and classic ``RadixCache``
alike because it uses only their KV-event recorder, never node-deletion internals:

- ``around_cache_init`` turns the cache's event recorder on even when the user did not
  configure ``--kv-events-config`` (the recorder only queues; nothing is published
  unless the user asked for it);
- ``after_take_events`` sees every batch the cache hands out (to SGLang's own
  publisher or to our drain) and returns it unchanged;
- ``around_publish`` drains the queue each time the scheduler would publish when
  the user's publisher is off, so the queue stays bounded;
- ``track_req`` (an ordering observer) hashes a marked request's prompt pages with
  SGLang's own event hash, so ``BlockRemoved`` hashes map to context-block paths
  through ``cp_engine.eviction_mapping.EvictionMapper``; the prefixes one batch of
  events breaks leave as one message (``evict_path``, or ``evict_paths`` for several),
  a cache clear as ``reset``, over ``hooks.channel`` (non-blocking, never raises).
Requests with a cache salt or extra key (LoRA) publish namespaced hashes: they are not
tracked (the index then stays optimistic for them, which only costs ordering quality).
"""
from __future__ import annotations

import dataclasses
import threading
import weakref
from array import array
from typing import Any, Callable

from cp_engine.eviction_mapping import EvictionMapper

from .. import faults, metrics
from ..channel import engine_sender, eviction_messages, hex_ids
from . import hints as _hints

__all__ = ["around_cache_init", "after_take_events", "around_publish", "track_req", "mapper",
           "forward_events", "observe", "event_hashes", "reset_for_tests"]

_lock = threading.Lock()
_mappers: dict[int, EvictionMapper] = {}
_forced: "set[int]" = set()  # id() of caches whose recorder we switched on
# Caches with stores since their own last clear: a clear of an empty cache (every cache
# records one at construction) must not wipe requests tracked in the meantime. Kept
# per cache, not per page size: a second cache of the same page size in the process
# (built later, still empty) must neither reset the index nor mark the first one clean.
_dirty: "weakref.WeakSet[Any]" = weakref.WeakSet()
_dirty_ids: "set[int]" = set()  # id() of caches that take no weak reference


def _mark_dirty(cache: Any) -> None:
    try:
        _dirty.add(cache)
    except TypeError:
        _dirty_ids.add(id(cache))


def _take_dirty(cache: Any) -> bool:
    """Whether ``cache`` stored blocks since its last clear; it counts as clean after."""
    if id(cache) in _dirty_ids:
        _dirty_ids.discard(id(cache))
        return True
    if cache in _dirty:  # False for an object that takes no weak reference
        _dirty.discard(cache)
        return True
    return False


def mapper(page_size: int) -> EvictionMapper:
    with _lock:
        m = _mappers.get(page_size)
        if m is None:
            m = _mappers[page_size] = EvictionMapper(page_size)
        return m


def reset_for_tests() -> None:
    with _lock:
        _mappers.clear()
        _forced.clear()
        _dirty.clear()
        _dirty_ids.clear()


def _enabled() -> bool:
    from ..runtime import config

    return config().eviction_sync


# -- recorder on -------------------------------------------------------------------
def around_cache_init(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    """``__init__(params)`` of a radix cache with ``params.enable_kv_cache_events`` forced on."""
    forced = False
    try:
        if _enabled():
            faults.check_fault("sglang_cache_init")
            key = "params" if "params" in kwargs else None
            params = kwargs[key] if key else (args[0] if args else None)
            if (dataclasses.is_dataclass(params) and hasattr(params, "enable_kv_cache_events")
                    and not params.enable_kv_cache_events and not getattr(params, "disable", False)):
                params = dataclasses.replace(params, enable_kv_cache_events=True)
                if key:
                    kwargs = {**kwargs, key: params}
                else:
                    args = (params,) + tuple(args[1:])
                forced = True
    except Exception as exc:
        faults.record_failure("sglang_cache_init", exc)
    result = wrapped(*args, **kwargs)
    if forced:
        with _lock:
            _forced.add(id(instance))
    return result


# -- event tap -----------------------------------------------------------------------
def forward_events(events: list, page_size: int, cache: Any) -> int:
    """Apply one batch of ``cache``'s KV events to the mapper; returns messages sent."""
    from sglang.srt.disaggregation.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

    m = mapper(page_size)
    sender = engine_sender()
    sent = 0
    held: list[tuple[str, list[str]]] = []  # the batch's broken prefixes: one message, not one each
    for ev in events:
        if isinstance(ev, BlockStored):
            _mark_dirty(cache)
            for h in ev.block_hashes:
                m.stored(h)
        elif isinstance(ev, BlockRemoved):
            for h in ev.block_hashes:
                hit = m.removed(h)
                if hit is not None:
                    held.append((hit[0], hex_ids(hit[1])))
        elif isinstance(ev, AllBlocksCleared) and _take_dirty(cache):
            m.reset()
            held.clear()  # the reset supersedes them
            sent += sender.send({"op": "reset"})
    return sent + sum(sender.send(msg) for msg in eviction_messages(held))


@faults.stall_watched("sglang_evictions")
def _tap(events: Any, instance: Any) -> None:
    faults.check_fault("sglang_evictions")
    if _enabled():
        forward_events(list(events), int(getattr(instance, "page_size", 1) or 1), instance)


def after_take_events(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    events = wrapped(*args, **kwargs)
    if events:
        try:
            _tap(events, instance)
        except Exception as exc:
            faults.record_failure("sglang_evictions", exc)
    return events


def around_publish(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    """``SchedulerKvEventsPublisher.publish_kv_events``: drain when the user's publisher is off."""
    result = wrapped(*args, **kwargs)
    try:
        if not getattr(instance, "enable_kv_cache_events", False):
            cache = getattr(instance, "tree_cache", None)
            with _lock:
                ours = cache is not None and id(cache) in _forced
            if ours:
                cache.take_events()  # goes through after_take_events; then dropped
    except Exception as exc:
        faults.record_failure("sglang_evictions", exc)
    return result


# -- request tracking (scheduler process) ----------------------------------------------
def event_hashes(token_ids: Any, page_size: int) -> list[int]:
    """SGLang's KV-event hash of every full page of ``token_ids`` (no salt, no LoRA)."""
    # get_hash_str exists in 0.5.17-0.5.23; for an unsalted key (no extra_key, no
    # cache_salt) it is what the recorder publishes (0.5.20+ seeds salted chains only).
    from sglang.srt.mem_cache.utils import get_hash_str, hash_str_to_int64

    n = (len(token_ids) // page_size) * page_size
    if n <= 0:
        return []
    values = get_hash_str(array("q", token_ids[:n]), None, page_size=page_size)
    return [hash_str_to_int64(v) for v in values]


@faults.stall_watched("sglang_track")
def track_req(req: Any, page_size: int) -> int:
    """Remember the page hashes of a marked request; returns hashes tracked."""
    if not _enabled():
        return 0
    faults.check_fault("sglang_track")
    h = _hints.of_request(req)
    if h is None or not h.path or not h.ends:
        return 0
    if getattr(req, "extra_key", None) or getattr(req, "cache_salt", None):
        metrics.inc("evictions_untracked", 1, engine="sglang")
        return 0
    ids = req.origin_input_ids
    # Only pages that can hold context blocks matter (the mapper ignores later ones).
    upto = min(len(ids), -(-h.ends[-1] // page_size) * page_size)
    hashes = event_hashes(ids[:upto], page_size)
    return mapper(page_size).track(hashes, h.namespace, h.path, h.ends)


def observe(req: Any, policy: Any) -> None:
    """Ordering observer: track ``req`` with the page size of the policy's cache."""
    cache = getattr(policy, "tree_cache", None)
    track_req(req, int(getattr(cache, "page_size", 1) or 1))
