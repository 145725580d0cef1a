"""One simulated serving replica: a token-bounded LRU prefix cache and, optionally, the
plugin's online index in front of it.

``PromptCache`` models an engine's prefix cache at the granularity of prompt units
(context blocks, the system prompt, the question), each weighing its tokens. A prompt
is served from the longest cached prefix of its units; then its whole path is cached
and touched. Over ``capacity`` tokens, least-recently-used leaves go first (a unit is
only reusable while its whole prefix is cached, as in vLLM and SGLang), except the
path just served. ``access`` returns the served tokens and the unit paths evicted, so
the plugin's index can drop them as eviction sync does in a live server.

``Replica`` puts the plugin (``ContextIndex``: the same online reordering the API
server runs) in front of the cache when ``plugin`` is on; off, blocks go out in
retrieval order.
"""
from __future__ import annotations

import heapq
from typing import Hashable, Sequence

from cp_engine.index import ContextIndex


class PromptCache:
    def __init__(self, capacity: int | None = None):
        if capacity is not None and capacity < 1:
            raise ValueError("capacity must be >= 1 or None")
        self.capacity = capacity
        self.used = 0  # tokens held
        self._kids: dict[int, dict[Hashable, int]] = {0: {}}
        self._up: dict[int, tuple[int, Hashable, int]] = {}  # node -> (parent, unit, tokens)
        self._stamp: dict[int, int] = {}
        self._clock = 0
        self._next = 1
        self._leaves: list[tuple[int, int]] = []  # (stamp, node), lazily invalidated

    def access(self, units: Sequence[Hashable], tokens: Sequence[int]) -> tuple[int, list[list[Hashable]]]:
        """Serve one prompt: (tokens served from cache, evicted unit paths)."""
        self._clock += 1
        node, served, hit, path = 0, 0, True, []
        for unit, n in zip(units, tokens):
            child = self._kids[node].get(unit) if hit else None
            if child is None:
                hit = False
                child = self._next
                self._next += 1
                self._kids[node][unit] = child
                self._kids[child] = {}
                self._up[child] = (node, unit, n)
                self.used += n
            else:
                served += n
            self._stamp[child] = self._clock
            path.append(child)
            node = child
        if path:
            heapq.heappush(self._leaves, (self._clock, path[-1]))
        return served, self._evict(set(path))

    def _evict(self, keep: set[int]) -> list[list[Hashable]]:
        evicted, held = [], []
        while self.capacity is not None and self.used > self.capacity and self._leaves:
            stamp, node = heapq.heappop(self._leaves)
            if node not in self._up or self._stamp[node] != stamp or self._kids[node]:
                continue  # stale entry: touched since, already gone, or no longer a leaf
            if node in keep:
                held.append((stamp, node))
                continue
            evicted.append(self.path(node))
            parent, unit, n = self._up.pop(node)
            del self._kids[parent][unit], self._kids[node], self._stamp[node]
            self.used -= n
            if parent and not self._kids[parent]:
                heapq.heappush(self._leaves, (self._stamp[parent], parent))
        for item in held:
            heapq.heappush(self._leaves, item)
        return evicted

    def path(self, node: int) -> list[Hashable]:
        out = []
        while node:
            parent, unit, _ = self._up[node]
            out.append(unit)
            node = parent
        return out[::-1]


class Replica:
    """Prefix cache plus (``plugin``) the plugin's online reordering index.

    ``serve(blocks, tokens, head, tail)`` renders the blocks, sends
    ``head + blocks + tail`` (system prompt, context, question: (unit, tokens) pairs)
    through the cache and returns (prompt tokens, tokens served from cache). Block
    units are ints (block ids); head and tail units must not be ints.
    """

    def __init__(self, capacity: int | None, plugin: bool):
        self.cache = PromptCache(capacity)
        self.index = ContextIndex() if plugin else None
        self.requests = 0

    def render(self, blocks: Sequence[int], tokens: Sequence[int]) -> list[int]:
        """Positions of ``blocks`` in the order this replica sends them."""
        if self.index is None:
            return list(range(len(blocks)))
        return self.index.best_order(blocks, token_lengths=tokens)

    def serve(self, blocks: Sequence[int], tokens: Sequence[int], head: Sequence[tuple[Hashable, int]] = (),
              tail: Sequence[tuple[Hashable, int]] = ()) -> tuple[int, int]:
        order = self.render(blocks, tokens)
        ids, lens = [blocks[i] for i in order], [tokens[i] for i in order]
        self.requests += 1
        if self.index is not None:
            self.index.record(self.requests, ids, token_lengths=lens)
        units = [u for u, _ in head] + ids + [u for u, _ in tail]
        weights = [n for _, n in head] + lens + [n for _, n in tail]
        served, evicted = self.cache.access(units, weights)
        if self.index is not None:
            self._sync(evicted, len(head))
        return sum(weights), served

    def _sync(self, evicted: list[list[Hashable]], head: int) -> None:
        """Eviction sync: the index forgets the block prefixes the cache dropped.

        A path ends at the evicted unit: a block (drop that block path), the head
        (nothing behind it is reusable: reset) or a tail unit (a question: no block lost).
        """
        for path in evicted:
            if len(path) <= head:
                self.index.reset()
            elif isinstance(path[-1], int):
                self.index.evict_path(path[head:])
