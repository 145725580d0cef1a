"""Online context index: which block sequences the engine's prefix cache holds.

A prefix tree over block ids (``BlockTrie``) with one subtree per namespace (the
prompt text before the blocks, e.g. model + system prompt, decides which cached
prefixes can be shared at all). Every recorded request owns one reference along its
path; each path node keeps its token span in that request's prompt so an engine
eviction at token ``t`` maps to the first block that ends after ``t``.

Contracts:
- ``best_order(blocks, token_lengths=None)`` returns indices into ``blocks``: first
  the order of the longest token-weighted prefix already indexed, then the other
  blocks by what a later request could share of them: times seen × token length
  (times seen alone without lengths), ties in given order. The same block set,
  lengths and index state always give the same order.
- ``record`` adds one reference along the request's path; ``forget`` drops it.
- ``evict_path`` / ``evict_from_token`` remove a prefix and everything below it: the
  engine cannot hit anything under an evicted block. No node ever claims a prefix
  that was evicted.
- At most ``max_nodes`` nodes: beyond that, least recently used requests are
  forgotten (their unshared tails are the engine's least recently used leaves).
- With ``max_tokens``, at most that many tokens in the indexed paths (each node's
  span counted once, however many requests share it), trimmed the same way: the
  bound for an engine that sends no eviction events (the rewrite proxy), set to the
  size of its prefix cache.
- All public methods are thread-safe.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, Iterable, Sequence

from .trie import ROOT, BlockTrie

_NS = "\x00ns"  # namespace nodes are keyed by (_NS, name): never equal to a block id


@dataclass
class _Recorded:
    nodes: list[int]
    gens: list[int]
    ends: list[int]  # token end offset of each path node (namespace node excluded)
    namespace: str


def _deepest_contained(trie: BlockTrie, members, start: int, budget: int) -> int:
    """Deepest node below ``start`` whose path uses only ``members``: the index's walk.

    Same answer as ``BlockTrie.deepest_contained(members, start, budget,
    prefer=last_use)`` when the budget does not bind (key: path weight, then the more
    recently used node, then the older node). Cheaper per node, which is what keeps a
    100k-request index under 1 ms: a child is pushed only if it has children and its
    subtree can beat the best so far (so ``budget`` counts expansions, not leaves),
    single-child nodes skip the scan, and a child's key is built only when its weight
    can win. Tallest subtree first, as there.
    """
    height, dweight, children, last_use = trie.height, trie.depth_weight, trie.children, trie.last_use
    best = start
    best_w, best_use = dweight[start], last_use[start] if start else 0
    stack = [start]
    visited = 0
    nmembers = len(members)
    pop, push = stack.pop, stack.append
    while stack and visited < budget:
        node = pop()
        if height[node] < best_w:
            continue  # nothing below can be deeper than the best so far
        visited += 1
        kids = children[node]
        nk = len(kids)
        if nk == 1:  # chains are most nodes: no list, no sort
            for b, c in kids.items():
                if b not in members:
                    break
                w = dweight[c]
                if w > best_w or (w == best_w and (last_use[c], -c) > (best_use, -best)):
                    best, best_w, best_use = c, w, last_use[c]
                if children[c] and height[c] >= best_w:
                    push(c)
            continue
        if nk <= nmembers:
            found = [c for b, c in kids.items() if b in members]
        else:
            found = [c for b in members if (c := kids.get(b)) is not None]
        if not found:
            continue
        for c in found:
            w = dweight[c]
            if w > best_w or (w == best_w and (last_use[c], -c) > (best_use, -best)):
                best, best_w, best_use = c, w, last_use[c]
        if len(found) > 1:
            found.sort(key=lambda c: (height[c], -c))
        for c in found:
            if children[c] and height[c] >= best_w:
                push(c)
    return best


class ContextIndex:
    def __init__(self, max_nodes: int = 200_000, max_tracked_blocks: int = 1_000_000,
                 search_budget: int = 128, max_tokens: int | None = None):
        if max_nodes < 1:
            raise ValueError("max_nodes must be >= 1")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        self.max_nodes = max_nodes
        self.max_tokens = max_tokens
        # Nodes a query may expand: bounds latency on bushy tries (many orders of the
        # same popular blocks). 128, measured with 100k indexed zipf requests
        # (`nice -n 5 python -m benchmarks.micro.online --workloads zipf --configs all
        # --budget 128|256`, benchmarks/results/online.md): prefix hit 0.380 vs 0.381
        # at 256, query CPU-time p99 0.98 vs 1.90 ms on the shared 2-core machine.
        self.search_budget = search_budget
        self._trie = BlockTrie()
        self._requests: OrderedDict[Hashable, _Recorded] = OrderedDict()
        self._freq: dict[Hashable, int] = {}
        self._max_tracked = max_tracked_blocks
        self._clock = 0
        self._lock = threading.RLock()
        self.evicted_nodes = 0

    # -- introspection ---------------------------------------------------------
    def __len__(self) -> int:
        """Live block nodes (namespace nodes included)."""
        return self._trie.size

    @property
    def requests(self) -> int:
        return len(self._requests)

    @property
    def tokens(self) -> int:
        """Tokens spanned by the live nodes, each counted once."""
        return int(round(self._trie.total_weight))

    def paths(self, namespace: str = "") -> list[list[Hashable]]:
        """Every indexed root-to-leaf block path of ``namespace`` (for tests/debugging)."""
        with self._lock:
            ns = self._trie.children[ROOT].get((_NS, namespace))
            if ns is None:
                return []
            out, stack = [], [(ns, [])]
            while stack:
                node, prefix = stack.pop()
                kids = self._trie.children[node]
                if not kids and prefix:
                    out.append(prefix)
                for b, c in kids.items():
                    stack.append((c, prefix + [b]))
            return out

    def knows_namespace(self, namespace: str = "") -> bool:
        """Whether any recorded path lives in ``namespace`` (something to align to)."""
        with self._lock:
            return (_NS, namespace) in self._trie.children[ROOT]

    def aligned_length(self, blocks: Sequence[Hashable], namespace: str = "") -> int:
        """How many of ``blocks`` (in any order) ``best_order`` would put on an indexed
        path: the depth of the deepest indexed path in ``namespace`` that uses only them."""
        with self._lock:
            first_pos: dict[Hashable, int] = {}
            for i, b in enumerate(blocks):
                first_pos.setdefault(b, i)
            node = self._head_node(first_pos, namespace)
            return 0 if node is None else len(self._trie.blocks_to(node)) - 1

    def match_length(self, blocks: Sequence[Hashable], namespace: str = "") -> int:
        """How many leading blocks of ``blocks`` (in this order) are indexed."""
        with self._lock:
            node = self._trie.children[ROOT].get((_NS, namespace))
            count = 0
            while node is not None and count < len(blocks):
                node = self._trie.children[node].get(blocks[count])
                if node is not None:
                    count += 1
            return count

    # -- queries ---------------------------------------------------------------
    def best_order(self, blocks: Sequence[Hashable], namespace: str = "",
                   token_lengths: Sequence[int] | None = None) -> list[int]:
        """Indices of ``blocks`` in the order to send them (see module contract)."""
        if token_lengths is not None and len(token_lengths) != len(blocks):
            raise ValueError(f"token_lengths has {len(token_lengths)} entries for {len(blocks)} blocks")
        with self._lock:
            first_pos: dict[Hashable, int] = {}
            for i, b in enumerate(blocks):
                first_pos.setdefault(b, i)
            node = self._head_node(first_pos, namespace)
            head = [] if node is None else [first_pos[b] for b in self._trie.blocks_to(node)[1:]]
            taken = set(head)
            freq = self._freq
            # Tokens, not blocks, are what the cache serves: a long block seen as often
            # as a short one is worth more at the front. Zipf RAG: 0.6-1.4% fewer
            # recomputed tokens than ordering by count alone with requests one at a
            # time (token_sim on-seq, N=200-400), 0.5% live at N=400 with 64 in flight
            # (benchmarks/results/engine.md). Without lengths every block weighs 1.
            weight = token_lengths if token_lengths is not None else [1] * len(blocks)
            rest = sorted((i for i in first_pos.values() if i not in taken),
                          key=lambda i: (-freq.get(blocks[i], 0) * weight[i], i))
            order = head + rest
            seen = set(order)
            # Repeated blocks: extra copies keep their relative order after the rest.
            order.extend(i for i in range(len(blocks)) if i not in seen)
            return order

    def _head_node(self, first_pos: dict, namespace: str) -> int | None:
        """Deepest indexed node whose path uses only the query's blocks (lock held)."""
        ns = self._trie.children[ROOT].get((_NS, namespace))
        if ns is None or not first_pos:
            return None
        return _deepest_contained(self._trie, first_pos, ns, self.search_budget)

    # -- updates ---------------------------------------------------------------
    def record(self, request_id: Hashable, ordered_blocks: Sequence[Hashable], namespace: str = "",
               token_lengths: Sequence[int] | None = None, base_offset: int = 0) -> None:
        """Index ``ordered_blocks`` as sent for ``request_id`` (re-recording replaces)."""
        if token_lengths is not None and len(token_lengths) != len(ordered_blocks):
            raise ValueError("token_lengths must match ordered_blocks")
        lens = list(token_lengths) if token_lengths is not None else [1] * len(ordered_blocks)
        with self._lock:
            self._clock += 1
            self._forget_locked(request_id)
            trie = self._trie
            ns = trie.children[ROOT].get((_NS, namespace))
            if ns is None:
                ns = trie._new(ROOT, (_NS, namespace), 0.0)
            nodes = trie.insert(ordered_blocks, lens, start=ns, now=self._clock)
            ends, pos = [], base_offset
            for n in lens:
                pos += n
                ends.append(pos)
            self._requests[request_id] = _Recorded(nodes, [trie.gen[n] for n in nodes], ends, namespace)
            self._count(ordered_blocks)
            self._trim_locked()

    def forget(self, request_ids: Iterable[Hashable]) -> int:
        """Drop the references of finished/unknown requests; returns how many were known."""
        with self._lock:
            return sum(self._forget_locked(r) for r in request_ids)

    def evict_path(self, path: Sequence[Hashable], namespace: str = "") -> int:
        """The engine evicted the prefix ``path``: remove its node and subtree."""
        with self._lock:
            ns = self._trie.children[ROOT].get((_NS, namespace))
            node = None if ns is None or not path else self._trie.find(path, start=ns)
            return self._remove_locked(node)

    def evict_from_token(self, request_id: Hashable, token: int) -> int:
        """The engine evicted ``request_id``'s prompt from token ``token`` on."""
        with self._lock:
            rec = self._requests.get(request_id)
            if rec is None:
                return 0
            for i, end in enumerate(rec.ends):
                node_i = i + 1  # nodes[0] is the namespace node
                if end > token and node_i < len(rec.nodes):
                    n = rec.nodes[node_i]
                    if self._trie.is_live(n) and self._trie.gen[n] == rec.gens[node_i]:
                        return self._remove_locked(n)
                    return 0
            return 0

    def evict(self, request_ids: Iterable[Hashable] = (), nodes: Iterable[int] = ()) -> int:
        """Forget ``request_ids`` and remove ``nodes`` (with subtrees); returns nodes removed."""
        with self._lock:
            before = self._trie.size
            for r in request_ids:
                self._forget_locked(r)
            for n in nodes:
                self._remove_locked(n)
            return before - self._trie.size

    def reset(self) -> None:
        """The engine dropped its whole prefix cache."""
        with self._lock:
            self._trie = BlockTrie()
            self._requests.clear()

    # -- internals -------------------------------------------------------------
    def _forget_locked(self, request_id: Hashable) -> bool:
        rec = self._requests.pop(request_id, None)
        if rec is None:
            return False
        self._trie.release(rec.nodes, rec.gens)
        return True

    def _remove_locked(self, node: int | None) -> int:
        if node is None or node == ROOT or not self._trie.is_live(node):
            return 0
        removed = len(self._trie.remove_subtree(node))
        self.evicted_nodes += removed
        return removed

    def _over_bound(self) -> bool:
        trie = self._trie
        return trie.size > self.max_nodes or (
            self.max_tokens is not None and trie.total_weight > self.max_tokens)

    def _trim_locked(self) -> None:
        # Oldest requests first; their unshared tails are the least recently used leaves.
        while self._over_bound() and self._requests:
            _, rec = self._requests.popitem(last=False)
            self._trie.release(rec.nodes, rec.gens)
        if self._over_bound():  # only force-removed leftovers can remain
            self.reset()

    def _count(self, blocks: Iterable[Hashable]) -> None:
        freq = self._freq
        for b in blocks:
            freq[b] = freq.get(b, 0) + 1
        if len(freq) > self._max_tracked:
            # Halve every count and drop the ones that reach zero: bounded memory,
            # recent popularity dominates.
            self._freq = {b: c // 2 for b, c in freq.items() if c > 1}
