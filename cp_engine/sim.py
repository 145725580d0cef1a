"""Block-level prefix-cache simulator (for tests, benchmarks and capacity planning).

Models an engine's radix/prefix cache at the granularity of whole context blocks:
a request hits the longest prefix of its block sequence that is in the cache, then
its whole sequence is inserted. With ``capacity`` set, the cache holds at most that
many blocks and evicts least-recently-used leaves first, as vLLM's and SGLang's
prefix caches do (a block can only be reused while its whole prefix is cached).
The running request's own path is never evicted while it is being inserted.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Hashable, Iterable, Mapping, Sequence


@dataclass(frozen=True)
class SimResult:
    hits: float
    total: float
    requests: int

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.total if self.total else 0.0


class PrefixCacheSim:
    """Incremental simulator; ``access(seq)`` returns the weighted hit for one request."""

    def __init__(self, capacity: int | None = None, weights: Mapping[Hashable, float] | None = None):
        if capacity is not None and capacity < 0:
            raise ValueError("capacity must be >= 0 or None")
        self.capacity = capacity
        self.weights = weights
        self._children: list[dict] = [{}]  # node 0 is the root
        self._parent: list[int] = [-1]
        self._block: list[Hashable] = [None]
        self._last: list[int] = [0]
        self._alive: list[bool] = [True]
        self._free: list[int] = []
        self._size = 0  # cached blocks (root excluded)
        self._clock = 0
        self._leaf_heap: list[tuple[int, int]] = []

    def __len__(self) -> int:
        return self._size

    def _weight(self, block: Hashable) -> float:
        return 1.0 if self.weights is None else float(self.weights.get(block, 1.0))

    def _new_node(self, parent: int, block: Hashable) -> int:
        if self._free:
            node = self._free.pop()
            self._children[node] = {}
            self._parent[node] = parent
            self._block[node] = block
            self._alive[node] = True
        else:
            node = len(self._parent)
            self._children.append({})
            self._parent.append(parent)
            self._block.append(block)
            self._last.append(0)
            self._alive.append(True)
        self._children[parent][block] = node
        self._size += 1
        return node

    def access(self, seq: Sequence[Hashable]) -> float:
        """Serve one request: count its cached prefix, then insert it (LRU-touching its path)."""
        self._clock += 1
        now = self._clock
        node, hit, matching = 0, 0.0, True
        path = []
        for block in seq:
            child = self._children[node].get(block) if matching else None
            if child is None:
                matching = False
                child = self._new_node(node, block)
            else:
                hit += self._weight(block)
            self._last[child] = now
            path.append(child)
            node = child
        if path and self.capacity is not None:
            heapq.heappush(self._leaf_heap, (now, path[-1]))
            self._evict(protect=set(path))
        return hit

    def _evict(self, protect: set[int]) -> None:
        deferred = []
        while self._size > self.capacity and self._leaf_heap:
            stamp, node = heapq.heappop(self._leaf_heap)
            # Lazy heap: skip entries that are stale (node touched since, gone, or not a leaf).
            if not self._alive[node] or self._last[node] != stamp or self._children[node]:
                continue
            if node in protect:
                deferred.append((stamp, node))
                continue
            parent = self._parent[node]
            del self._children[parent][self._block[node]]
            self._alive[node] = False
            self._free.append(node)
            self._size -= 1
            if parent != 0 and not self._children[parent]:
                heapq.heappush(self._leaf_heap, (self._last[parent], parent))
        for item in deferred:
            heapq.heappush(self._leaf_heap, item)


def simulate(
    sequences: Iterable[Sequence[Hashable]],
    capacity: int | None = None,
    weights: Mapping[Hashable, float] | None = None,
) -> SimResult:
    """Replay ``sequences`` in the given (execution) order through a prefix cache."""
    sim = PrefixCacheSim(capacity=capacity, weights=weights)
    hits = total = 0.0
    count = 0
    for seq in sequences:
        hits += sim.access(seq)
        total += sum(sim._weight(b) for b in seq)
        count += 1
    return SimResult(hits=hits, total=total, requests=count)


def bound(sequences: Iterable[Sequence[Hashable]], weights: Mapping[Hashable, float] | None = None) -> float:
    """Upper bound on any block-level cache hit ratio: 1 - unique/total (weighted)."""
    seen: set = set()
    total = unique = 0.0
    for seq in sequences:
        for b in seq:
            w = 1.0 if weights is None else float(weights.get(b, 1.0))
            total += w
            if b not in seen:
                seen.add(b)
                unique += w
    return 1.0 - unique / total if total else 0.0
