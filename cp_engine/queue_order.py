"""Cache-aware ordering of waiting requests, engine-neutral.

Contract:
- every waiting item carries a *prefix key*: a sequence of hashable parts such that
  two items whose keys share a first ``k`` parts share a cacheable prompt prefix
  (engine block hashes, or context-block ids sent by the API server);
- ``PrefixScheduler.pop()`` serves items so that those sharing a prefix run
  consecutively, depth-first: it keeps serving inside the subtree of the last
  served item's deepest key node that still has waiting items, and when it must
  pick among sibling groups it takes the largest group (ties: the older group);
- aging: once the oldest waiting item has waited longer than ``max_wait_s`` it is
  served first, so aged items leave in arrival order and nothing starves;
- ``peek()`` followed by ``pop()`` with no mutation in between returns the same
  item (engine schedulers peek, then pop or skip the head);
- deterministic: the order depends only on the sequence of calls and clock values;
- cost: ``add`` / ``remove`` are O(d log c) and ``pop`` / ``peek`` amortised
  O(d log c) (d = key depth, c = siblings), independent of the number waiting.

``schedule_order`` sorts a whole list once (SGLang's ``calc_priority``).
"""
from __future__ import annotations

import heapq
import itertools
import time
from typing import Callable, Generic, Hashable, Iterator, Sequence, TypeVar

T = TypeVar("T")

__all__ = ["PrefixScheduler", "schedule_order", "chained_key", "truncated_key"]


def chained_key(hashes: Sequence[Hashable], dense: int = 32, max_depth: int = 128) -> tuple:
    """Prefix key from *chained* block hashes (each one identifies its whole prefix).

    Because a chained hash at position j already implies equality of every earlier
    block, a key may skip positions as long as every request skips the same ones:
    the first ``dense`` positions are kept, then the stride doubles every ``dense``
    positions. This bounds the key depth (and the trie work per request) on very
    long prompts while keeping full resolution near the start.
    """
    out = []
    pos, stride, n = 0, 1, len(hashes)
    while pos < n and len(out) < max_depth:
        out.append(hashes[pos])
        if len(out) % dense == 0:
            stride *= 2
        pos += stride
    return tuple(out)


def truncated_key(parts: Sequence[Hashable], max_depth: int = 128) -> tuple:
    """Prefix key from parts that are *not* chained (context-block ids): keep the head."""
    return tuple(parts[:max_depth])


class _Node:
    """Radix-tree node: ``label`` is the run of key parts on the edge from its parent."""

    __slots__ = ("label", "parent", "children", "items", "count", "heap", "born")

    def __init__(self, label: tuple, parent, born: int) -> None:
        self.label = label
        self.parent = parent
        self.children: dict = {}  # first part of the child's label -> child
        self.items: dict[int, _Entry] = {}  # seq -> entry, insertion (= seq) order
        self.count = 0  # waiting items in this subtree
        # Lazy max-heap of (-count, born, first part) over children; kept only while
        # the node has more than one child (a single child needs no choice).
        self.heap: list = []
        self.born = born


class _Entry:
    __slots__ = ("item", "seq", "t", "key", "node", "live")

    def __init__(self, item, seq: int, t: float, key: tuple) -> None:
        self.item = item
        self.seq = seq
        self.t = t
        self.key = key
        self.node: _Node | None = None
        self.live = True


