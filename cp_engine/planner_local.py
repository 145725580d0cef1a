"""Local search on a candidate tree: move each request below the deepest node it contains.

In: the built ``BlockTrie``, each request's order and path in it, weights and block
frequencies; optionally what the clustering already knows (first partners, the
requests' ``Membership``, where each order's sorted tail starts). Out: the number of
passes run; the trie, ``orders`` and ``paths`` are updated in place. A move takes a
request out and re-inserts it under the deepest node whose path it fully contains,
its other blocks most popular first, so no move grows the tree; passes stop when one
does not shrink it. The skip rules (``_MoveLog``, ``_stays``, ``_KnownStays``) leave
out only searches whose answer is known to be where the request already hangs: the
result is that of searching every request in every pass.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from .planner_reach import Membership, could_move
from .planner_tree import popularity_rank, tail_order
from .trie import ROOT, BlockTrie


def local_search(trie: BlockTrie, orders: list[list[int]], paths: list[list[int]], w: list[float],
                  freq: list[int], passes: int, overlaps: list | None = None, rank: list[int] | None = None,
                  sorted_from: list[int] | None = None, held: Membership | None = None) -> int:
    """Re-insert each request at the deepest node it fully contains; returns passes run.

    A request's answer depends only on the nodes whose path it fully contains and
    that are at least as deep as the node it was last placed at (shallower ones
    cannot win), so once placed it is skipped until a move touches such a node (the
    search would give the same order and the same node numbers: skipping changes
    nothing). See ``_MoveLog``. ``overlaps`` (unit weights only): ``first_partners``'
    answer per request, for ``_stays``. ``sorted_from[r]``: an index from which
    ``orders[r]`` is already in ``tail_order`` (None: none known); kept up to date.
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
        rank = popularity_rank(freq)
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
                    ranked = tail_order(tail, rank)
                    if ranked != tail:
                        tail = ranked
                        moved = order[:at] + ranked
                        sorted_from[r] = at
            else:
                head = trie.blocks_to(node)
                placed = set(head)
                tail = tail_order([b for b in order if b not in placed], rank)
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
