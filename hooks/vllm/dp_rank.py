"""Pick the data-parallel engine rank for a block-marked request (``--data-parallel-size``).

Each DP rank is its own engine core with its own prefix cache, so the API server keeps
one index view per rank: a rewritten request's namespace gets the suffix ``|dp<rank>``
(``ranked_namespace``). Everything EngineCore sends back about the request (evictions,
the ``record`` echo) carries that namespace from the request's hints, so a block evicted
by one rank leaves the other rank's view alone with no new message field.

Contract:
- ``dp_size(serving)``: the engine's data-parallel size as the API server's engine
  client reports it; 1 when it cannot be read (the feature then stays off).
- ``choose_rank(index, ids, namespace, size, asked)``: ``asked`` (a client's or a
  router's ``X-data-parallel-rank``) when it names a rank in ``[0, size)``; else the rank
  whose view aligns the most of ``ids`` (``ContextIndex.aligned_length``); ties (a block
  set no rank holds) go to a rank fixed by the block set itself, so the same documents
  in any order land together and different sets spread over the ranks.
- ``route(raw_request, rank)``: sets the request's ``X-data-parallel-rank`` header, the
  one input vLLM's OpenAI server reads to pin a request to a rank.
- ``RankChoice.for_request(serving, raw_request, index)``: None with one rank or no HTTP
  request; else ``namespace(ns, ids)`` picks the rank and returns the ranked namespace,
  and ``pin()`` routes the request there (call it last, with the other assignments).
"""
from __future__ import annotations

import hashlib
from typing import Any, Hashable, Sequence

__all__ = ["HEADER", "dp_size", "asked_rank", "ranked_namespace", "choose_rank", "route", "RankChoice"]

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


def choose_rank(index: Any, ids: Sequence[Hashable], namespace: str, size: int, asked: int | None = None) -> int:
    if asked is not None and 0 <= asked < size:
        return asked
    depths = [index.aligned_length(ids, ranked_namespace(namespace, r)) for r in range(size)]
    best = max(depths)
    if best == 0:
        return _set_rank(ids, size)
    return depths.index(best)


def route(raw_request: Any, rank: int) -> None:
    """Pin ``raw_request`` (a Starlette request) to ``rank`` through its header; its
    headers view is rebuilt from the scope on the next read."""
    scope = raw_request.scope
    kept = [(k, v) for k, v in scope.get("headers", []) if k.lower() != HEADER.encode()]
    scope["headers"] = kept + [(HEADER.encode(), str(rank).encode())]
    if "_headers" in vars(raw_request):
        del raw_request._headers


class RankChoice:
    """The rank of one request, picked when its namespace is asked for."""

    def __init__(self, raw_request: Any, index: Any, size: int):
        self.raw_request, self.index, self.size = raw_request, index, size
        self.asked = asked_rank(getattr(raw_request, "headers", None))
        self.rank: int | None = None

    @classmethod
    def for_request(cls, serving: Any, raw_request: Any, index: Any) -> "RankChoice | None":
        if raw_request is None or not hasattr(raw_request, "scope"):
            return None
        size = dp_size(serving)
        return cls(raw_request, index, size) if size > 1 else None

    def namespace(self, namespace: str, ids: Sequence[Hashable]) -> str:
        self.rank = choose_rank(self.index, ids, namespace, self.size, self.asked)
        return ranked_namespace(namespace, self.rank)

    def pin(self) -> None:
        if self.rank is not None and self.rank != self.asked:
            route(self.raw_request, self.rank)
