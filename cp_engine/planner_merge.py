"""The clustering candidate tree: merge the most alike requests, bottom up.

In: each request's shared blocks (``sets``), a weight per block, block frequencies,
and where partners come from (posting lists with a hot-block cap, or a kNN graph).
Out: each request's block order, the blocks of every cluster on its path, root
first, each increment most popular first. Each step merges the live pair sharing
the most weight (ties to the tighter pair, then the lower numbers); a merged cluster
holds the blocks both parts hold. The faster paths (first partners in NumPy, counts
from a ``SharedCounts`` table, re-queues from kept ties, the packed-int merge loop)
make the merges of the plain posting-list search, in the same order. ``cluster_cap``
says whether clustering can pay off for a batch and which blocks its search skips.
"""
from __future__ import annotations

import heapq
import itertools
import operator
from collections import Counter, defaultdict

import numpy as np

from .planner_counts import SharedCounts, best_counted, best_summed, count_elements, whole_and_at_least_one
from .planner_overlap import first_partners, hot_rows, weighted_first_partners
from .planner_postings import Postings
from .planner_reach import Membership
from .planner_tree import popularity_rank


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
        self.positive = min(w, default=1.0) > 0  # then a positive weighted sum marks a partner seen
        self.inter: list[set[int]] = [set(s) for s in sets]
        self.alive = [True] * len(sets)
        self.parent = [-1] * len(sets)
        self.heap: list[tuple[float, int, int, int]] = []

    def exact(self, x: int, y: int) -> tuple[float, int]:
        """(weight of the blocks x and y share, sum of their sizes)."""
        shared = self.inter[x] & self.inter[y]
        # Unit weights: the same float as the sum, without a step per block.
        score = float(len(shared)) if self.unit else sum(map(self.w.__getitem__, shared))
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
        (``rank``: ``popularity_rank(freq)``, when the caller has it). ``sorted_from``:
        filled with where each request's own increment starts (sorted from there on)."""
        inter, parent = self.inter, self.parent
        if rank is None:
            rank = popularity_rank(freq)
        # A parent is numbered after its children: walking down from the last cluster,
        # every parent's full order is known before its children extend it.
        full: list[list[int]] = [[]] * len(inter)
        key = rank.__getitem__  # tail_order's sort, on the sets themselves
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


