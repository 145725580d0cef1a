"""Pick the data-parallel engine rank for a block-marked request (``--data-parallel-size``).

Each DP rank is its own engine core with its own prefix cache, so the API server keeps
one index view per rank: a rewritten request's namespace gets the suffix ``|dp<rank>``
(``ranked_namespace``). Everything EngineCore sends back about the request (evictions,
the ``record`` echo) carries that namespace from the request's hints, so a block evicted
by one rank leaves the other rank's view alone with no new message field.

Contract:
- ``dp_size(serving)``: the engine's data-parallel size as the API server's engine
  client reports it; 1 when it cannot be read (the feature then stays off).
- ``choose_rank(index, ids, namespace, size, asked, admissible)``: ``asked`` (a client's
  or a router's ``X-data-parallel-rank``) when it names a rank in ``[0, size)``; else,
  of the ``admissible`` ranks (default all), the one whose view aligns the most of
  ``ids`` (``ContextIndex.aligned_length``). Ties (a block set no admissible rank holds
  included) go to the first of them counting up from a rank fixed by the block set
  itself, so the same documents in any order land together and different sets spread
  over the ranks.
- ``RankLoads(size, factor)``: the requests in flight on each rank that this process
  pinned, admitted as ``cp_engine.scaleout.routing.LoadBound`` with ``factor``
  (``CP_ENGINE_DP_LOAD_FACTOR``, default 1.25): a rank is admissible while it would hold
  at most ``ceil(factor * (n + 1) / size)`` of the n counted requests. ``take(rank)``
  counts one and returns its ``Held``; ``Held.release()`` uncounts it, once however
  often it is called, and a ``Held`` dropped unreleased is uncounted when it is
  garbage-collected, so no path can leave a count behind. Releases are queued and
  applied at the next choice, never inside the garbage collector. ``rank_loads(size)``
  is this process's one instance.
- ``route(raw_request, rank)``: sets the request's ``X-data-parallel-rank`` header, the
  one input vLLM's OpenAI server reads to pin a request to a rank.
- ``RankChoice.for_request(serving, raw_request, index)``: None with one rank or no HTTP
  request; else ``namespace(ns, ids)`` picks the rank among the admissible ones and
  returns the ranked namespace, and ``pin()`` routes the request there and counts it
  (call it last, with the other assignments; a rewrite that fails before it pins and
  counts nothing). The count's ``Held`` waits in the request's ASGI scope until
  ``take_held(raw_request)`` hands it to the serving wrapper, which releases it when the
  request finishes (``hooks/vllm/serving_patch.py``).

What is counted: only requests this API server pinned (block-marked requests, asked
ranks included, which are honoured even past the bound). Requests without blocks pass
through to vLLM's own balancer uncounted, and each API server (``--api-server-count``,
or the two that ``vllm serve`` starts with DP 2) counts its own share only. A rank an
asked rank pushed past the bound is not chosen again until it drains.
"""
from __future__ import annotations

import hashlib
import threading
import weakref
from collections import deque
from typing import Any, Hashable, Sequence

from cp_engine.scaleout.routing import LoadBound

from .. import runtime

__all__ = ["HEADER", "dp_size", "asked_rank", "ranked_namespace", "choose_rank", "RankLoads", "Held",
           "rank_loads", "route", "take_held", "RankChoice"]

HEADER = "x-data-parallel-rank"


def dp_size(serving: Any) -> int:
    try:
        size = int(serving.engine_client.vllm_config.parallel_config.data_parallel_size)
    except (AttributeError, TypeError, ValueError):
        return 1
    return size if size > 1 else 1


def asked_rank(headers: Any) -> int | None:
    """The rank a client or router asked for, or None (absent or not an integer)."""
    try:
        value = headers.get(HEADER) if headers is not None else None
        return int(value) if value is not None else None
    except (AttributeError, TypeError, ValueError):
        return None


def ranked_namespace(namespace: str, rank: int) -> str:
    return f"{namespace}|dp{rank}"


