"""Forward vLLM prefix-cache evictions from EngineCore to the API server's index.

Contract:
- every request the waiting queue sees is tracked (``track_request``): its prompt
  block hashes with the API server's hints (``cp_ns``/``cp_path``/``cp_ends``);
  requests without hints are ignored;
- ``BlockPool._maybe_evict_cached_block`` is wrapped (row ``block_evicted`` of
  ``hooks/vllm/table.py``): the block's hashes are read
  *before* calling through; when vLLM reports the block evicted, each hash that no
  longer has any physical copy in the pool (vLLM keeps duplicates) goes through
  ``cp_engine.eviction_mapping.EvictionMapper`` and the shallowest broken context-block prefix
  is sent as ``evict_path`` on ``hooks.channel``. ``evict_blocks`` evicts through the
  same method, so it is covered too;
- ``Scheduler.schedule`` is wrapped (row ``eviction_batch``): the prefixes one
  scheduling step breaks are held until the step returns and leave as one message
  (``evict_paths``, in eviction order): fewer messages to encode and send here and to
  parse and apply in the API server (its receiver's wake-ups are bounded by its own
  batching window either way); an eviction outside a step (or on another thread) is
  sent at once;
- ``BlockPool.reset_prefix_cache`` is wrapped (row ``prefix_cache_reset``): a
  successful reset sends ``reset``;
- why not KV events (``take_events``): they exist only when the user enables
  ``--kv-events-config``, and then they belong to vLLM's publisher;
- nothing here blocks the scheduler (channel sends are NOBLOCK) or raises into it.
``on_patch()`` / ``on_unpatch()`` (called by ``hooks.installer``) start and stop the
tracking; the waiting queue rows are on whenever eviction sync is (FCFS order when
``CP_ENGINE_SCHEDULE=0``), since requests are seen there.
"""
from __future__ import annotations

import inspect
import logging
import threading
from typing import Any

from vllm.v1.core import block_pool as _bp
from vllm.v1.core.kv_cache_utils import get_block_hash

from cp_engine.eviction_mapping import EvictionMapper

from .. import channel, faults, metrics
from . import hints as _hints
from . import queue as _queue
from . import share

__all__ = ["evict_wrapper", "reset_wrapper", "schedule_wrapper", "on_patch", "on_unpatch", "track_request", "state"]

logger = logging.getLogger("cp_engine.hooks")

_EVICT = "_maybe_evict_cached_block"


class _EngineSide:
    """Per-process mapper + channel end (EngineCore, or the only process)."""

    def __init__(self) -> None:
        self.mapper = EvictionMapper()
        self._sender: channel.Sender | None = None
        self.sized = False
        self.step: list[tuple[str, list[str]]] | None = None  # a step's evicted paths, while one runs
        self.step_thread = 0  # the thread running that step

    def emit(self, ns: str, path_hex: list[str]) -> None:
        """Report one broken prefix: held for the running step's message, else sent now."""
        if self.step is not None and self.step_thread == threading.get_ident():
            self.step.append((ns, path_hex))
        else:
            self.sender.send({"op": "evict_path", "ns": ns, "path": path_hex})

    @property
    def sender(self) -> channel.Sender:
        if self._sender is None:
            self._sender = channel.engine_sender()
        return self._sender


_lock = threading.Lock()
_state: _EngineSide | None = None
_block_pos: int = 0  # position of ``block`` among the wrapped method's arguments (after self)


def state() -> _EngineSide | None:
    return _state


@faults.stall_watched("vllm_eviction")
def track_request(request: Any) -> None:
    """Queue observer: remember a hinted request's prompt hashes."""
    st = _state
    if st is None:
        return
    faults.check_fault("vllm_eviction")
    hints = _hints.of_request(request)
    if hints is None or not hints.ends:
        return
    hashes = getattr(request, "block_hashes", None)
    if hashes:
        st.mapper.track(hashes, hints.namespace, hints.path, hints.ends)


