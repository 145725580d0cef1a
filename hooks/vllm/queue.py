"""Cache-aware waiting queue for vLLM's v1 scheduler, installed through its factory.

Contract:
- ``CacheAwareRequestQueue`` implements vLLM's abstract ``RequestQueue`` completely.
  Prepended requests (preempted or skipped ones, which vLLM puts back at the head)
  sit in a front deque served first, with ``FCFSRequestQueue``'s exact prepend
  semantics; everything added with ``add_request`` is ordered by
  ``cp_engine.queue_order.PrefixScheduler`` (shared prefix depth-first, aging bound
  ``CP_ENGINE_SCHEDULE_MAX_WAIT_S``). Iteration yields the order pops would take.
- prefix key of a request: its prompt's chained block hashes (what the prefix cache
  matches on); without hashes (prefix caching off, prompt under one block) the
  API server's hints (namespace + context-block path, else group key); else none.
- ``factory_wrapper`` wraps ``create_request_queue`` in ``request_queue`` and in
  ``scheduler`` (which imports the name; rows ``queue_factory*`` of
  ``hooks/vllm/table.py``), so every scheduler class vLLM builds gets this queue for
  the FCFS policy; the priority policy keeps vLLM's order (``ObservedPriorityQueue``
  only reports added requests to ``observers``). Fails open to vLLM's factory.
- each added request is shown to ``observers`` (eviction tracking) under a guard;
  with ``CP_ENGINE_SCHEDULE=0`` the queue (installed for those observers) keeps
  vLLM's FCFS order exactly.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any, Callable, Iterable, Iterator

from vllm.v1.core.sched import request_queue as _rq

from cp_engine.queue_order import PrefixScheduler, chained_key, truncated_key

from .. import channel, faults, metrics
from . import hints as _hints

__all__ = ["CacheAwareRequestQueue", "ObservedPriorityQueue", "request_key", "factory_wrapper", "observers"]

logger = logging.getLogger("cp_engine.hooks")

# Callables given each request on add_request (eviction tracking registers here).
observers: list[Callable[[Any], None]] = []


@faults.stall_watched("vllm_queue")
def request_key(request: Any) -> tuple:
    """Prefix key of a vLLM ``Request`` (see module contract); never raises."""
    try:
        faults.check_fault("vllm_queue")
        hashes = getattr(request, "block_hashes", None)
        if hashes:
            # Chained hashes: sampling fixed positions keeps long prompts cheap.
            return ("h",) + chained_key(hashes)
        hints = _hints.of_request(request)
        if hints is not None and hints.path:
            return ("p", hints.namespace) + truncated_key(hints.path)
        if hints is not None and hints.group:
            return ("g", hints.group)
    except Exception as exc:
        faults.record_failure("vllm_queue_key", exc)
    return ()


def _settings() -> tuple[bool, float]:
    from ..runtime import config

    cfg = config()
    return bool(cfg.schedule), float(cfg.schedule_max_wait_s)


class CacheAwareRequestQueue(_rq.RequestQueue):
    """See module docstring."""

    def __init__(self, max_wait_s: float | None = None, clock: Callable[[], float] = time.monotonic,
                 ordering: bool | None = None) -> None:
        if max_wait_s is None or ordering is None:
            enabled, wait = _settings()
            ordering = enabled if ordering is None else ordering
            max_wait_s = wait if max_wait_s is None else max_wait_s
        self._ordering = ordering
        self._front: deque = deque()
        self._sched: PrefixScheduler = PrefixScheduler(max_wait_s, clock=clock)

    # Adding --------------------------------------------------------------------
    def add_request(self, request: Any) -> None:
        # Without ordering (CP_ENGINE_SCHEDULE=0, installed for eviction tracking
        # only) every key is empty: one FIFO, exactly vLLM's FCFS order.
        try:
            self._sched.add(request, request_key(request) if self._ordering else ())
        except ValueError as exc:  # already waiting: keep the one copy, say so once
            faults.record_failure("vllm_queue_duplicate", exc)
        except Exception as exc:  # an odd key: queue it unkeyed (plain FIFO)
            faults.record_failure("vllm_queue_key", exc)
            self._sched.add(request, ())
        for observe in observers:
            faults.call_guarded("vllm_queue_observer", observe, request)
        # EngineCore's counters reach the API server's /metrics from here (rate-limited).
        channel.forward_metrics()

    def prepend_request(self, request: Any) -> None:
        self._front.appendleft(request)

    def prepend_requests(self, requests: Iterable[Any]) -> None:
        # Same as FCFSRequestQueue.extendleft: each one goes to the very front, so a
        # queue built by prepend_request (0.27–0.30) or a deque built by appendleft
        # (0.31+) comes back in its original order.
        for request in requests:
            self._front.appendleft(request)

    # Taking ----------------------------------------------------------------------
    def pop_request(self) -> Any:
        if self._front:
            return self._front.popleft()
        request = self._sched.pop()
        metrics.inc("queue_pops", 1)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("cp_engine queue: admit %s", getattr(request, "request_id", "?"))
        return request

    def peek_request(self) -> Any:
        if self._front:
            return self._front[0]
        if not self._sched:
            raise IndexError("peek from an empty queue")
        return self._sched.peek()

    # Removing --------------------------------------------------------------------
    def remove_request(self, request: Any) -> None:
        if self._sched.remove(request):
            return
        for i, queued in enumerate(self._front):
            if queued is request:
                del self._front[i]
                return
        raise ValueError("request is not in the queue")

    def remove_requests(self, requests: Iterable[Any]) -> None:
        gone = {id(r): r for r in requests}
        if self._front:
            self._front = deque(r for r in self._front if id(r) not in gone)
        for r in gone.values():
            self._sched.remove(r)

    # Reading ---------------------------------------------------------------------
    def __bool__(self) -> bool:
        return bool(self._front) or bool(self._sched)

    def __len__(self) -> int:
        return len(self._front) + len(self._sched)

    def __iter__(self) -> Iterator[Any]:
        yield from list(self._front)
        yield from self._sched.ordered()


class ObservedPriorityQueue(_rq.PriorityRequestQueue):
    """vLLM's priority queue, unchanged in order, that shows added requests to
    ``observers`` (eviction tracking works under ``--scheduling-policy priority``)."""

    def add_request(self, request: Any) -> None:
        super().add_request(request)
        for observe in observers:
            faults.call_guarded("vllm_queue_observer", observe, request)
        channel.forward_metrics()


# --------------------------------------------------------------------------- patching
def factory_wrapper(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    """wrapt wrapper of ``create_request_queue(policy)`` (rows ``queue_factory*`` of
    ``hooks/vllm/table.py``): our queue for FCFS, the observed priority queue when
    someone observes, vLLM's own otherwise or on any failure."""
    try:
        policy = kwargs["policy"] if "policy" in kwargs else args[0]
        if policy == _rq.SchedulingPolicy.FCFS:
            return CacheAwareRequestQueue()
        if policy == _rq.SchedulingPolicy.PRIORITY and observers:
            return ObservedPriorityQueue()
    except Exception as exc:  # fail open: vLLM's own queue
        faults.record_failure("vllm_queue_factory", exc)
    return wrapped(*args, **kwargs)
