"""Offline batch planner: reorder each request's blocks and schedule the batch.

``plan_batch(contexts)`` returns a ``BatchPlan`` whose ``contexts[i]`` is a
permutation of ``contexts[i]`` and whose ``order`` is a permutation of
``range(len(contexts))``. Served in ``order``, the reordered requests share long
block prefixes, so an engine's prefix cache reuses their KV.

How: with an unbounded cache, blocks served from cache = total blocks − nodes of the
prefix tree of all served sequences, so the planner builds a small tree:
0. blocks held by a single request are set aside (they go last, in retrieval order):
   they can never be shared, and on real retrieval they are most of the blocks;
1. candidate trees: a frequency-greedy split (most valuable shared block first,
   recursively per group), and — where rarer shared blocks carry the sharing, as with
   real BM25 retrieval — bottom-up clustering that merges the most alike requests;
   with token lengths the candidates are compared by token weight (what the cache
   serves), else by node count;
2. local search: take one request out of the tree and put it back below the deepest
   node whose path it fully contains — this never grows the tree, and it repairs
   requests that the first pass tore from the group they share most with; it runs
   on the smaller candidate tree only;
3. a depth-first schedule, largest subtree first, so a bounded LRU cache still holds
   the shared prefix while its group runs.
No N×N matrix is built: work is proportional to the total number of blocks.
"""
from __future__ import annotations

import contextlib
import gc
import heapq
import itertools
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable, Hashable, Mapping, Sequence

import numpy as np

from .planner_counts import SharedCounts, best_counted
from .planner_overlap import first_partners, hot_rows
from .planner_postings import Postings
from .planner_reach import Membership, could_move
from .trie import ROOT, BlockTrie

try:  # the C loop behind Counter.update, without Counter's per-call checks
    from _collections import _count_elements
except ImportError:  # pragma: no cover - Pythons without the C helper
    def _count_elements(mapping: dict, iterable) -> None:
        get = mapping.get
        for x in iterable:
            mapping[x] = get(x, 0) + 1


@dataclass(frozen=True)
class BatchPlan:
    """Result of ``plan_batch``: per-request block order and execution order."""

    contexts: list[list]
    order: list[int]
    stats: dict = field(default_factory=dict, compare=False)

    def scheduled(self) -> list[list]:
        """Reordered contexts in execution order."""
        return [self.contexts[i] for i in self.order]


@dataclass(frozen=True)
class PartnerSearch:
    """A k-nearest-partner search the clustering can use instead of posting lists.

    The core has none of its own; a scoring backend supplies it (the overlap kernels:
    ``cp_engine.kernels.planning.PARTNER_SEARCH``, plugged into ``cp_engine.plan_batch``).
    ``find(sets, k, weights)``: for every request (a list of distinct dense block ids),
    the indices of up to ``k`` other requests sharing the most block weight
    (``weights[b]``: tokens of block ``b``), best first, -1 in empty slots.
    ``use_for(n)``: whether ``partners="auto"`` takes it for a batch of ``n`` requests
    whose hot blocks rule out the posting-list search.
    """

    find: Callable[[list[list[int]], int, list[float]], Sequence[Sequence[int]]]
    use_for: Callable[[int], bool]


def _validate(contexts) -> tuple[list[list], list[bool]]:
    """The contexts as lists, and whether each holds a block twice (TypeError where a
    context is not a list of hashable blocks)."""
    if isinstance(contexts, (str, bytes)) or not hasattr(contexts, "__len__"):
        raise TypeError("plan_batch expects a list of block lists")
    out = []
    repeats = []
    for i, ctx in enumerate(contexts):
        if type(ctx) is not list:  # (a list is only read: no copy)
            if isinstance(ctx, (str, bytes)) or not hasattr(ctx, "__iter__"):
                raise TypeError(f"contexts[{i}] must be a list of blocks, got {type(ctx).__name__}")
            ctx = list(ctx)
        try:
            repeats.append(len(set(ctx)) != len(ctx))  # the set hashes every block, in C
        except TypeError:
            for b in ctx:
                try:
                    hash(b)
                except TypeError:
                    raise TypeError(f"contexts[{i}] holds an unhashable block of type {type(b).__name__}") from None
            raise
        out.append(ctx)
    return out, repeats


def _weights_for(contexts: list[list], token_lengths, dense: dict) -> list[float]:
    """Per-dense-id token weight (1.0 each when no lengths are given)."""
    w = [1.0] * len(dense)
    if token_lengths is None:
        return w
    if isinstance(token_lengths, Mapping):
        for block, d in dense.items():
            w[d] = float(token_lengths.get(block, 1.0))
        return w
    if len(token_lengths) != len(contexts):
        raise ValueError("token_lengths must be a mapping or one list per context")
    for i, (ctx, lens) in enumerate(zip(contexts, token_lengths)):
        if len(lens) != len(ctx):
            raise ValueError(f"token_lengths[{i}] has {len(lens)} entries for {len(ctx)} blocks")
        for b, n in zip(ctx, lens):
            w[dense[b]] = float(n)
    return w


# Groups up to this size find a block's holders by looking at each member.
_GREEDY_SCAN_GROUP = 32


# The greedy split of a large group runs in NumPy when each request's blocks fit a
# table row of at most this many times the mean length (the table is the batch, padded).
_SPLIT_PAD = 4


class _SplitTable:
    """The greedy split of large groups in NumPy, over the batch as a padded table:
    each step takes the block worth most ((free holders - 1) x weight, ties to the
    lower id) and hands it to its free holders, as the heap of the general loop does.

    ``for_batch`` gives None where it does not apply: weights negative or not finite
    (there the heap's lazy order is not the value order) or lengths too uneven.
    """

    def __init__(self, postings: Postings, wv: np.ndarray, longest: int) -> None:
        sizes, blocks, indptr = postings.sizes, postings.blocks, postings.indptr
        self.n, self.universe = sizes.size, postings.freq.size
        # Row r: request r's blocks, padded with `universe` (a column that never counts).
        self.table = np.full((self.n, longest), self.universe, dtype=np.int64)
        self.table[postings.owner, np.arange(blocks.size) - indptr[postings.owner]] = blocks
        self.wv = np.append(wv[:self.universe], 0.0)
        self.postings = postings
        # Unit weights: a block's value is its count less one, so the first largest
        # count is the first largest value and no value array is kept.
        self.unit = bool(np.all(wv[:self.universe] == 1.0))

    @classmethod
    def for_batch(cls, postings: Postings, w: list[float]) -> "_SplitTable | None":
        sizes = postings.sizes
        longest = int(sizes.max()) if sizes.size else 0
        if not sizes.size or longest * sizes.size > _SPLIT_PAD * max(postings.blocks.size, 1):
            return None
        wv = np.asarray(w, dtype=np.float64)
        if wv.size < postings.freq.size or not np.all(np.isfinite(wv)) or wv.min(initial=0.0) < 0:
            return None
        return cls(postings, wv, longest)

    def split(self, group: list[int], whole: bool, w: list[float], rem: list[set[int]],
              prefix: list[list[int]], stack: list[list[int]]) -> tuple[int, float]:
        """Split ``group`` (``whole``: the batch, nothing taken yet); returns the
        (nodes, weight) handed out."""
        members = np.asarray(group, dtype=np.int64)
        if whole:
            count = np.append(self.postings.freq, 0)
        else:
            count = np.bincount(self.table[members].ravel(), minlength=self.universe + 1)
            count[prefix[group[0]]] = 0  # every member holds the group's prefix, taken already
        count[self.universe] = 0
        wv, table, unit = self.wv, self.table, self.unit
        value = count if unit else np.where(count > 1, (count - 1) * wv, -np.inf)
        free = np.zeros(self.n, dtype=bool)
        free[members] = True
        holders, starts = self.postings.holders, self.postings.lists()[1]
        nodes, weight = 0, 0.0
        while True:
            b = int(value.argmax())
            if count[b] < 2:
                return nodes, weight
            h = holders[starts[b]:starts[b + 1]]
            sub = h[free[h]]
            free[sub] = False
            taken = table[sub].ravel()
            np.subtract.at(count, taken, 1)
            if not unit:
                left = count[taken]
                value[taken] = np.where(left > 1, (left - 1) * wv[taken], -np.inf)
            _give(b, sub.tolist(), rem, prefix, stack)
            nodes += 1
            weight += w[b]