def cluster_by_postings(sets: list[list[int]], w: list[float], freq: list[int], hot_cap: int,
                         candidates: int = 8, overlaps: list | None = None, postings: Postings | None = None,
                         rank: list[int] | None = None, sorted_from: list[int] | None = None,
                         membership: list | None = None) -> list[list[int]]:
    """Bottom-up clustering (see ``_Merges``) with partners from an inverted index.

    Blocks held by more than ``hot_cap`` clusters are skipped when looking for
    partners (they still count in the exact score): popular blocks are the greedy
    split's strength, rare shared blocks are this one's. ``overlaps``: with unit
    weights, filled with ``first_partners``' answer per request, those with a hot
    block included (the local search reuses it). ``postings``: the batch's postings
    of ``sets``, when the caller has them; ``rank``: ``popularity_rank(freq)``,
    likewise. ``sorted_from``: see ``_Merges.orders``. ``membership``: where the count
    table is kept, filled with the requests' ``Membership`` read from it (the local
    search's stay test needs one; the table's request columns never change).
    """
    m = _Merges(sets, w)
    if postings is None:
        postings = Postings(sets, len(freq))
    unit = w.count(1.0) == len(w)  # counted in C
    table = _shared_counts(sets, freq, postings) if unit else _weighted_counts(sets, w, postings)
    if unit and table is not None and membership is not None:
        membership.append(Membership.of_table(table.table[:-1], table.rows, len(sets)))  # (not the spare row)
    # Block -> live clusters holding it (a list indexed by block: a list lookup costs
    # a fraction of a dict's; None for blocks no request shares); the requests are
    # the first clusters. Not kept where the table counts every cluster (unit
    # weights, no block above the cap): _merge_table then updates the table only.
    live: list[set[int]] | None = None
    if not unit or table is None or hot_cap < max(freq, default=0) or max(map(len, sets), default=0) > 255:
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
            _merge_table(m, ties, candidates, table, postings)
        else:
            _merge_unit(m, live, ties, hot_cap, candidates, table)
        return m.orders(freq if rank is None else None, rank, sorted_from)
    firsts = weighted_first_partners(postings, w, hot_cap, candidates) if not unit else None
    for x in range(len(sets)):
        if firsts is None:
            push_best(x)
        else:
            m.push_best(x, firsts[x])  # what the search would return, counted at once
    while (merged := m.next_merge(push_best)) is not None:
        x, y, c = merged
        for z in (x, y):
            for b in m.inter[z]:
                live[b].discard(z)
        for b in m.inter[c]:
            live[b].add(c)
        if table is not None:
            table.kill(x)
            table.kill(y)
            if m.inter[c]:
                table.add(c, m.inter[c])
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
    count = count_elements
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
                 table: SharedCounts, postings: Postings) -> None:
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
    # Every request's rows end to end, each followed by the spare row where it counts:
    # request r's at cut[r]:cut[r + 1].
    n = postings.sizes.size
    cut = (postings.indptr + np.arange(n + 1) * extra).tolist()
    lined = np.full(cut[-1], rows[-1], dtype=np.int64)
    lined[np.arange(postings.blocks.size) + postings.owner * extra] = rows[postings.blocks]
    id_bits = len(table.cells).bit_length()
    spread_at = 2 * id_bits
    top_at = spread_at + (2 * most).bit_length()  # (a spread is at most 2 * most)
    ids = (1 << id_bits) - 1
    # A map that keeps the entries' order keeps the list a heap.
    heap[:] = [((most + s) << top_at) | (spread << spread_at) | (x << id_bits) | y for s, spread, x, y in heap]
    owner = list(range(len(inter)))  # cluster -> the cluster that absorbed it (union-find)
    heappop, heappushpop = heapq.heappop, heapq.heappushpop
    cells = table.cells
    take, cell = table.table.take, table.table
    fromiter, int64, uint8, add, chain = np.fromiter, np.int64, np.uint8, np.add.reduce, itertools.chain
    # A cluster's new entry is pushed as the next one is popped, by one heappushpop:
    # when it is the smallest, it comes straight back without touching the heap.
    pending = -1
    while True:
        if pending >= 0:
            key = heappushpop(heap, pending)
            pending = -1
        elif heap:
            key = heappop(heap)
        else:
            return
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
            cell[:, c][r] = 1  # (a column view: half the time of cell[r, c])
            mark[c] = on
            x, mine = c, ic
        else:
            # x's partner was merged away: re-queue x from its kept ties, or count
            # afresh when none shares as much any more.
            mine = inter[x]
            kept = ties.get(x)
            if kept is not None:
                top, tied = kept
                # (No tie alive, the most common case: recounted without a call.)
                for t in tied:
                    if alive[t]:
                        found = _still_tied(kept, mine, alive, owner, inter)
                        break
                if not found:
                    del ties[x]
                    found = None
            if found is None:
                r = cells[x]
                if r is None:
                    r = cells[x] = (lined[cut[x]:cut[x + 1]] if x < n
                                    else rows[fromiter(chain(mine, spare), int64, len(mine) + extra)])
                counts = add(take(r, axis=0), axis=0, dtype=uint8)
                if not lift:
                    counts *= mark
                counts[x] = 0
        if found is None:
            at = counts.argmax()  # (half as long as max on bytes)
            top = counts.item(at) - lift
            if top <= 0:  # (below the lift: no live cluster but x)
                continue
            found = (counts == counts[at]).nonzero()[0].tolist()  # (a NumPy scalar compares faster)
        ties[x] = (top, found)
        # Of the `candidates` lowest-numbered ties, the one with the fewest blocks, then
        # the lowest number (found is ascending, and min keeps the first of equals).
        y = min(found[:candidates], key=sizes.__getitem__) if len(found) > 1 else found[0]
        pending = ((most - top) << top_at) | ((len(mine) + sizes[y]) << spread_at) | (x << id_bits) | y


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
# The table is kept for the whole clustering once a request's postings hold, on
# average, more than _KEEP_MIN_POSTINGS + (table columns) / _KEEP_COLUMNS_PER_POSTING
# entries. Then every cluster is counted there (_merge_table), and its loop saves more
# than the per-cluster choice above suggests: no tie list built from a dict of
# partners, no postings to keep up to date. Measured (plan CPU time, posting loop /
# table loop, same plans): SQuAD dev top-12 N = 500..4,000, 1.12-1.90x faster with the
# table (~100-765 entries per request); the knowledge base, 0.94-0.98x at N = 500 /
# 1,000 (54 / 103 entries, below the line), 1.01-1.15x from 1,500 to 4,000.
_KEEP_MIN_POSTINGS = 64
_KEEP_COLUMNS_PER_POSTING = 32