class PrefixScheduler(Generic[T]):
    """Waiting items ordered depth-first by shared prefix, with an aging bound.

    Items are identified by object identity (``id``); adding an item that is already
    waiting raises ``ValueError``.
    """

    def __init__(self, max_wait_s: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_wait_s = float(max_wait_s)
        self._clock = clock
        self._root = _Node((), None, 0)
        self._born = itertools.count(1)
        self._seq = itertools.count()
        self._entries: dict[int, _Entry] = {}
        self._arrivals: list[tuple[float, int, _Entry]] = []  # lazy min-heap by (t, seq)
        self._cursor: tuple = ()  # key of the last served item
        self._head: _Entry | None = None  # result of the last peek, until a mutation
        self.aged_pops = 0  # pops decided by the aging bound (observability)

    # -- size ---------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __contains__(self, item: object) -> bool:
        return id(item) in self._entries

    # -- mutation -----------------------------------------------------------
    def add(self, item: T, key: Sequence[Hashable], enqueued_at: float | None = None) -> None:
        """Queue ``item`` under prefix ``key``; ``enqueued_at`` defaults to the clock."""
        if id(item) in self._entries:
            raise ValueError("item is already waiting")
        t = self._clock() if enqueued_at is None else float(enqueued_at)
        k = tuple(key)
        hash(k)  # an unhashable part raises here, before the tree is touched
        entry = _Entry(item, next(self._seq), t, k)
        node, i, n = self._root, 0, len(k)
        node.count += 1
        while i < n:
            child = node.children.get(k[i])
            if child is None:
                child = _Node(k[i:], node, next(self._born))
                node.children[k[i]] = child
                if len(node.children) == 2:
                    self._rebuild_heap(node)
                i = n
            else:
                lab = child.label
                if k[i:i + len(lab)] != lab:
                    child = self._split(node, child, _common(k, i, lab))
                i += len(child.label)
            child.count += 1
            if len(node.children) > 1:
                heapq.heappush(node.heap, (-child.count, child.born, child.label[0]))
            node = child
        node.items[entry.seq] = entry
        entry.node = node
        self._entries[id(item)] = entry
        heapq.heappush(self._arrivals, (t, entry.seq, entry))
        self._head = None

    def remove(self, item: T) -> bool:
        """Drop ``item`` if waiting; returns whether it was."""
        entry = self._entries.pop(id(item), None)
        if entry is None:
            return False
        self._detach(entry)
        self._head = None
        return True

    def pop(self) -> T:
        """Remove and return the next item (IndexError when empty)."""
        entry = self._head if self._head is not None and self._head.live else self._choose()
        if self._clock() - entry.t > self.max_wait_s:
            self.aged_pops += 1
        del self._entries[id(entry.item)]
        self._detach(entry)
        self._cursor = entry.key
        self._head = None
        return entry.item

    def peek(self) -> T:
        """The item ``pop()`` would return now (IndexError when empty)."""
        aged = self._aged()
        if aged is not None:
            self._head = aged
        elif self._head is None or not self._head.live:
            self._head = self._choose()
        return self._head.item

    # -- reading --------------------------------------------------------------
    def ordered(self, now: float | None = None) -> list[T]:
        """Every waiting item in the order pops would take at ``now`` with no arrivals."""
        frozen = self._clock() if now is None else now
        twin: PrefixScheduler[T] = PrefixScheduler(self.max_wait_s, clock=lambda: frozen)
        head = self._head if self._head is not None and self._head.live else None
        for entry in sorted(self._entries.values(), key=lambda e: e.seq):
            twin.add(entry.item, entry.key, enqueued_at=entry.t)
        twin._cursor = self._cursor
        out = []
        if head is not None:
            out.append(head.item)  # a pending peek is honoured by the next pop
            twin.remove(head.item)
        while twin:
            out.append(twin.pop())
        return out

    def __iter__(self) -> Iterator[T]:
        return iter(self.ordered())

    def set_cursor(self, key: Sequence[Hashable]) -> None:
        """Continue depth-first from the deepest waiting node along ``key``."""
        self._cursor = tuple(key)
        self._head = None

    # -- internals ------------------------------------------------------------
    def _aged(self) -> _Entry | None:
        arrivals = self._arrivals
        while arrivals and not arrivals[0][2].live:
            heapq.heappop(arrivals)
        if not arrivals:
            return None
        t, _, entry = arrivals[0]
        if self._clock() - t > self.max_wait_s:
            return entry
        return None

    def _choose(self) -> _Entry:
        if not self._entries:
            raise IndexError("pop from an empty scheduler")
        aged = self._aged()
        if aged is not None:
            return aged
        # Nodes exist only while they hold waiting items (root aside), so the
        # deepest node on the last served key is the subtree to finish first.
        node = self._node_at(self._cursor)
        while not node.items:
            node = self._best_child(node)
        return next(iter(node.items.values()))

    def _best_child(self, node: _Node) -> _Node:
        children = node.children
        if len(children) == 1:
            return next(iter(children.values()))
        heap = node.heap
        while True:
            negcount, born, first = heap[0]
            child = children.get(first)
            if child is not None and child.born == born and child.count == -negcount:
                return child
            heapq.heappop(heap)  # stale: count changed or child pruned

    def _rebuild_heap(self, node: _Node) -> None:
        node.heap = [(-c.count, c.born, first) for first, c in node.children.items()]
        heapq.heapify(node.heap)

    def _detach(self, entry: _Entry) -> None:
        entry.live = False
        node = entry.node
        del node.items[entry.seq]
        while node is not None:
            node.count -= 1
            parent = node.parent
            if parent is not None:
                if node.count == 0:
                    del parent.children[node.label[0]]
                    if len(parent.children) <= 1:
                        parent.heap = []
                elif len(parent.children) > 1:
                    heapq.heappush(parent.heap, (-node.count, node.born, node.label[0]))
                    if len(parent.heap) > 4 * len(parent.children) + 16:
                        self._rebuild_heap(parent)
            node = parent
        if len(self._arrivals) > 2 * len(self._entries) + 64:
            self._arrivals = [a for a in self._arrivals if a[2].live]
            heapq.heapify(self._arrivals)

    def _node_at(self, key: tuple) -> _Node:
        """Root of the smallest subtree holding every waiting item that shares the
        longest possible prefix with ``key``."""
        node, i, n = self._root, 0, len(key)
        while i < n:
            child = node.children.get(key[i])
            if child is None:
                break
            node = child  # a partial edge match still names this whole subtree
            if key[i:i + len(child.label)] != child.label:
                break
            i += len(child.label)
        return node

    def _split(self, parent: _Node, child: _Node, m: int) -> _Node:
        """Cut ``child``'s edge after ``m`` parts; the new middle node takes over
        the child's place (and its ``born``, so heap entries in ``parent`` stay valid)."""
        mid = _Node(child.label[:m], parent, child.born)
        mid.count = child.count
        child.label = child.label[m:]
        child.parent = mid
        child.born = next(self._born)
        mid.children[child.label[0]] = child
        parent.children[mid.label[0]] = mid
        return mid


def _common(key: tuple, i: int, label: tuple) -> int:
    """Length of the common run of ``key[i:]`` and ``label`` (at least 1 here)."""
    m, n = 1, min(len(label), len(key) - i)
    while m < n and key[i + m] == label[m]:
        m += 1
    return m


def schedule_order(
    keys: Sequence[Sequence[Hashable]],
    arrivals: Sequence[float] | None = None,
    now: float | None = None,
    max_wait_s: float = 2.0,
    last_key: Sequence[Hashable] | None = None,
) -> list[int]:
    """Serving order (indices into ``keys``) for a whole waiting list at once.

    ``arrivals`` are enqueue times on the same clock as ``now`` (default: list
    position, i.e. the list is already in arrival order and nothing is aged);
    ``last_key`` is the key of the last request served, to continue depth-first.
    The result equals popping every item from a ``PrefixScheduler`` frozen at ``now``
    (aged items first in arrival order, then depth-first from the last one served),
    computed in one pass without the per-pop bookkeeping.
    """
    n = len(keys)
    live = bytearray(b"\x01") * n
    if arrivals is None:
        ranked = list(range(n))
        aged: list[int] = []
    else:
        if len(arrivals) != n:
            raise ValueError(f"{len(arrivals)} arrival times for {n} keys")
        frozen = time.monotonic() if now is None else float(now)
        ranked = sorted(range(n), key=lambda i: (arrivals[i], i))
        aged = [i for i in ranked if frozen - arrivals[i] > max_wait_s]
        for i in aged:
            live[i] = 0
        if aged:
            last_key = keys[aged[-1]]  # each aged pop moves the cursor to its key
    tuples = [k if isinstance(k, tuple) else tuple(k) for k in keys]
    cursor = tuple(last_key) if last_key is not None else None
    out = list(aged)
    _walk(tuples, live, ranked, 0, cursor, out)
    return out


def _walk(keys: list[tuple], live: bytearray, items: list[int], k: int, cursor: tuple | None,
          out: list[int]) -> None:
    """Append the live ``items`` (all sharing ``keys[i][:k]``) in depth-first order.

    ``items`` are in arrival order and include already served (aged) ones: a group's
    age is its first arrival ever, as in ``PrefixScheduler``, where a node lives on
    while any member waits. With a ``cursor``, the subtree it leads into is served
    first, then this node's own items, then the other children.
    """
    if len(items) == 1:  # a lone request: nothing to group (the common leaf case)
        if live[items[0]]:
            out.append(items[0])
        return
    while True:
        here: list[int] = []
        groups: dict = {}  # first part -> [live count, members], in order of first arrival
        for i in items:
            key = keys[i]
            if len(key) == k:
                if live[i]:
                    here.append(i)
            else:
                g = groups.get(key[k])
                if g is None:
                    g = groups[key[k]] = [0, []]
                g[0] += live[i]
                g[1].append(i)
        groups = {part: g for part, g in groups.items() if g[0]}
        if len(groups) != 1 or here:
            break
        # One child and nothing ends here: skip the run all members share (radix
        # compression), found with C-level slice comparisons.
        ((_, members),) = groups.values()
        first = keys[members[0]]
        end = min(len(keys[i]) for i in members)
        for i in members:
            key = keys[i]
            if key[k:end] != first[k:end]:
                lo, hi = k + 1, end  # key[:lo] matches, key[:hi] does not
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    if key[k:mid] == first[k:mid]:
                        lo = mid
                    else:
                        hi = mid
                end = lo
        if cursor is not None and cursor[k:end] != first[k:end]:
            cursor = None  # the last served item left this run: plain depth-first below
        items, k = members, end
    if cursor is not None and len(cursor) > k and cursor[k] in groups:
        _walk(keys, live, groups.pop(cursor[k])[1], k + 1, cursor, out)
    out.extend(here)
    # Most waiting first; sorted() is stable, so ties keep first-arrival order.
    for _, members in sorted(groups.values(), key=lambda g: g[0], reverse=True):
        _walk(keys, live, members, k + 1, None, out)