@dataclass
class _Greedy:
    """The greedy split's result: ``prefix[r]``, the shared prefix request ``r`` gets;
    ``rest[r]``, its other blocks; ``nodes`` and ``weight``, the prefix tree of all
    prefixes (a node per block each split or pair run hands out, and their weight)."""

    prefix: list[list[int]]
    rest: list[set[int]]
    nodes: int
    weight: float

    def tree(self, w: list[float] | None) -> tuple[int, float]:
        """``_tree_measure`` of the greedy orders (each prefix, then its rest), counted
        without building them: no rest block is ever shared (requests left with the same
        prefix share no rest block, and a request holding a block its group split on was
        taken by that split), so the tree is the prefix tree plus one node per rest block.
        ``w``: the weights (None: 1 each); the sum is in a different order than
        ``_tree_measure``'s, which is the same number only for whole weights."""
        nodes = self.nodes + sum(map(len, self.rest))
        if w is None:
            return nodes, float(nodes)
        return nodes, self.weight + sum(w[b] for left in self.rest for b in left)

    def orders(self, rank: list[int], sorted_from: list[int] | None = None) -> list[list[int]]:
        """Each request's greedy order: its prefix, then the rest most popular first.
        ``sorted_from``: filled with where each rest starts."""
        if sorted_from is not None:
            sorted_from.extend(map(len, self.prefix))
        return [head + _tail_order(list(left), rank) if left else list(head)
                for head, left in zip(self.prefix, self.rest)]


def _greedy_prefixes(sets: list[list[int]], w: list[float], postings: Postings | None = None) -> _Greedy:
    """Frequency-greedy split: the shared prefix each request gets from the greedy tree.

    ``postings``: the batch's postings of ``sets`` (the first group is the whole batch,
    whose postings they are).
    """
    prefix: list[list[int]] = [[] for _ in sets]
    rem = [set(s) for s in sets]
    stack = [list(range(len(sets)))]
    nodes, weight = 0, 0.0
    first = True
    table = None  # the NumPy split for large groups, where it applies
    unit = w.count(1.0) == len(w)  # (counted in C)
    while stack:
        group = stack.pop()
        if len(group) < 2:
            continue
        if len(group) == 2:
            # Two requests: the split takes their common blocks one per level, most
            # valuable first (value w[b], ties to the lower id), as one run.
            a, b = group
            common = rem[a] & rem[b]
            if common:
                run = sorted(common, key=lambda x: (-w[x], x))
                prefix[a] += run
                prefix[b] += run
                rem[a] -= common
                rem[b] -= common
                nodes += len(run)
                weight += sum(w[x] for x in run)
            continue
        # A small group counts its blocks in C and, at each pop, finds the block's free
        # holders by looking at each free member (a few); a large one keeps its
        # postings and counts up to date instead.
        small = len(group) <= _GREEDY_SCAN_GROUP
        whole = first and postings is not None  # the whole batch, nothing taken yet
        if first and postings is not None:
            table = _SplitTable.for_batch(postings, w)
        first = False
        if not small and table is not None:
            split = table.split(group, whole, w, rem, prefix, stack)
            nodes += split[0]
            weight += split[1]
            continue
        if small and unit:
            given = (_split_three_unit(group, rem, prefix, stack) if len(group) == 3
                     else _split_small_unit(group, rem, prefix, stack, len(w)))
            nodes += given
            weight += given  # (a sum of 1.0s: the same float)
            continue
        if small:
            counts = {}
            _count_elements(counts, itertools.chain.from_iterable(map(rem.__getitem__, group)))
            free = group
        else:
            if whole:  # the batch's postings
                holders, starts = postings.lists()
                postings_of = {b: holders[starts[b]:starts[b + 1]]
                               for b in np.flatnonzero(postings.freq > 1).tolist()}
            else:
                postings_of = defaultdict(list)
                for r in group:
                    for b in rem[r]:
                        postings_of[b].append(r)
            counts = {b: len(p) for b, p in postings_of.items() if len(p) >= 2}
            taken: set[int] = set()
        # Value of putting b next for its whole group: (copies − 1) × tokens saved.
        heap = [(-(c - 1) * w[b], b) for b, c in counts.items() if c > 1]
        heapq.heapify(heap)
        while heap:
            neg, b = heapq.heappop(heap)
            if small:
                sub = [r for r in free if b in rem[r]]
                c = len(sub)
            else:
                c = counts[b]
            if c < 2:
                continue
            value = -(c - 1) * w[b]
            if value != neg:  # stale entry: fewer free holders than when pushed
                heapq.heappush(heap, (value, b))
                continue
            if small:
                free = [r for r in free if b not in rem[r]]
                if len(free) < 2:
                    # No block has two free holders left: every later pop would be skipped.
                    heap = ()
            else:
                sub = [r for r in postings_of[b] if r not in taken]
                taken.update(sub)
                for r in sub:
                    for x in rem[r]:
                        if x in counts:
                            counts[x] -= 1
            _give(b, sub, rem, prefix, stack)
            nodes += 1
            weight += w[b]
    return _Greedy(prefix, rem, nodes, weight)


def _split_small_unit(group: list[int], rem: list[set[int]], prefix: list[list[int]],
                      stack: list[list[int]], universe: int) -> int:
    """``_greedy_prefixes``' split of a small group where every weight is 1; returns the
    blocks handed out. The heap loop there, its entries ``(-(count - 1), block)`` packed
    into one int, ``(len(group) + 1 - count) * universe + block``, ordered as the
    tuples are (most free holders first, then the lower id): ints compare faster."""
    counts: dict[int, int] = {}
    _count_elements(counts, itertools.chain.from_iterable(map(rem.__getitem__, group)))
    most = len(group) + 1
    heap = [(most - c) * universe + b for b, c in counts.items() if c > 1]
    heapq.heapify(heap)
    free = group
    given = 0
    while heap:
        level, b = divmod(heapq.heappop(heap), universe)
        sub = [r for r in free if b in rem[r]]
        c = len(sub)
        if c < 2:
            continue
        if most - c != level:  # stale entry: fewer free holders than when pushed
            heapq.heappush(heap, (most - c) * universe + b)
            continue
        free = [r for r in free if b not in rem[r]]
        if len(free) < 2:
            heap = ()  # no block has two free holders left
        _give(b, sub, rem, prefix, stack)
        given += 1
    return given


def _split_three_unit(group: list[int], rem: list[set[int]], prefix: list[list[int]],
                      stack: list[list[int]]) -> int:
    """``_split_small_unit`` of a group of three, by set operations; returns the blocks
    handed out (0 or 1). Its first pop is the lowest block all three hold, else the
    lowest two of them hold; either leaves fewer than two free members, so nothing more
    is handed out until the new group is split."""
    a, b, c = group
    ra, rb, rc = rem[a], rem[b], rem[c]
    ab = ra & rb
    every = ab & rc
    if every:
        _give(min(every), [a, b, c], rem, prefix, stack)
        return 1
    ac, bc = ra & rc, rb & rc
    if not (ab or ac or bc):
        return 0
    x = min(itertools.chain(ab, ac, bc))
    _give(x, [a, b] if x in ab else [a, c] if x in ac else [b, c], rem, prefix, stack)
    return 1


def _give(b: int, members: list[int], rem: list[set[int]], prefix: list[list[int]], stack: list[list[int]]) -> None:
    """The greedy split hands ``b`` to ``members``: next in each one's prefix, out of
    its rest; they form a group of their own, split next."""
    for r in members:
        rem[r].discard(b)
        prefix[r].append(b)
    stack.append(members)


