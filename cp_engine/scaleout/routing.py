"""Policies that pick a replica for each request (engine-free; simulations and tests).

Every policy has ``route(request) -> replica index`` and is deterministic: the same
requests in the same order give the same choices in every process.

- ``RoundRobin``: replica ``i mod R``; ignores the request.
- ``PrefixAware``: what a cache-aware router does with the prompt it sees. It keeps,
  per replica, a bounded LRU tree of the prompts it sent there (its belief of that
  replica's cache; ``ContextIndex`` with a token bound) and sends a request to the
  admissible replica whose tree matches the longest token prefix of it, when that
  match covers at least ``threshold`` of the prompt; otherwise to the admissible
  replica with the smallest tree (most room), as SGLang's and vllm-router's
  ``cache_aware`` policies do.
- ``BlockAffinity``: consistent hashing of the request's block-set key
  (``cp_engine.scaleout.key.key_hash``) on a ring of virtual nodes; from the key's
  point the ring is walked to the first admissible replica (consistent hashing with
  bounded loads). The key ignores block order, so the router needs no rendering.

Admissible: ``LoadBound``. With ``factor`` f >= 1, a replica may take the next request
only while its load stays within ``ceil(f * (n + 1) / R)``, n being the requests
counted so far (all of them, or the last ``window`` when given: a stand-in for the
requests in flight). Some replica is always admissible, so no policy ever blocks,
and no replica's load ever exceeds the bound. A caller that sees its requests finish
(``window`` None) counts the requests in flight instead: ``release`` uncounts one.
"""
from __future__ import annotations

import bisect
import hashlib
import math
from collections import deque
from dataclasses import dataclass
from typing import Hashable, Sequence

from ..index import ContextIndex


@dataclass(frozen=True)
class RouteRequest:
    """What a router knows of one request.

    ``units``: the prompt as the router sees it, in order (block ids for a block-level
    model of its text); ``tokens``: tokens of each unit; ``key``: the block-set key
    (``key_hash``), 0 when the request has no blocks.
    """

    units: tuple[Hashable, ...] = ()
    tokens: tuple[int, ...] = ()
    key: int = 0

    def __post_init__(self) -> None:
        if len(self.units) != len(self.tokens):
            raise ValueError(f"{len(self.units)} units but {len(self.tokens)} token counts")


class LoadBound:
    """Bounded-load admission over ``replicas`` (see module docs)."""

    def __init__(self, replicas: int, factor: float = 1.25, window: int | None = None):
        if replicas < 1:
            raise ValueError("replicas must be >= 1")
        if not factor >= 1.0:
            raise ValueError("factor must be >= 1 (below 1 no replica may be admissible)")
        if window is not None and window < 1:
            raise ValueError("window must be >= 1 or None")
        self.replicas, self.factor, self.window = replicas, factor, window
        self.loads = [0] * replicas
        self._recent: deque[int] = deque()

    @property
    def counted(self) -> int:
        return len(self._recent) if self.window is not None else sum(self.loads)

    def _slide(self) -> None:
        # The oldest in-flight request finishes before the next one is admitted.
        if self.window is not None and len(self._recent) >= self.window:
            self.loads[self._recent.popleft()] -= 1

    def limit(self) -> int:
        """Most requests one replica may hold once the next one is admitted."""
        self._slide()
        return math.ceil(self.factor * (self.counted + 1) / self.replicas)

    def admissible(self) -> list[int]:
        cap = self.limit()
        return [r for r, load in enumerate(self.loads) if load + 1 <= cap]

    def assign(self, replica: int) -> None:
        self._slide()
        self.loads[replica] += 1
        if self.window is not None:
            self._recent.append(replica)

    def release(self, replica: int) -> None:
        """A request ``assign`` counted on ``replica`` finished (``window`` None only: a
        window forgets its oldest request by itself)."""
        if self.window is not None:
            raise ValueError("a windowed bound forgets requests by itself; nothing to release")
        if self.loads[replica] < 1:
            raise ValueError(f"replica {replica} holds no request to release")
        self.loads[replica] -= 1


class RoundRobin:
    name = "round_robin"

    def __init__(self, replicas: int):
        if replicas < 1:
            raise ValueError("replicas must be >= 1")
        self.replicas, self._next = replicas, 0

    def route(self, request: RouteRequest) -> int:
        r = self._next
        self._next = (r + 1) % self.replicas
        return r


class PrefixAware:
    name = "prefix_aware"

    def __init__(self, replicas: int, tree_tokens: int, factor: float = 1.25, threshold: float = 0.5,
                 window: int | None = None):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError("threshold must be in [0, 1]")
        self.bound = LoadBound(replicas, factor, window)
        self.threshold = threshold
        self.trees = [ContextIndex(max_tokens=tree_tokens) for _ in range(replicas)]
        self._seq = 0

    def matched_tokens(self, replica: int, request: RouteRequest) -> int:
        return sum(request.tokens[:self.trees[replica].match_length(request.units)])

    def route(self, request: RouteRequest) -> int:
        loads = self.bound.loads
        allowed = self.bound.admissible()
        matched = {r: self.matched_tokens(r, request) for r in allowed}
        total = sum(request.tokens)
        best = max(allowed, key=lambda r: (matched[r], -loads[r], -r))
        if not (total and matched[best] > 0 and matched[best] >= self.threshold * total):
            best = min(allowed, key=lambda r: (self.trees[r].tokens, loads[r], r))
        self._seq += 1
        self.trees[best].record(self._seq, request.units, token_lengths=request.tokens)
        self.bound.assign(best)
        return best


def _ring_point(replica: int, vnode: int) -> int:
    data = f"{replica}:{vnode}".encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class BlockAffinity:
    name = "block_affinity"

    def __init__(self, replicas: int, factor: float = 1.25, vnodes: int = 64, window: int | None = None):
        if vnodes < 1:
            raise ValueError("vnodes must be >= 1")
        self.bound = LoadBound(replicas, factor, window)
        ring = sorted((_ring_point(r, v), r) for r in range(replicas) for v in range(vnodes))
        self._points = [p for p, _ in ring]
        self._owners = [r for _, r in ring]

    def home(self, key: int) -> int:
        """The replica owning ``key`` when every replica is admissible."""
        return self._owners[bisect.bisect_left(self._points, key) % len(self._points)]

    def route(self, request: RouteRequest) -> int:
        cap = self.bound.limit()
        loads, start = self.bound.loads, bisect.bisect_left(self._points, request.key)
        n = len(self._owners)
        for step in range(n):
            r = self._owners[(start + step) % n]
            if loads[r] + 1 <= cap:
                self.bound.assign(r)
                return r
        raise AssertionError("LoadBound admits some replica whenever factor >= 1")


POLICIES = ("round_robin", "prefix_aware", "block_affinity")


def make_policy(name: str, replicas: int, tree_tokens: int = 1 << 20, factor: float = 1.25,
                threshold: float = 0.5, window: int | None = None):
    """A policy by name (``POLICIES``) with the shared knobs."""
    if name == "round_robin":
        return RoundRobin(replicas)
    if name == "prefix_aware":
        return PrefixAware(replicas, tree_tokens, factor=factor, threshold=threshold, window=window)
    if name == "block_affinity":
        return BlockAffinity(replicas, factor=factor, window=window)
    raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")


def hottest_share(assignments: Sequence[int], replicas: int) -> float:
    """Share of requests that went to the busiest replica (1/R is perfectly even)."""
    if not assignments:
        return 0.0
    counts = [0] * replicas
    for r in assignments:
        counts[r] += 1
    return max(counts) / len(assignments)