def _shared_counts(sets: list[list[int]], freq: list[int], postings: Postings | None = None) -> SharedCounts | None:
    """The table for the clustering, when ``table_fits`` (``postings``: those of ``sets``,
    where the caller has them)."""
    if not table_fits(len(sets), freq):
        return None
    if postings is not None:
        return SharedCounts.for_postings(postings, 2 * len(sets))
    return SharedCounts.for_requests(sets, 2 * len(sets), len(freq))


def _weighted_counts(sets: list[list[int]], w: list[float], postings: Postings | None) -> SharedCounts | None:
    """A weighted ``SharedCounts`` for the token-weighted clustering, where ``table_fits``
    (its cells two or four bytes) and every shared block's weight is a whole number
    of at least 1 (then the table's integer sums are the Python loop's float sums, in
    any order, and a positive sum marks a cluster that shares a block)."""
    # The size test first, on the postings' array (no list conversion): pooled
    # retrieval, the common sparse case, stops here.
    if postings is None or not sets or not table_fits(len(sets), postings.freq, 2):
        return None
    wv = np.asarray(w, dtype=np.float64)
    if not postings.blocks.size or not whole_and_at_least_one(wv, np.flatnonzero(postings.freq)):
        return None
    # The most any cluster can share: the heaviest request's shared weight.
    most = float(np.bincount(postings.owner, weights=wv[postings.blocks], minlength=len(sets)).max())
    dtype = np.uint16 if most < 1 << 16 else np.uint32 if most < 1 << 32 else None
    if dtype is None or (dtype is np.uint32 and not table_fits(len(sets), postings.freq, 4)):
        return None
    return SharedCounts.weighted(postings, 2 * len(sets), wv, dtype)