class _Merges:
    """Bottom-up clustering state shared by both partner searches.

    Cluster ``c`` holds ``inter[c]``, the blocks all its members share; clusters
    ``0..N-1`` are the requests and each merge appends one, a tree node whose blocks
    become the shared prefix of all its members. ``heap`` holds candidate merges
    ``(-score, spread, x, y)``: score = weight of the blocks x and y share, ties to the
    tighter pair (smaller intersections before the merge, i.e. more alike).
    """

    def __init__(self, sets: list[list[int]], w: list[float]) -> None:
        self.requests = len(sets)
        self.w = w
        self.unit = w.count(1.0) == len(w)  # (counted in C)
        self.inter: list[set[int]] = [set(s) for s in sets]
        self.alive = [True] * len(sets)
        self.parent = [-1] * len(sets)
        self.heap: list[tuple[float, int, int, int]] = []

    def exact(self, x: int, y: int) -> tuple[float, int]:
        """(weight of the blocks x and y share, sum of their sizes)."""
        shared = self.inter[x] & self.inter[y]
        # Unit weights: the same float as the sum, without a step per block.
        score = float(len(shared)) if self.unit else sum(self.w[b] for b in shared)
        return score, len(self.inter[x]) + len(self.inter[y])

    def push_best(self, x: int, partners) -> None:
        """Score ``partners`` of x exactly; queue the best that shares anything."""
        best = None
        for y in partners:
            score, spread = self.exact(x, y)
            if score > 0 and (best is None or (score, -spread, -y) > (best[0], -best[1], -best[2])):
                best = (score, spread, y)
        if best is not None:
            heapq.heappush(self.heap, (-best[0], best[1], x, best[2]))

    def next_merge(self, requeue) -> tuple[int, int, int] | None:
        """Merge the best queued pair; returns ``(x, y, new cluster)``, None when done.

        Scores only fall as clusters merge, so a heap entry is an upper bound and the
        first valid entry popped is the best merge overall. An entry whose partner was
        merged away meanwhile is dropped and ``requeue(x)`` finds x's current best.
        """
        while self.heap:
            _, _, x, y = heapq.heappop(self.heap)
            if not self.alive[x]:
                continue
            if not self.alive[y]:
                requeue(x)
                continue
            return x, y, self.join(x, y)
        return None

    def join(self, x: int, y: int) -> int:
        """Merge live clusters x and y into a new one holding the blocks both hold;
        returns its number."""
        c = len(self.inter)
        self.inter.append(self.inter[x] & self.inter[y])
        self.alive.append(True)
        self.parent.append(-1)
        self.alive[x] = self.alive[y] = False
        self.parent[x] = self.parent[y] = c
        return c

    def orders(self, freq: list[int] | None, rank: list[int] | None = None,
               sorted_from: list[int] | None = None) -> list[list[int]]:
        """Each request's blocks: what every node on its path adds, root first
        (``rank``: ``_popularity_rank(freq)``, when the caller has it). ``sorted_from``:
        filled with where each request's own increment starts (sorted from there on)."""
        inter, parent = self.inter, self.parent
        if rank is None:
            rank = _popularity_rank(freq)
        # A parent is numbered after its children: walking down from the last cluster,
        # every parent's full order is known before its children extend it.
        full: list[list[int]] = [[]] * len(inter)
        key = rank.__getitem__  # _tail_order's sort, on the sets themselves
        for c in range(len(inter) - 1, -1, -1):
            p = parent[c]
            if p >= 0:
                added = inter[c] - inter[p]
                full[c] = full[p] + sorted(added, key=key) if added else full[p]
            else:
                full[c] = sorted(inter[c], key=key)
        # Each request's order is a list of its own unless its node added nothing.
        out = full[:self.requests]
        starts = []
        for r, order in enumerate(out):
            p = parent[r]
            if p < 0:
                starts.append(0)
            elif order is full[p]:
                out[r] = list(order)
                starts.append(len(order))
            else:
                starts.append(len(full[p]))
        if sorted_from is not None:
            sorted_from.extend(starts)
        return out


def _cluster_by_postings(sets: list[list[int]], w: list[float], freq: list[int], hot_cap: int,
                         candidates: int = 8, overlaps: list | None = None, postings: Postings | None = None,
                         rank: list[int] | None = None, sorted_from: list[int] | None = None,
                         membership: list | None = None) -> list[list[int]]:
    """Bottom-up clustering (see ``_Merges``) with partners from an inverted index.

    Blocks held by more than ``hot_cap`` clusters are skipped when looking for
    partners (they still count in the exact score): popular blocks are the greedy
    split's strength, rare shared blocks are this one's. ``overlaps``: with unit
    weights, filled with ``first_partners``' answer per request, those with a hot
    block included (the local search reuses it). ``postings``: the batch's postings
    of ``sets``, when the caller has them; ``rank``: ``_popularity_rank(freq)``,
    likewise. ``sorted_from``: see ``_Merges.orders``. ``membership``: where the count
    table is kept, filled with the requests' ``Membership`` read from it (the local
    search's stay test needs one; the table's request columns never change).
    """
    m = _Merges(sets, w)
    if postings is None:
        postings = Postings(sets, len(freq))
    unit = w.count(1.0) == len(w)  # counted in C
    table = _shared_counts(sets, freq, postings) if unit else None
    if table is not None and membership is not None:
        membership.append(Membership.of_table(table.table[:-1], table.rows, len(sets)))  # (not the spare row)
    # Block -> live clusters holding it (a list indexed by block: a list lookup costs
    # a fraction of a dict's; None for blocks no request shares); the requests are
    # the first clusters. Not kept where the table counts every cluster (unit
    # weights, no block above the cap): _merge_table then updates the table only.
    live: list[set[int]] | None = None
    if table is None or hot_cap < max(freq, default=0) or max(map(len, sets), default=0) > 255:
        live = [None] * postings.freq.size
        run = iter(postings.lists()[0])  # the holders, block by block
        held = np.flatnonzero(postings.freq)
        for b, f in zip(held.tolist(), postings.freq[held].tolist()):
            live[b] = set(itertools.islice(run, f))

    def push_best(x: int) -> None:
        m.push_best(x, _posting_partners(m, live, x, hot_cap, candidates, unit, table))

    if unit:
        # Unit weights: each cluster's full set of best partners is kept, so a cluster
        # whose chosen partner was merged away is re-queued from it (see _merge_unit).
        ties: dict[int, tuple[int, list[int]]] = {}
        # Where the local search reads the answers, requests with a hot block get theirs
        # too (their pairs are counted anyway): its stay test then settles them as well.
        answer_hot = overlaps is not None
        ranked: list = []  # their ranked search's pick, where the count was dense
        firsts = first_partners(sets, hot_cap, candidates, postings=postings, answer_hot=answer_hot,
                                ranked=ranked)
        if overlaps is not None:
            overlaps.extend(firsts)
        hot = hot_rows(postings, hot_cap).tolist() if answer_hot else None
        picks = ranked if len(ranked) == len(sets) else None
        for x, first in enumerate(firsts):
            if first is None or (hot is not None and hot[x]):
                # A hot block: the ranked search, as for any hot cluster.
                if picks is None:
                    push_best(x)
                elif picks[x] is not None:
                    shared, spread, y = picks[x]
                    m.heap.append((-float(shared), spread, x, y))  # as push_best queues it
            elif first[0]:
                top, y, tied = first
                ties[x] = (top, tied)
                m.heap.append((-top, len(sets[x]) + len(sets[y]), x, y))
        heapq.heapify(m.heap)  # every entry is distinct, so the pop order is as if pushed one by one
        if live is None:
            _merge_table(m, ties, candidates, table)
        else:
            _merge_unit(m, live, ties, hot_cap, candidates, table)
        return m.orders(freq if rank is None else None, rank, sorted_from)
    for x in range(len(sets)):
        push_best(x)
    while (merged := m.next_merge(push_best)) is not None:
        x, y, c = merged
        for z in (x, y):
            for b in m.inter[z]:
                live[b].discard(z)
        for b in m.inter[c]:
            live[b].add(c)
        push_best(c)
    return m.orders(freq if rank is None else None, rank, sorted_from)