@faults.stall_watched("vllm_eviction")
def _after_evict(pool: Any, keys: list) -> None:
    st = _state
    if st is None:
        return
    faults.check_fault("vllm_eviction")
    mapper = st.mapper
    if not st.sized:
        mapper.block_size = int(getattr(pool, "hash_block_size", 0) or getattr(pool, "block_size", 0)) or None
        # Enough to cover every block the pool can hold a few times over.
        mapper.max_hashes = min(1 << 20, max(1 << 16, 4 * int(getattr(pool, "num_gpu_blocks", 0))))
        st.sized = True
    cache = pool.cached_block_hash_to_block
    for key in keys:
        if cache.get_one_block(key) is not None:
            continue  # another physical block still serves this hash
        hit = mapper.gone(get_block_hash(key))
        if hit is not None:
            ns, prefix = hit
            st.emit(ns, channel.hex_ids(prefix))
            metrics.inc("evictions_sent", 1)
            logger.debug("cp_engine: evicted prefix depth %d in namespace %r", len(prefix), ns)
    channel.forward_metrics()


def evict_wrapper(wrapped, instance, args, kwargs):
    """Row ``block_evicted``: read the block's hashes, call through, report what left."""
    st = _state
    if st is None or not len(st.mapper):
        return wrapped(*args, **kwargs)
    keys = None
    try:
        block = kwargs["block"] if "block" in kwargs else args[_block_pos]
        keys = [block.block_hash] if block.block_hash is not None else []
        # 0.27.1+: a block can also serve extra hashes (kept beside the primary one).
        extra = getattr(instance, "cached_block_hashes_by_block", None)
        if extra:
            keys.extend(extra.get(block.block_id, ()))
    except Exception as exc:
        faults.record_failure("vllm_eviction", exc)
    result = wrapped(*args, **kwargs)
    if result and keys:
        with faults.guarded("vllm_eviction"):
            _after_evict(instance, keys)
    return result


def schedule_wrapper(wrapped, instance, args, kwargs):
    """Row ``eviction_batch``: hold the evictions of one scheduling step, send them as
    one message when it returns (or raises)."""
    st = _state
    if st is None or st.step is not None:  # off, or a step inside a step: the outer one sends
        return wrapped(*args, **kwargs)
    st.step, st.step_thread = [], threading.get_ident()
    try:
        return wrapped(*args, **kwargs)
    finally:
        held, st.step = st.step, None
        if held:
            with faults.guarded("vllm_eviction"):
                for msg in channel.eviction_messages(held):
                    st.sender.send(msg)


def reset_wrapper(wrapped, instance, args, kwargs):
    """Row ``prefix_cache_reset``: a successful reset empties the mapper and the index."""
    result = wrapped(*args, **kwargs)
    st = _state
    if result and st is not None:
        with faults.guarded("vllm_eviction"):
            if st.step is not None:
                st.step.clear()  # the reset supersedes what the running step evicted so far
            st.mapper.reset()
            st.sender.send({"op": "reset"})
    return result


def on_patch() -> None:
    """Before the first row of this module is applied: start tracking."""
    global _state, _block_pos
    params = list(inspect.signature(_bp.BlockPool.__dict__[_EVICT]).parameters)
    with _lock:
        # The wrapper reads ``block`` by the position its *name* has now (the row's
        # signature check guarantees it is there), resolved once here: binding a
        # signature per call would tax every allocation.
        _block_pos = params.index("block") - 1
        if _state is None:
            _state = _EngineSide()
        if track_request not in _queue.observers:
            _queue.observers.append(track_request)
        share.attach()  # API servers of one instance learn each other's requests


def on_unpatch() -> None:
    """After this module's rows were undone: stop tracking."""
    global _state
    with _lock:
        if track_request in _queue.observers:
            _queue.observers.remove(track_request)
        share.detach()
        _state = None