def _set_rank(ids: Sequence[Hashable], size: int) -> int:
    digest = hashlib.blake2b(repr(sorted(set(ids))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % size


def choose_rank(index: Any, ids: Sequence[Hashable], namespace: str, size: int, asked: int | None = None,
                admissible: Sequence[int] | None = None) -> int:
    if asked is not None and 0 <= asked < size:
        return asked
    home = _set_rank(ids, size)
    ranks = sorted(range(size) if admissible is None else admissible, key=lambda r: (r - home) % size)
    depths = {r: index.aligned_length(ids, ranked_namespace(namespace, r)) for r in ranks}
    return max(ranks, key=depths.__getitem__)  # the first of the deepest


class Held:
    """One request counted on ``rank``; ``release()`` uncounts it (see module docs)."""

    def __init__(self, finished: deque, rank: int):
        self.rank = rank
        # A finalizer runs its callback at most once, whether called or collected.
        self.release = weakref.finalize(self, finished.append, rank)
        self.release.atexit = False


class RankLoads:
    """Requests in flight per rank, pinned by this process (see module docs)."""

    def __init__(self, size: int, factor: float = 1.25):
        self.size = size
        self._bound = LoadBound(size, factor)
        self._lock = threading.Lock()
        self._finished: deque[int] = deque()  # released ranks; append is atomic in any thread

    def _drain(self) -> None:
        while self._finished:
            self._bound.release(self._finished.popleft())

    def admissible(self) -> list[int]:
        with self._lock:
            self._drain()
            return self._bound.admissible()

    def take(self, rank: int) -> Held:
        with self._lock:
            self._drain()
            self._bound.assign(rank)
        return Held(self._finished, rank)

    def in_flight(self) -> list[int]:
        with self._lock:
            self._drain()
            return list(self._bound.loads)


_shared: RankLoads | None = None
_shared_lock = threading.Lock()


def rank_loads(size: int) -> RankLoads:
    """This process's counts (one API server serves one engine, so one size)."""
    global _shared
    with _shared_lock:
        if _shared is None or _shared.size != size:
            _shared = RankLoads(size, runtime.config().dp_load_factor)
        return _shared


def route(raw_request: Any, rank: int) -> None:
    """Pin ``raw_request`` (a Starlette request) to ``rank`` through its header; its
    headers view is rebuilt from the scope on the next read."""
    scope = raw_request.scope
    kept = [(k, v) for k, v in scope.get("headers", []) if k.lower() != HEADER.encode()]
    scope["headers"] = kept + [(HEADER.encode(), str(rank).encode())]
    if "_headers" in vars(raw_request):
        del raw_request._headers


_HELD = "cp_engine.dp_held"  # the ASGI scope key of a pinned request's count


def take_held(raw_request: Any) -> Held | None:
    """The count ``RankChoice.pin`` left on ``raw_request``, removed from it; None if none."""
    scope = getattr(raw_request, "scope", None)
    return scope.pop(_HELD, None) if isinstance(scope, dict) else None


class RankChoice:
    """The rank of one request, picked when its namespace is asked for."""

    def __init__(self, raw_request: Any, index: Any, size: int, loads: RankLoads | None = None):
        self.raw_request, self.index, self.size = raw_request, index, size
        self.loads = loads if loads is not None else rank_loads(size)
        self.asked = asked_rank(getattr(raw_request, "headers", None))
        self.rank: int | None = None

    @classmethod
    def for_request(cls, serving: Any, raw_request: Any, index: Any,
                    loads: RankLoads | None = None) -> "RankChoice | None":
        if raw_request is None or not hasattr(raw_request, "scope"):
            return None
        size = dp_size(serving)
        return cls(raw_request, index, size, loads) if size > 1 else None

    def namespace(self, namespace: str, ids: Sequence[Hashable]) -> str:
        self.rank = choose_rank(self.index, ids, namespace, self.size, self.asked, self.loads.admissible())
        return ranked_namespace(namespace, self.rank)

    def pin(self) -> None:
        if self.rank is None:
            return
        if self.rank != self.asked:
            route(self.raw_request, self.rank)
        self.raw_request.scope[_HELD] = self.loads.take(self.rank)