def _merge_unit(m: _Merges, postings: list[set[int]], ties: dict[int, tuple[int, list[int]]],
                hot_cap: int, candidates: int, table: SharedCounts | None) -> None:
    """The clustering's merges for unit weights (``next_merge`` until done), where a
    cluster's score with another is the number of blocks they share.

    ``ties[x]``: the best score ``top`` x had when last searched and every cluster
    sharing that much with x then (ascending when there are more than
    ``candidates``); x is queued with, of the ``candidates`` lowest numbers, the one
    with the fewest blocks, then the lowest: the general search's choice.

    A new cluster's best partners are counted from its postings (``live``: block ->
    live clusters), exactly, so nothing is re-scored. Clusters holding every block
    of x share the most anyone can, so when there are any they are the ties and
    nothing is counted. The ``skip`` longest postings are not counted: a partner seen
    only there shares at most ``skip`` blocks with x, so when the best count exceeds
    ``skip`` every partner with that count was seen in the others, and membership
    tests in the long postings finish their counts (far less work than counting the
    long postings when few partners are seen); otherwise x is recounted in full.
    With ``table``, long postings are counted there instead (same counts; where it
    counts every cluster, ``_merge_table`` runs instead). A cluster with a hot block
    (held by more than ``hot_cap``) takes the ranked search.

    When x's queued partner was merged away, x is re-queued from its kept ties:
    scores between live clusters never change and a merge never shares more with x
    than its parts did, so any live cluster sharing ``top`` with x now is such a tie
    or the cluster that absorbed ties; checking those finds exactly the partners a
    recount would, and x is recounted when none shares ``top`` any more (or no tie
    is alive: see ``_still_tied``).

    One loop, the searches written out, because at a few microseconds per merge the
    calls and lookups between them were a tenth of the clustering's time.
    """
    heap, inter, alive, join = m.heap, m.inter, m.alive, m.join
    owner = list(range(len(inter)))  # cluster -> the cluster that absorbed it (union-find)
    heappop, heappush = heapq.heappop, heapq.heappush
    count = _count_elements
    chain = itertools.chain.from_iterable
    target = -1  # a cluster whose best partners are counted afresh
    while True:
        top = 0
        if target >= 0:
            # Count x's best partners.
            x, target = target, -1
            mine = inter[x]
            if not mine:
                continue
            lists = [postings[b] for b in mine]
            lists.sort(key=len)
            if len(lists[-1]) > hot_cap:
                m.push_best(x, _posting_partners(m, postings, x, hot_cap, candidates, True, table))
                continue
            found = lists[0].intersection(*lists[1:])
            found.discard(x)
            if found:
                top = len(lists)
                found = sorted(found)
            elif len(lists) <= 3:
                # Two or three blocks: the clusters holding two of them, else one of
                # them, by set operations (no count).
                if len(lists) == 3:
                    a, b, c = lists
                    found = (a & b) | (a & c) | (b & c)
                    found.discard(x)
                    top = 2
                if not found:
                    found = set().union(*lists)
                    found.discard(x)
                    top = 1 if found else 0
                found = sorted(found) if len(found) > candidates else list(found)
            else:
                seen = sum(map(len, lists))
                if (table is not None and len(lists) < 256
                        and seen > _TABLE_MIN_POSTINGS + table.alive.size // _TABLE_COLUMNS_PER_POSTING):
                    counts = table.count(x, mine)
                    top = int(counts.max())
                    found = np.flatnonzero(counts == top).tolist() if top else []
                else:
                    skip, seen = 0, seen - len(lists[-1])
                    while skip < len(lists) - 1 and len(lists[-1 - skip]) > seen:
                        skip += 1
                        seen -= len(lists[-1 - skip])
                    acc: dict[int, int] = {}
                    count(acc, chain(lists[:len(lists) - skip]))
                    acc.pop(x, None)
                    if skip and acc:
                        keys = list(acc)
                        for h in lists[len(lists) - skip:]:
                            count(acc, filter(h.__contains__, keys))
                    top = max(acc.values(), default=0)
                    if skip and top <= skip:
                        acc = {}
                        count(acc, chain(lists))
                        acc.pop(x, None)
                        top = max(acc.values(), default=0)
                    found = [z for z, n in acc.items() if n == top]
                    if len(found) > candidates:
                        found.sort()
            if not top:
                continue
        else:
            if not heap:
                return
            _, _, x, y = heappop(heap)
            if not alive[x]:
                continue
            if alive[y]:
                # Merge (as next_merge does) and update the postings.
                c = join(x, y)
                ix, iy, ic = inter[x], inter[y], inter[c]
                owner.append(c)
                owner[x] = owner[y] = c
                ties.pop(x, None)
                ties.pop(y, None)
                for b in ix:
                    postings[b].discard(x)
                for b in iy:
                    postings[b].discard(y)
                for b in ic:
                    postings[b].add(c)
                if table is not None:
                    table.kill(x)
                    table.kill(y)
                if table is not None and ic:
                    table.add(c, ic)
                target = c
                continue
            # x's partner was merged away: re-queue x from its kept ties, or count
            # afresh when none shares as much any more.
            kept = ties.get(x)
            if kept is None:
                target = x
                continue
            top = kept[0]
            mine = inter[x]
            found = _still_tied(kept, mine, alive, owner, inter)
            if not found:
                del ties[x]
                target = x
                continue
        # Queue x with, of the `candidates` lowest-numbered ties, the one with the
        # fewest blocks, then the lowest number.
        ties[x] = (top, found)
        y, size = -1, 0
        for z in (found[:candidates] if len(found) > candidates else found):
            n = len(inter[z])
            if y < 0 or n < size or (n == size and z < y):
                y, size = z, n
        heappush(heap, (-top, len(mine) + size, x, y))



def _merge_table(m: _Merges, ties: dict[int, tuple[int, list[int]]], candidates: int,
                 table: SharedCounts) -> None:
    """``_merge_unit`` where ``table`` counts every cluster (unit weights, no block
    hot, no cluster of 256 blocks or more): the same merges, in the same order.

    Its steps, written for this case: heap entries ``(-top, spread, x, y)`` are packed
    into one int ordered as the tuples are (each field wide enough), so the heap
    compares ints; counts read the table's cells directly, and where every cluster
    holds fewer than 128 blocks the table's spare row reads 128 in the live clusters'
    columns and is summed with the cluster's rows, so the live clusters are the ones
    counted 128 or more and nothing is masked (else one multiply per count masks the
    merged-away clusters out: clearing two columns per merge costs more); a new
    cluster is counted before its own column is filled, and not at all where it holds
    every block of the cluster whose entry it came from and that one's ties still
    tie (then they are its ties: synthetic N = 1,000, ~180 of ~990 merges).
    """
    heap, inter, alive, parent = m.heap, m.inter, m.alive, m.parent
    sizes = list(map(len, inter))
    most = max(sizes, default=0)
    lift = 128 if most < 128 else 0  # the spare row's value in a live cluster's column
    # Where live clusters are marked: the spare row (lift), else the table's 0/1 mask
    # that each count is multiplied by.
    mark, on = (table.table[-1], lift) if lift else (table.alive, 1)
    mark[:len(inter)] = on  # (the requests, all live)
    # A cluster's rows, the spare row's among them where it counts.
    rows = np.append(table.rows, table.table.shape[0] - 1)
    spare = (rows.size - 1,) if lift else ()
    extra = len(spare)
    id_bits = len(table.cells).bit_length()
    spread_at = 2 * id_bits
    top_at = spread_at + (2 * most).bit_length()  # (a spread is at most 2 * most)
    ids = (1 << id_bits) - 1
    # A map that keeps the entries' order keeps the list a heap.
    heap[:] = [((most + s) << top_at) | (spread << spread_at) | (x << id_bits) | y for s, spread, x, y in heap]
    owner = list(range(len(inter)))  # cluster -> the cluster that absorbed it (union-find)
    heappop, heappush = heapq.heappop, heapq.heappush
    cells = table.cells
    take, cell = table.table.take, table.table
    fromiter, int64, uint8, add, chain = np.fromiter, np.int64, np.uint8, np.add.reduce, itertools.chain
    while heap:
        key = heappop(heap)
        x = (key >> id_bits) & ids
        if not alive[x]:
            continue
        y = key & ids
        found = None
        if alive[y]:
            # Merge (join, written out), then count the new cluster. (Merged-away
            # clusters' ties are never read again: they stay.)
            c = len(inter)
            ic = inter[x] & inter[y]
            inter.append(ic)
            alive.append(True)
            parent.append(-1)
            alive[x] = alive[y] = False
            parent[x] = parent[y] = c
            sizes.append(len(ic))
            owner.append(c)
            owner[x] = owner[y] = c
            mark[x] = mark[y] = 0
            if not ic:
                continue
            r = cells[c] = rows[fromiter(chain(ic, spare), int64, len(ic) + extra)]
            kept = ties.get(x) if len(ic) == sizes[x] else None
            if kept is not None:
                # c holds all x held, so it shares with every cluster what x does: x's
                # ties now (c, y's absorber, aside) are c's, when there are any.
                found = _still_tied(kept, ic, alive, owner, inter)
                if found and found[-1] == c:
                    found.pop()
                found = found or None  # (None: counted below)
                top = len(ic)
            if found is None:
                counts = add(take(r, axis=0), axis=0, dtype=uint8)  # (column c still empty)
                if not lift:
                    counts *= mark
            cell[r, c] = 1
            mark[c] = on
            x, mine = c, ic
        else:
            # x's partner was merged away: re-queue x from its kept ties, or count
            # afresh when none shares as much any more.
            mine = inter[x]
            kept = ties.get(x)
            if kept is not None:
                top = kept[0]
                found = _still_tied(kept, mine, alive, owner, inter)
                if not found:
                    del ties[x]
                    found = None
            if found is None:
                r = cells[x]
                if r is None:
                    r = cells[x] = rows[fromiter(chain(mine, spare), int64, len(mine) + extra)]
                counts = add(take(r, axis=0), axis=0, dtype=uint8)
                if not lift:
                    counts *= mark
                counts[x] = 0
        if found is None:
            best = int(counts[counts.argmax()])  # (argmax takes half as long as max on bytes)
            top = best - lift
            if top <= 0:  # (below the lift: no live cluster but x)
                continue
            found = (counts == best).nonzero()[0].tolist()
        ties[x] = (top, found)
        # Of the `candidates` lowest-numbered ties, the one with the fewest blocks, then
        # the lowest number (found is ascending, and min keeps the first of equals).
        y = min(found[:candidates], key=sizes.__getitem__) if len(found) > 1 else found[0]
        heappush(heap, ((most - top) << top_at) | ((len(mine) + sizes[y]) << spread_at) | (x << id_bits) | y)


def _still_tied(kept: tuple[int, list[int]], mine: set[int], alive: list[bool], owner: list[int],
                inter: list[set[int]]) -> list[int]:
    """The live clusters sharing ``top`` blocks with a cluster holding ``mine``, from its
    kept ``(top, tied)``: the live ties and the clusters that absorbed ties, ascending;
    empty when none shares ``top`` any more, and also when no tie is alive (the caller
    then recounts, which finds the same partners). ``owner``: the union-find of
    absorptions (paths compressed here).

    Without a live tie, a cluster that absorbed one keeps the whole share so rarely
    (N = 1,000: synthetic, none of ~840 such re-queues; knowledge base, 4 of ~460)
    that checking the absorbers costs more than the recounts it saves.
    """
    top, tied = kept
    found = [t for t in tied if alive[t]]
    if not found:
        return found
    absorbed = set()
    for t in tied:
        if alive[t]:
            continue
        r = t
        while owner[r] != r:
            r = owner[r]
        while owner[t] != r:  # path compression
            owner[t], t = r, owner[t]
        if r not in absorbed:
            absorbed.add(r)
            if len(inter[r] & mine) == top:
                found.append(r)
    found.sort()
    return found


# SharedCounts' table: at most this many cells (bytes, 16 MiB; synthetic N=2,000 uses 8 MiB).
_TABLE_CELLS = 1 << 24
# A cluster's partners are counted in the table once its postings hold more than
# _TABLE_MIN_POSTINGS + (table columns) / _TABLE_COLUMNS_PER_POSTING entries: below
# that, counting the postings in Python costs less than the table's vector passes.
_TABLE_MIN_POSTINGS = 256
_TABLE_COLUMNS_PER_POSTING = 8
# Where hot blocks are left out, the partners within reach of the best are ranked
# too (a Python sort key per partner), so the table pays off sooner.
_TABLE_MIN_RANKED = 64
_TABLE_COLUMNS_PER_RANKED = 32


def _shared_counts(sets: list[list[int]], freq: list[int], postings: Postings | None = None) -> SharedCounts | None:
    """The table for the clustering, when ``_table_fits`` (``postings``: those of ``sets``,
    where the caller has them)."""
    if not _table_fits(len(sets), freq):
        return None
    if postings is not None:
        return SharedCounts.for_postings(postings, 2 * len(sets))
    return SharedCounts.for_requests(sets, 2 * len(sets), len(freq))


def _table_fits(n: int, freq: list[int]) -> bool:
    """Whether the clustering of ``n`` requests (unit weights) keeps a ``SharedCounts``
    table: it fits in ``_TABLE_CELLS`` and postings are long enough to use it."""
    f = np.asarray(freq, dtype=np.int64)
    f = f[f > 1]
    clusters = 2 * n
    if not n or f.size * clusters > _TABLE_CELLS:
        return False
    # Postings too short on average: the table would rarely be asked.
    return int((f * f).sum()) >= n * (_TABLE_MIN_POSTINGS + clusters // _TABLE_COLUMNS_PER_POSTING)


def _posting_partners(m: _Merges, postings: list[set[int]], x: int, hot_cap: int, candidates: int,
                      unit: bool, table: SharedCounts | None = None) -> list[int]:
    """Up to ``candidates`` clusters that can have the best exact score with x.

    ``table`` (unit weights only): long postings are counted there instead (same
    counts, same answer)."""
    skipped = 0.0  # weight of x's hot blocks, absent from acc
    lists = []
    for b in m.inter[x]:
        holders = postings[b]
        if len(holders) > hot_cap:
            skipped += m.w[b]
        else:
            lists.append((b, holders))
    if (table is not None and len(lists) < 256
            and sum(len(h) for _, h in lists) > _TABLE_MIN_RANKED + table.alive.size // _TABLE_COLUMNS_PER_RANKED):
        counts = table.count(x, [b for b, _ in lists])
        top = int(counts.max())
        if not top:
            return []
        # At least once (as in acc), most shared first, then the lowest number: nlargest's
        # order below.
        return best_counted(counts, top, max(top - skipped, 1), candidates)
    if unit:
        # Every block weighs 1: count in C (Counter) rather than a Python loop.
        acc = Counter(itertools.chain.from_iterable(h for _, h in lists))
    else:
        acc = defaultdict(float)
        for b, holders in lists:
            wb = m.w[b]
            for y in holders:
                acc[y] += wb
    acc.pop(x, None)
    if not acc:
        return []
    # exact(x, y) <= acc[y] + skipped, so only these can reach the top acc value.
    floor = max(acc.values()) - skipped
    ranked = [y for y, v in acc.items() if v >= floor]
    if len(ranked) > candidates:
        ranked = heapq.nlargest(candidates, ranked, key=lambda y: (acc[y], -y))
    return ranked


def _cluster_by_knn(sets: list[list[int]], w: list[float], freq: list[int], knn,
                    candidates: int) -> list[list[int]]:
    """Bottom-up clustering (see ``_Merges``) with partners from a kNN graph.

    ``knn``: an N×k array of each request's best partners (from a ``PartnerSearch``,
    -1 in empty slots). A request's candidates are its row; a merged cluster's are the
    still-alive clusters among its two parts' candidates, re-scored exactly, best
    ``2 * candidates`` kept. No posting list is scanned, so hot blocks cost nothing
    and count in the search.
    """
    m = _Merges(sets, w)
    cand = [[int(y) for y in row if y >= 0] for row in knn]
    owner = list(range(len(sets)))  # cluster -> the cluster that absorbed it (union-find)

    def alive_partners(x: int, pool: list[int]) -> list[int]:
        return [y for y in dict.fromkeys(_find_root(owner, z) for z in pool) if y != x]

    def push_best(x: int) -> None:
        m.push_best(x, alive_partners(x, cand[x]))

    for x in range(len(sets)):
        push_best(x)
    while (merged := m.next_merge(push_best)) is not None:
        x, y, c = merged
        owner.append(c)
        owner[x] = owner[y] = c
        pool = alive_partners(c, cand[x] + cand[y])
        score = {z: m.exact(c, z)[0] for z in pool}
        cand.append(heapq.nsmallest(candidates * 2, (z for z in pool if score[z] > 0),
                                    key=lambda z: (-score[z], z)))
        push_best(c)
    return m.orders(freq)


def _find_root(owner: list[int], c: int) -> int:
    """The live cluster that absorbed ``c`` (union-find with path compression)."""
    root = c
    while owner[root] != root:
        root = owner[root]
    while owner[c] != root:
        owner[c], c = root, owner[c]
    return root


def _local_search(trie: BlockTrie, orders: list[list[int]], paths: list[list[int]], w: list[float],
                  freq: list[int], passes: int, overlaps: list | None = None, rank: list[int] | None = None,
                  sorted_from: list[int] | None = None, held: Membership | None = None) -> int:
    """Re-insert each request at the deepest node it fully contains; returns passes run.

    A request's answer depends only on the nodes whose path it fully contains and
    that are at least as deep as the node it was last placed at (shallower ones
    cannot win), so once placed it is skipped until a move touches such a node (the
    search would give the same order and the same node numbers: skipping changes
    nothing). See ``_MoveLog``. ``overlaps`` (unit weights only): ``first_partners``'
    answer per request, for ``_stays``. ``sorted_from[r]``: an index from which
    ``orders[r]`` is already in ``_tail_order`` (None: none known); kept up to date.
    ``held``: ``Membership(orders)``, where the caller has one.
    """
    ran = 0
    step = 0
    log = _MoveLog()
    placed_at = [-1] * len(orders)  # step each request was last searched
    placed_depth = [0.0] * len(orders)  # path weight of the node it was placed at
    refs, height, dweight = trie.refs, trie.height, trie.depth_weight
    nonneg = min(w, default=0.0) >= 0.0  # (then path weights and height bounds never fall going down)
    if rank is None:
        rank = _popularity_rank(freq)
    if sorted_from is None:
        sorted_from = [len(order) for order in orders]
    # Requests known to stay before any move (the stay test, or could_move where tree
    # searches are dearer than its walk); None: none known.
    stay = (_KnownStays(trie, orders, paths, overlaps, held)
            if passes and overlaps is not None and _KnownStays.pays(freq, len(orders)) else None)
    for _ in range(passes):
        ran += 1
        before = trie.size
        for r, order in enumerate(orders):
            step += 1
            path = paths[r]
            if not order or refs[path[-1]] >= 2:
                # Empty, or its whole path is shared already: no node can hold more of it.
                continue
            since = placed_at[r]
            members = None  # the request's blocks as a set, built when a test needs them
            if since >= 0:
                members = set(order)
                if not log.touches(members, since, placed_depth[r], w):
                    continue
            placed_at[r] = step
            at, shared = _hang(path, refs)
            if stay is not None and since < 0 and stay.before[r] and stay.still(r, at, shared, order, log, trie):
                node = shared
            elif overlaps is not None and _stays(overlaps[r], at, shared, members or order, paths, orders):
                node = shared
            else:
                node = trie.deepest_contained(members or set(order), without=path, known=shared)
            placed_depth[r] = dweight[node]
            if node == shared:
                # It stays where it hangs: the head is its own path's first ``at`` blocks.
                moved = order
                if at < sorted_from[r] and len(order) - at > 1:  # (one block is in order already)
                    tail = order[at:]
                    ranked = _tail_order(tail, rank)
                    if ranked != tail:
                        tail = ranked
                        moved = order[:at] + ranked
                        sorted_from[r] = at
            else:
                head = trie.blocks_to(node)
                placed = set(head)
                tail = _tail_order([b for b in order if b not in placed], rank)
                moved = head + tail
                sorted_from[r] = len(head)
            if moved is order:
                # Re-inserting would rebuild the same path with the same node numbers;
                # only the bound on the heights of the nodes it alone holds (those
                # below `at`) would reset. Down a path the bounds do not grow and none
                # is below the path's own weight, so when the first is exact all are.
                top = dweight[path[-1]]
                if height[path[at]] != top or not nonneg:
                    for n in path[at:]:
                        height[n] = top
                continue
            trie.release(path)
            paths[r] = trie.insert(tail, [w[b] for b in tail], start=node)
            log.record(step, order, moved)
            if stay is not None and ran == 1:
                stay.moved(moved)
            orders[r] = moved
        if trie.size >= before:
            break
    return ran


# Shared-block pairs per request (sum of squared block counts / requests) from which
# could_move answers the first pass's stay questions in place of tree searches: where
# blocks are held by hundreds of requests, a search walks many nodes (synthetic
# N = 1,000: ~18 us each); where sharing is sparse it costs less than the walk's setup
# (knowledge base, ~100 pairs per request: ~6 us a search, could_move as much).
_REACH_MIN_PAIRS = 1000


def _hang(path: list[int], refs: list[int]) -> tuple[int, int]:
    """(depth, node): the deepest node of ``path`` that others share too, where its
    request hangs (ROOT at depth 0). References only fall along a path and the last
    node has one, so it is found from the root side (the shared head is short)."""
    at = 0
    for n in path:
        if refs[n] < 2:
            break
        at += 1
    return at, (path[at - 1] if at else ROOT)


class _KnownStays:
    """The local search's first pass, told which requests stay without a tree search.

    ``before[r]``: True where the tree search, before any move, answers the node ``r``
    hangs at (``_stays``, else ``could_move``). ``still`` tells whether that answer
    holds after the moves since: see there. Unit weights, the trie as built.
    """

    def __init__(self, trie: BlockTrie, orders: list[list[int]], paths: list[list[int]],
                 overlaps: list, held: Membership | None = None) -> None:
        refs = trie.refs
        n = len(orders)
        self.before = [True] * n
        self.at = [0] * n
        self.refs = [0] * n  # references of the node each request hangs at
        todo = []
        for r, path in enumerate(paths):
            if not path or refs[path[-1]] >= 2:
                continue
            at, shared = _hang(path, refs)
            self.at[r] = at
            self.refs[r] = refs[shared]
            if not _stays(overlaps[r], at, shared, orders[r], paths, orders):
                todo.append(r)
        self.held = held if held is not None else Membership(orders)
        for r, moves in zip(todo, could_move(trie, orders, paths, self.at, todo, self.held)):
            self.before[r] = not moves
        # Requests some path inserted since holds the first ``at`` blocks of (see still).
        self.reached = np.zeros(n, dtype=bool)
        self.depths = np.asarray(self.at, dtype=np.int64)

    def moved(self, new: list[int]) -> None:
        """A request moved to ``new``: mark the requests holding its first ``at`` blocks."""
        self.reached |= self.held.lead(new) >= self.depths

    @classmethod
    def pays(cls, freq: list[int], n: int) -> bool:
        """Whether sharing is dense enough for ``could_move`` to cost less than the searches."""
        f = np.asarray(freq, dtype=np.int64)
        f = f[f > 1]
        return int((f * f).sum()) >= _REACH_MIN_PAIRS * max(n, 1)

    def still(self, r: int, at: int, shared: int, order: list[int], log: "_MoveLog", trie: BlockTrie) -> bool:
        """Whether request ``r`` (not moved yet, ``before[r]`` True), hanging at ``shared``
        at depth ``at`` now, still stays. Yes when no move happened; else when it hangs
        where it did, ``shared`` lost no reference, and no path inserted since puts a node
        within its blocks one level deeper, or as deep and ahead of ``shared``: every
        other node lost references or kept them (False also where that is not known)."""
        if not log.by_first:
            return True
        if at != self.at[r] or trie.refs[shared] < self.refs[r]:
            return False
        if not self.reached[r]:
            return True  # no path inserted since starts with its first ``at`` blocks
        members = set(order)
        seqs = log.inserted(members, 0, at)
        if seqs is None:
            return False
        refs, children = trie.refs, trie.children
        beat = refs[shared] - 1  # shared's references, r's own left out
        for seq in seqs:
            node = ROOT
            for depth, b in enumerate(seq[:at + 1], 1):
                if b not in members:
                    break
                node = children[node].get(b)
                if node is None:
                    break
                if depth > at:
                    return False
                if depth == at and node != shared and (refs[node] > beat or (refs[node] == beat and node < shared)):
                    return False
        return True


# Most partners _stays checks before leaving the question to the tree search.
_STAYS_TIES = 16


def _stays(overlap, at: int, shared: int, members, paths: list[list[int]],
           orders: list[list[int]]) -> bool:
    """Whether the tree search (unit weights) must answer ``shared``, the node at
    depth ``at`` where the request hangs; False when it cannot tell.

    ``overlap``: the request's ``(top, _, ties)`` from ``first_partners``. A node the
    search could prefer lies at depth ``at`` or deeper, within ``members``, and is
    held by another request sharing that many blocks with this one. If ``top`` (the
    most any request shares with it) is ``at``, that request is one of ``ties`` and
    the node is on its path at depth ``at``: when each such node is ``shared`` or
    leaves ``members``, there is none. ``members``: the request's blocks (a set is
    made of them only if a tie's path must be checked).
    """
    if overlap is None or overlap[0] != at:
        return False
    ties = overlap[2]
    if len(ties) > _STAYS_TIES:
        return False
    if at:
        for q in ties:
            path = paths[q]
            if len(path) >= at and path[at - 1] != shared:
                if not isinstance(members, (set, frozenset)):
                    members = set(members)
                if members.issuperset(orders[q][:at]):
                    return False
    return True


# Moves a request's skip test reads before it searches anyway.
_MOVES_CHECKED = 24


class _MoveLog:
    """The local search's moves, indexed by first block, to tell who must look again.

    A move releases the old path and inserts the new one: only nodes on those two
    paths change (references, existence, reused numbers). A request with blocks
    ``members`` placed at path weight ``depth`` can only get a different answer if
    a prefix of either path lies within ``members`` and reaches ``depth`` (a node
    it could choose, or one at least as deep as its own).
    """

    def __init__(self) -> None:
        self.by_first: dict[int, list[tuple[int, list[int]]]] = defaultdict(list)
        self.new_by_first: dict[int, list[tuple[int, list[int]]]] = defaultdict(list)  # new paths only
        self.new: list[tuple[int, list[int]]] = []  # the same, in order

    def record(self, step: int, old: list[int], new: list[int]) -> None:
        self.by_first[old[0]].append((step, old))
        self.by_first[new[0]].append((step, new))
        self.new_by_first[new[0]].append((step, new))
        self.new.append((step, new))

    def inserted(self, members: set[int], since: int, depth: int) -> list[list[int]] | None:
        """The paths inserted after step ``since`` (unit weights) whose first ``depth``
        blocks lie within ``members``, or None past ``_MOVES_CHECKED`` of them: only their
        nodes were created or gained references since (a released path's nodes lose them)."""
        out = []
        # Few paths: each one looked at, cheaper than a lookup per block of members.
        few = len(self.new) <= _MOVES_CHECKED
        for seq in ((seq for step, seq in self.new if step > since) if few
                    else _recorded_since(self.new_by_first, members, since)):
            if len(seq) >= depth and members.issuperset(seq[:depth]):
                out.append(seq)
                if len(out) > _MOVES_CHECKED:
                    return None
        return out

    def touches(self, members: set[int], since: int, depth: float, w: list[float]) -> bool:
        """Whether a move after step ``since`` changed a node ``members`` could use
        (True as well once ``_MOVES_CHECKED`` moves were checked: searching is then cheaper)."""
        budget = _MOVES_CHECKED
        for seq in _recorded_since(self.by_first, members, since):
            budget -= 1
            if budget < 0:
                return True
            reach = 0.0
            for x in seq:
                if x not in members:
                    break
                reach += w[x]
            if reach >= depth:
                return True
        return False


def _recorded_since(index: dict[int, list[tuple[int, list[int]]]], members: set[int], since: int):
    """The paths of ``index`` (first block -> (step, path), by step) recorded after step
    ``since`` that start with a block of ``members``, newest first per block."""
    for b in members:
        moves = index.get(b)
        if not moves or moves[-1][0] <= since:
            continue
        for i in range(len(moves) - 1, -1, -1):
            step, seq = moves[i]
            if step <= since:
                break
            yield seq


def _whole(w: list[float]) -> bool:
    """Whether every weight is a whole number and their sum is exact in a float (then
    sums of them are the same in any order)."""
    a = np.asarray(w, dtype=np.float64)
    return bool(np.all(np.mod(a, 1.0) == 0.0)) and float(np.abs(a).sum()) < 2.0 ** 53


def _tree_size(orders: list[list[int]]) -> int:
    """Nodes of the prefix tree of ``orders`` (see ``_tree_measure``)."""
    return _tree_measure(orders)[0]


def _tree_measure(orders: list[list[int]], w: list[float] | None = None) -> tuple[int, float]:
    """(nodes, total weight) of the prefix tree of ``orders``, a lighter count than
    building a BlockTrie; ``w`` is the weight per dense block id (None: 1 each).

    In sorted order each sequence shares with all earlier ones exactly its common
    prefix with its predecessor, so the tree adds its length minus that prefix; the
    sort runs in C, leaving a short Python loop per sequence.
    """
    nodes, weight = 0, 0.0
    prev: list[int] = []
    for order in sorted(orders):
        common = 0
        for a, b in zip(order, prev):
            if a != b:
                break
            common += 1
        nodes += len(order) - common
        weight += len(order) - common if w is None else sum(w[b] for b in order[common:])
        prev = order
    return nodes, weight


def _live_weight(trie: BlockTrie) -> float:
    """Total weight of the trie's live nodes (tokens the cache must compute for them)."""
    return sum(trie.weight[n] for n in range(1, len(trie.parent)) if trie.is_live(n))


def _popularity_rank(freq: list[int]) -> list[int]:
    """Each block's place in the order most popular first, then lowest id (the key
    ``_tail_order`` sorts by, as one int so the sort needs no Python key function)."""
    f = np.asarray(freq, dtype=np.int64)
    by_rank = np.argsort(-f, kind="stable")  # stable: equal counts keep id order
    rank = np.empty(f.size, dtype=np.int64)
    rank[by_rank] = np.arange(f.size)
    return rank.tolist()


def _tail_order(tail: list[int], rank: list[int]) -> list[int]:
    """``tail`` most popular first (``rank`` from ``_popularity_rank``)."""
    # Unshared blocks go most-popular first so later re-insertions can hang below them.
    return sorted(tail, key=rank.__getitem__)


def _depth_first_order(trie: BlockTrie, paths: list[list[int]]) -> list[int]:
    """The requests in depth-first order of their last nodes, largest subtree first.

    A node only one request passes through heads a chain down to that request's last
    node, which the walk would follow node by node with nothing else in between: the
    request is scheduled on reaching the chain's head instead.
    """
    refs = trie.refs
    ends: dict[int, list[int]] = defaultdict(list)
    alone: dict[int, int] = {}  # head of a chain only one request holds -> that request
    for r, path in enumerate(paths):
        if not path:
            ends[ROOT].append(r)
        elif refs[path[-1]] > 1:
            ends[path[-1]].append(r)
        else:
            # References only fall along a path: the chain starts at the first node
            # with one (its shared head is short, so it is found from the root side).
            i = 0
            while refs[path[i]] > 1:
                i += 1
            alone[path[i]] = r
    order: list[int] = []
    stack = [ROOT]
    children = trie.children
    while stack:
        node = stack.pop()
        r = alone.get(node)
        if r is not None:
            order.append(r)
            continue
        if node in ends:
            order.extend(ends[node])
        kids = children[node]
        if len(kids) > 1:
            # Largest subtree (most requests) first, ties to the lower number; pushed
            # reversed onto the stack. Two sorts in C: by number descending, then
            # (stable) by references.
            stack.extend(sorted(sorted(kids.values(), reverse=True), key=refs.__getitem__))
        elif kids:
            stack.extend(kids.values())
    return order


# Postings visited by the clustering's candidate search, roughly (~0.2 s per million
# on one core); above it the cap on "hot" blocks is lowered.
_CLUSTER_WORK_BUDGET = 3_000_000
# When blocks held by more than the cap carry this share of all sharing, popularity
# dominates and the greedy split wins (synthetic Zipf workloads): skip clustering.
_HOT_SHARE_LIMIT = 0.3


def _cluster_cap(freq: list[int]) -> int | None:
    """Hot-block cap for the clustering, or None when it would not pay off."""
    f = np.asarray(freq, dtype=np.int64)
    # Sums over the shared blocks in NumPy; exact: a sum of squared counts is at most
    # (total blocks)**2, far below 2**63.
    f = f[f > 1]
    shared = int((f - 1).sum())
    if shared == 0:
        return None
    ladder = sorted({int(f.max()), 2048, 1024, 512, 256, 128}, reverse=True)
    for cap in ladder:
        if int((f[f <= cap] ** 2).sum()) <= _CLUSTER_WORK_BUDGET:
            hot = int((f[f > cap] - 1).sum())
            return cap if hot <= _HOT_SHARE_LIMIT * shared else None
    return None


# kNN-graph clustering (partners from a PartnerSearch) for batches whose hot blocks
# make the posting-list search too costly. Measured with the overlap kernels'
# search (`python -m benchmarks.planner.partners`,
# benchmarks/results/planner_partners.table.md): on synthetic N=5,000 the kNN path beats
# the greedy tree (hit 0.318 vs 0.314) but the NumPy kernel alone takes about as long
# as the whole greedy planner on 2 CPU cores, so that search tells "auto" to take it
# only when it runs on a GPU, and "auto" asks only from KNN_MIN_REQUESTS, below which
# the posting search is cheap; ``partners="kernel"`` forces it anywhere.
KNN_MIN_REQUESTS = 1024
KNN_PARTNERS = 16


def plan_batch(contexts, token_lengths=None, *, local_search_passes: int = 2,
               strategy: str = "auto", partners: str = "auto",
               partner_search: PartnerSearch | None = None) -> BatchPlan:
    """Plan a batch for prefix sharing (see module docstring).

    ``contexts``: list of block lists (blocks are any hashables, e.g. text or ids;
    equal blocks are the same block). ``token_lengths``: optional mapping
    block → tokens, or one list of lengths per context; weights the choice of shared
    prefixes. Repeated blocks inside one request keep their first place in the shared
    order; the extra copies go to the end of that request.

    ``strategy``: ``"greedy"`` (top-down split by the most valuable shared block),
    ``"cluster"`` (bottom-up merging of the most alike requests), or ``"auto"``: both
    where clustering can pay off, keeping the smaller prefix tree.

    ``partners``: where the clustering finds candidate partners: ``"postings"``
    (inverted index, hot blocks capped), ``"kernel"`` (kNN graph from
    ``partner_search``, which must then be given), or ``"auto"``: postings, and
    ``partner_search`` for large hot-block batches where its ``use_for`` says so.
    ``cp_engine.plan_batch`` passes the overlap kernels' search (GPU when available,
    else NumPy); without one this core planner only uses its posting lists.
    """
    if strategy not in ("auto", "greedy", "cluster"):
        raise ValueError(f"strategy must be auto, greedy or cluster, got {strategy!r}")
    if partners not in ("auto", "postings", "kernel"):
        raise ValueError(f"partners must be auto, postings or kernel, got {partners!r}")
    if partners == "kernel" and partner_search is None:
        raise ValueError("partners='kernel' needs a partner_search (cp_engine.plan_batch passes the kernels' one)")
    with _gc_paused():
        return _plan(contexts, token_lengths, local_search_passes, strategy, partners, partner_search)


@contextlib.contextmanager
def _gc_paused():
    """Cyclic GC off for the block, restored after (even on error).

    Planning allocates millions of small lists, sets and tuples and builds no
    reference cycles, so the collector's passes over them only cost time (about 10%
    of a knowledge-base N=5,000 plan); everything is freed by reference counting.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _plan(contexts, token_lengths, local_search_passes: int, strategy: str, partners: str,
          partner_search: PartnerSearch | None) -> BatchPlan:
    """plan_batch's body, arguments already checked."""
    ctxs, repeats = _validate(contexts)
    # Dense ids in first-seen order, numbered in C: the first-seen keys, then 0, 1, ...
    dense: dict[Hashable, int] = dict.fromkeys(itertools.chain.from_iterable(ctxs))
    dense = dict(zip(dense, range(len(dense))))
    originals: list[Hashable] = list(dense)
    number = dense.__getitem__
    extras: list[list[int]] | None = None  # each request's repeated blocks, where any
    if not any(repeats):
        # No request holds a block twice: the whole batch numbered in one pass.
        sizes = np.fromiter(map(len, ctxs), dtype=np.int64, count=len(ctxs))
        flat = np.fromiter(map(number, itertools.chain.from_iterable(ctxs)), dtype=np.int64,
                           count=int(sizes.sum()))
    else:
        ids: list[list[int]] = []
        extras = []
        for ctx, repeat in zip(ctxs, repeats):
            numbered = list(map(number, ctx))
            if not repeat:
                ids.append(numbered)
                extras.append([])
                continue
            seen: set[int] = set()
            uniq, dup = [], []
            for d in numbered:
                (dup if d in seen else uniq).append(d)
                seen.add(d)
            ids.append(uniq)
            extras.append(dup)
        sizes = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(sizes.sum()))
    w = _weights_for(ctxs, token_lengths, dense)
    # A block held by one request can never be shared: plan only the shared blocks
    # and append each request's lone blocks, in their original order, at the end. The
    # tree is then exactly the shared-block tree plus one node per lone block, and
    # on sparse real retrieval (most blocks lone) every later step does far less work.
    counts = np.bincount(flat, minlength=len(originals))
    freq = counts.tolist()
    shared = counts[flat] > 1
    # Split each request's ids by the mask in NumPy: both parts keep their order.
    ends = np.zeros(len(ctxs) + 1, dtype=np.int64)
    np.cumsum(sizes, out=ends[1:])
    kept = np.zeros(flat.size + 1, dtype=np.int64)
    np.cumsum(shared, out=kept[1:])
    cut = kept[ends]  # shared ids before each request's start
    flat_shared = flat[shared]
    shared_ids, lone_ids = flat_shared.tolist(), flat[~shared].tolist()
    cuts, lone_cuts = cut.tolist(), (ends - cut).tolist()
    sets = [shared_ids[cuts[i]:cuts[i + 1]] for i in range(len(ctxs))]
    lone = [lone_ids[lone_cuts[i]:lone_cuts[i + 1]] for i in range(len(ctxs))]
    lone_count = len(lone_ids)

    postings = Postings.from_flat(flat_shared, cut[1:] - cut[:-1], len(originals))
    rank = _popularity_rank(freq)
    # Candidates' orders; the greedy one is built only if it is the one kept.
    candidates: list[tuple[str, list[list[int]] | None]] = []
    greedy = None
    if strategy in ("auto", "greedy"):
        greedy = _greedy_prefixes(sets, w, postings)
        candidates.append(("greedy", None))
    cap = _cluster_cap(freq) if strategy == "auto" else max(freq, default=1)
    if cap is not None and cap < max(freq, default=1) and w.count(1.0) == len(w) and _table_fits(len(sets), freq):
        # The cap bounds Python's posting counts; with unit weights and the count table
        # the long postings are counted in vector passes instead, so no block is left
        # out and every cluster gets its exact best partners (synthetic N = 2,000: a
        # smaller tree, and the ranked searches the cap forced cost more than the table).
        cap = max(freq)
    overlaps: list = []  # each request's first partners, when the clustering counts them
    held: list = []  # the requests' Membership, when the clustering's count table holds it
    # Per candidate, where each order's sorted tail starts (for the local search).
    sorted_from: dict[str, list[int]] = {}
    use_knn = partners == "kernel" or (
        partners == "auto" and strategy == "auto" and cap is None and len(sets) >= KNN_MIN_REQUESTS
        and any(f > 1 for f in freq) and partner_search is not None and partner_search.use_for(len(sets)))
    if strategy != "greedy" and use_knn:
        knn = partner_search.find(sets, KNN_PARTNERS, w)
        candidates.append(("cluster_knn", _cluster_by_knn(sets, w, freq, knn, candidates=KNN_PARTNERS)))
    elif strategy == "cluster" or (strategy == "auto" and cap is not None):
        sorted_from["cluster"] = []
        candidates.append(("cluster", _cluster_by_postings(sets, w, freq, hot_cap=cap, overlaps=overlaps,
                                                           postings=postings, rank=rank,
                                                           sorted_from=sorted_from["cluster"],
                                                           membership=held)))

    # Local search only on the smaller candidate tree: its gains are small next to the
    # gap between the candidates (measured on synthetic, HotpotQA and knowledge-base
    # workloads, the smaller tree before local search was always the smaller after).
    # "Smaller" is what the cache must compute: token weight when lengths are given,
    # node count otherwise. They disagree on the engine benchmark's Zipf RAG batch
    # (N=400): the clustered tree has 1% more nodes than the greedy one yet shares 6.6%
    # more tokens (chars/4 lengths; +4% cached tokens in vLLM's 128-token blocks).
    weighted = token_lengths is not None and w.count(1.0) != len(w)
    lone_weight = sum(w[b] for solo in lone for b in solo) if weighted else 0.0
    whole = not weighted or _whole(w)  # then a tree's weight sums the same in any order
    built = []
    tried = {}
    tries = {}
    for name, orders in candidates:
        size, cost = 0, 0.0
        if len(candidates) > 1:
            if orders is None and whole:
                size, cost = greedy.tree(w if weighted else None)
            elif whole:
                # The clustering's tree is usually the one kept: build it now and read
                # its size, rather than measure it and build it again.
                trie = BlockTrie()
                tries[name] = (trie, trie.insert_all(orders, w))
                size, cost = trie.size, trie.total_weight if weighted else float(trie.size)
            else:
                if orders is None:
                    orders = greedy.orders(rank, sorted_from.setdefault(name, []))
                size, cost = _tree_measure(orders, w if weighted else None)
        tried[name] = {"tree_nodes_before_local_search": size + lone_count}
        if weighted and len(candidates) > 1:
            tried[name]["tree_tokens_before_local_search"] = cost + lone_weight
        built.append((cost, len(built), name, orders))
    _, _, name, orders = min(built)
    if orders is None:
        orders = greedy.orders(rank, sorted_from.setdefault(name, []))
    if name in tries:
        trie, paths = tries[name]
    else:
        trie = BlockTrie()
        paths = trie.insert_all(orders, w)
    tried[name]["tree_nodes_before_local_search"] = trie.size + lone_count
    passes = (_local_search(trie, orders, paths, w, freq, local_search_passes,
                            overlaps if len(overlaps) == len(orders) else None, rank=rank,
                            sorted_from=sorted_from.get(name), held=held[0] if held else None)
              if local_search_passes else 0)
    tried[name].update(tree_nodes=trie.size + lone_count, passes=passes)
    if weighted:
        tried[name]["tree_tokens"] = _live_weight(trie) + lone_weight
    schedule = _depth_first_order(trie, paths)

    # Back to the caller's blocks (a map over the list's item lookup: no Python step per block).
    original = originals.__getitem__
    if extras is None:
        out = [list(map(original, o + solo if solo else o)) for o, solo in zip(orders, lone)]
    else:
        out = [list(map(original, itertools.chain(o, solo, extra))) for o, solo, extra in zip(orders, lone, extras)]
    total = len(shared_ids) + lone_count
    tree_nodes = trie.size + lone_count
    stats = {
        "requests": len(ctxs),
        "unique_blocks": len(originals),
        "total_blocks": total,
        "strategy": name,
        "strategies": tried,
        "tree_nodes": tree_nodes,
        # Exact for a block-level cache with unlimited capacity (distinct blocks only).
        "predicted_hit_ratio": (total - tree_nodes) / total if total else 0.0,
    }
    return BatchPlan(contexts=out, order=schedule, stats=stats)