def table_fits(n: int, freq: list[int], cell_bytes: int = 1) -> bool:
    """Whether the clustering of ``n`` requests keeps a ``SharedCounts`` table of
    ``cell_bytes`` per cell: it fits in ``_TABLE_CELLS`` bytes and postings are long
    enough to use it."""
    f = np.asarray(freq, dtype=np.int64)
    f = f[f > 1]
    clusters = 2 * n
    if not n or f.size * clusters * cell_bytes > _TABLE_CELLS:
        return False
    # Postings too short on average: counting them costs less than the table's passes.
    return int((f * f).sum()) >= n * (_KEEP_MIN_POSTINGS + clusters // _KEEP_COLUMNS_PER_POSTING)


_holders_of = operator.itemgetter(1)  # (block, holders) -> holders


def _posting_partners(m: _Merges, postings: list[set[int]], x: int, hot_cap: int, candidates: int,
                      unit: bool, table: SharedCounts | None = None) -> list[int]:
    """Up to ``candidates`` clusters that can have the best exact score with x.

    ``table``: long postings are counted there instead (same counts, same answer;
    a weighted table for token weights). Without one, long postings under token
    weights are summed in NumPy (``_weighted_partners``, the same sums)."""
    skipped = 0.0  # weight of x's hot blocks, absent from acc
    lists = []
    entries = 0  # posting entries to count (token weights, or a table: a faster path may take them)
    if unit:
        for b in m.inter[x]:
            holders = postings[b]
            if len(holders) > hot_cap:
                skipped += 1.0
            else:
                lists.append((b, holders))
        if table is not None:
            entries = sum(map(len, map(_holders_of, lists)))
    else:
        w = m.w
        for b in m.inter[x]:
            holders = postings[b]
            held = len(holders)
            if held > hot_cap:
                skipped += w[b]
            else:
                lists.append((b, holders))
                entries += held
    if (table is not None and len(lists) < 256
            and entries > _TABLE_MIN_RANKED + table.alive.size // _TABLE_COLUMNS_PER_RANKED):
        counts = table.count(x, [b for b, _ in lists])
        top = int(counts.max())
        if not top:
            return []
        if not unit:
            return _ranked_sums(counts, top - skipped, candidates)
        # At least once (as in acc), most shared first, then the lowest number: nlargest's
        # order below.
        return best_counted(counts, top, max(top - skipped, 1), candidates)
    if not unit and entries >= _WEIGHTED_ARRAY_POSTINGS + len(m.inter) // _WEIGHTED_ARRAY_COLUMNS_PER_POSTING:
        return _weighted_partners(m, lists, x, skipped, candidates, entries)
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


def _ranked_sums(counts: np.ndarray, floor: float, candidates: int) -> list[int]:
    """The clusters sharing some weight with x and at least ``floor``, from a weighted
    table's ``counts`` (whole weights, each at least 1, so a positive count is a
    cluster seen in x's postings): all of them, or the ``candidates`` with the most
    (then the lower number) where there are more: ``_posting_partners``' choice."""
    ranked = np.flatnonzero((counts > 0) & (counts >= floor))
    if ranked.size > candidates:
        ranked = best_summed(ranked, counts[ranked].astype(np.int64), candidates)
    return ranked.tolist()


# From this many posting entries, plus one per this many clusters so far (its
# arrays span them all), a weighted partner search sums them in NumPy
# (``_weighted_partners``) instead of a Python loop per entry.
_WEIGHTED_ARRAY_POSTINGS = 64
_WEIGHTED_ARRAY_COLUMNS_PER_POSTING = 32


def _weighted_partners(m: _Merges, lists: list[tuple[int, set[int]]], x: int, skipped: float,
                       candidates: int, entries: int) -> list[int]:
    """``_posting_partners``' answer for token weights, summed by one ``bincount``.

    Entries are summed in the order the Python loop adds them (block by block, each
    block's holders in set order), so every partner's float sum is the same, and so
    is the set chosen: those within ``skipped`` of the best sum, the ``candidates``
    best by (sum, lower number) when there are more.
    """
    size = len(m.inter)
    ys = np.fromiter(itertools.chain.from_iterable(h for _, h in lists), dtype=np.int64, count=entries)
    ws = np.repeat(np.fromiter((m.w[b] for b, _ in lists), dtype=np.float64, count=len(lists)),
                   np.fromiter((len(h) for _, h in lists), dtype=np.int64, count=len(lists)))
    acc = np.bincount(ys, weights=ws, minlength=size)
    seen = acc > 0 if m.positive else np.bincount(ys, minlength=size) > 0
    seen[x] = False
    held = np.flatnonzero(seen)
    if not held.size:
        return []
    sums = acc[held]
    ranked = held[sums >= sums.max() - skipped]
    if ranked.size > candidates:
        ranked = best_summed(ranked, acc[ranked], candidates)
    return ranked.tolist()


def cluster_by_knn(sets: list[list[int]], w: list[float], freq: list[int], knn,
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


# Postings visited by the clustering's candidate search, roughly (~0.2 s per million
# on one core); above it the cap on "hot" blocks is lowered.
_CLUSTER_WORK_BUDGET = 3_000_000
# When blocks held by more than the cap carry this share of all sharing, popularity
# dominates and the greedy split wins (synthetic Zipf workloads): skip clustering.
_HOT_SHARE_LIMIT = 0.3


def cluster_cap(freq: list[int]) -> int | None:
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
