"""Cache-aware waiting queue for vLLM's v1 scheduler, installed through its factory.

Contract:
- ``CacheAwareRequestQueue`` implements vLLM's abstract ``RequestQueue`` completely.
  Prepended requests (preempted or skipped ones, which vLLM puts back at the head)
  sit in a front deque served first, with ``FCFSRequestQueue``'s exact prepend
  semantics; everything added with ``add_request`` is ordered by
  ``hooks.scheduling.PrefixScheduler`` (shared prefix depth-first, aging bound
  ``CP_ENGINE_SCHEDULE_MAX_WAIT_S``). Iteration yields the order pops would take.
- prefix key of a request: its prompt's chained block hashes (what the prefix cache
  matches on); without hashes (prefix caching off, prompt under one block) the
  API server's hints (namespace + context-block path, else group key); else none.
- ``install()`` replaces ``create_request_queue`` in ``request_queue`` and, when
  already imported, in ``scheduler`` (which imports the name), so every scheduler
  class vLLM builds gets this queue for the FCFS policy; the priority policy keeps
  vLLM's order (``ObservedPriorityQueue`` only reports added requests to
  ``observers``). ``uninstall()`` restores the originals. Both are idempotent and fail open.
- each added request is shown to ``observers`` (eviction tracking) under a guard;
  with ``CP_ENGINE_SCHEDULE=0`` the queue (installed for those observers) keeps
  vLLM's FCFS order exactly.
"""
from __future__ import annotations

import logging
import sys
import time
from collections import deque
from typing import Any, Callable, Iterable, Iterator

from vllm.v1.core.sched import request_queue as _rq

from .. import channel, faults, ledger, metrics
from ..scheduling import PrefixScheduler, chained_key, truncated_key
from . import xargs

__all__ = ["CacheAwareRequestQueue", "ObservedPriorityQueue", "request_key", "install", "uninstall", "installed", "PATCHES"]

logger = logging.getLogger("cp_engine.hooks")

_RQ_MODULE = "vllm.v1.core.sched.request_queue"
_SCHED_MODULE = "vllm.v1.core.sched.scheduler"
_ATTR = "create_request_queue"

PATCHES = tuple(
    ledger.register(ledger.Patch(
        engine="vllm",
        target=f"{module}.{_ATTR}",
        why="serve waiting requests that share a prompt prefix consecutively (depth-first, with aging)",
        how="module attribute replaced by a factory returning CacheAwareRequestQueue for the FCFS policy",
        min_version="0.27.0",
        max_version="0.33",
        upstream="vllm/v1/core/sched/request_queue.py (RequestQueue, create_request_queue)",
        remove_when="vLLM offers a pluggable waiting-queue policy (or an equivalent cache-aware one)",
        feature="schedule",
    ))
    for module in (_RQ_MODULE, _SCHED_MODULE)
)

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
        params = getattr(request, "sampling_params", None)
        hints = xargs.read_hints(getattr(params, "extra_args", None)) if params is not None else None
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
_originals: dict[str, Callable] = {}
# vLLM's own factory, kept for good: a stale reference to ours (a module that copied
# the name while we were installed) must still work after uninstall.
_vllm_factory: Callable = _rq.create_request_queue


def _factory(policy: Any, *args: Any, **kwargs: Any) -> Any:
    original = _originals.get(_RQ_MODULE, _vllm_factory)
    try:
        if policy == _rq.SchedulingPolicy.FCFS:
            return CacheAwareRequestQueue()
        if policy == _rq.SchedulingPolicy.PRIORITY and observers:
            return ObservedPriorityQueue()
    except Exception as exc:  # fail open: vLLM's own queue
        faults.record_failure("vllm_queue_factory", exc)
    return original(policy, *args, **kwargs)


_factory.__cp_engine__ = True  # type: ignore[attr-defined]


def _ours(fn: Any) -> bool:
    return getattr(fn, "__cp_engine__", False) is True


def installed() -> bool:
    return _ours(getattr(_rq, _ATTR, None))


def install() -> bool:
    """Patch the factory (idempotent); False when skipped or failed (engine unchanged)."""
    try:
        import vllm

        if not ledger.supported(PATCHES[0], vllm.__version__):
            faults.log_once("vllm_queue_version", "cp_engine: vLLM %s outside the queue patch's range; "
                            "waiting queue left unchanged", vllm.__version__)
            return False
        current = getattr(_rq, _ATTR)
        if not _ours(current):
            _originals[_RQ_MODULE] = current
            setattr(_rq, _ATTR, _factory)
        sched = sys.modules.get(_SCHED_MODULE)
        if sched is not None and not _ours(getattr(sched, _ATTR, None)):
            _originals[_SCHED_MODULE] = getattr(sched, _ATTR)
            setattr(sched, _ATTR, _factory)
        # A scheduler module imported from now on binds the patched name itself.
        return True
    except Exception as exc:
        faults.record_failure("vllm_queue_install", exc)
        return False


def uninstall() -> None:
    """Restore vLLM's factory everywhere it was replaced (idempotent). Queues already
    built keep working: they are complete RequestQueue implementations."""
    for name in (_SCHED_MODULE, _RQ_MODULE):
        module = sys.modules.get(name)
        if module is not None and _ours(getattr(module, _ATTR, None)):
            setattr(module, _ATTR, _originals.get(name, _originals.get(_RQ_MODULE, _vllm_factory)))
    _originals.clear()
