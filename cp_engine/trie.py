"""Reference-counted prefix tree over block ids, shared by the planner and the index.

Each node stands for one block at one position of a block sequence; the path from
the root to a node is the prefix it represents. A node's ``refs`` counts the live
sequences whose path passes through it; a node with ``refs == 0`` is removed at once,
so the tree only ever claims prefixes some recorded sequence still holds.

Nodes live in parallel lists indexed by node number (cheaper than one object per
node); freed numbers are reused.
"""
from __future__ import annotations

import itertools
from typing import Callable, Collection, Hashable, Sequence

ROOT = 0


class BlockTrie:
    def __init__(self) -> None:
        self.children: list[dict] = [{}]
        self.parent: list[int] = [-1]
        self.block: list[Hashable] = [None]
        self.weight: list[float] = [0.0]
        self.depth_weight: list[float] = [0.0]  # weight of the whole path to the node
        self.depth: list[int] = [0]
        # Upper bound on the path weight of any node below (exact after inserts,
        # an overestimate after removals): lets searches skip shallow subtrees.
        self.height: list[float] = [0.0]
        self.refs: list[int] = [0]
        self.last_use: list[int] = [0]
        # Bumped when a node number dies, so holders of (node, gen) pairs can tell a
        # reused number from the node they referenced.
        self.gen: list[int] = [0]
        self._free: list[int] = []
        self.size = 0  # live nodes, root excluded
        self.total_weight = 0.0  # summed weight of the live nodes

    # -- structure -------------------------------------------------------------
    def _new(self, parent: int, block: Hashable, weight: float) -> int:
        dw = self.depth_weight[parent] + weight
        d = self.depth[parent] + 1
        if self._free:
            n = self._free.pop()
            self.children[n] = {}
            self.parent[n] = parent
            self.block[n] = block
            self.weight[n] = weight
            self.depth_weight[n] = dw
            self.depth[n] = d
            self.height[n] = dw
            self.refs[n] = 0
            self.last_use[n] = 0
        else:
            n = len(self.parent)
            self.children.append({})
            self.parent.append(parent)
            self.block.append(block)
            self.weight.append(weight)
            self.depth_weight.append(dw)
            self.depth.append(d)
            self.height.append(dw)
            self.refs.append(0)
            self.last_use.append(0)
            self.gen.append(0)
        self.children[parent][block] = n
        self.size += 1
        self.total_weight += weight
        return n

    def is_live(self, node: int) -> bool:
        return node == ROOT or (0 < node < len(self.parent) and self.parent[node] >= 0)

    def insert(self, blocks: Sequence[Hashable], weights: Sequence[float], start: int = ROOT, now: int = 0) -> list[int]:
        """Add one reference along ``blocks`` below ``start``; return the path's nodes.

        Nodes between the root and ``start`` are referenced too, so a recorded
        sequence always owns its whole path.
        """
        path = self.path_to(start)
        refs, last_use, children = self.refs, self.last_use, self.children
        for n in path:
            refs[n] += 1
            last_use[n] = now
        node = start
        for b, w in zip(blocks, weights):
            child = children[node].get(b)
            if child is None:
                child = self._new(node, b, float(w))
            refs[child] += 1
            last_use[child] = now
            path.append(child)
            node = child
        if path:
            top = self.depth_weight[path[-1]]
            height = self.height
            for n in path:
                if height[n] < top:
                    height[n] = top
            if height[ROOT] < top:
                height[ROOT] = top
        return path

    def insert_all(self, sequences: Sequence[Sequence[Hashable]],
                   weight: Callable[[Hashable], float] | list[float]) -> list[list[int]]:
        """``[self.insert(s, [weight(b) for b in s]) for s in sequences]`` on an empty trie.

        ``weight``: a block's weight, or a list of float weights indexed by block (the
        planner's dense ids), read without a call. Same nodes, numbers and fields as
        inserting one by one; node creation is inlined because building the planner's
        tree is most of its node creations.
        """
        if len(self.parent) != 1 or self._free:
            raise ValueError("insert_all builds an empty trie")
        if not isinstance(weight, list):
            of = weight
            weight = {b: float(of(b)) for b in itertools.chain.from_iterable(sequences)}
        children, parent, block, wt = self.children, self.parent, self.block, self.weight
        dweight, depth, height, refs = self.depth_weight, self.depth, self.height, self.refs
        paths = []
        first = len(parent)
        total = self.total_weight
        for seq in sequences:
            path = []
            node = ROOT
            for b in seq:
                child = children[node].get(b)
                if child is None:
                    x = weight[b]
                    dw = dweight[node] + x
                    child = len(parent)
                    children.append({})
                    parent.append(node)
                    block.append(b)
                    wt.append(x)
                    dweight.append(dw)
                    depth.append(depth[node] + 1)
                    height.append(dw)
                    refs.append(1)
                    children[node][b] = child
                    total += x
                else:
                    refs[child] += 1
                path.append(child)
                node = child
            if path:
                top = dweight[node]
                for n in path:
                    if height[n] < top:
                        height[n] = top
                if height[ROOT] < top:
                    height[ROOT] = top
            paths.append(path)
        created = len(parent) - first
        # Fields every new node starts with, filled at once.
        self.last_use.extend(itertools.repeat(0, created))
        self.gen.extend(itertools.repeat(0, created))
        self.size += created
        self.total_weight = total
        return paths

    def release(self, path: Sequence[int], gens: Sequence[int] | None = None) -> list[int]:
        """Drop one reference along ``path`` (as returned by insert); return removed nodes.

        With ``gens`` (the nodes' ``gen`` when the path was taken), nodes removed and
        reused since are skipped instead of being wrongly released.
        """
        removed = []
        for i in range(len(path) - 1, -1, -1):
            n = path[i]
            if n == ROOT or not self.is_live(n) or (gens is not None and self.gen[n] != gens[i]):
                continue
            self.refs[n] -= 1
            if self.refs[n] <= 0 and not self.children[n]:
                self._unlink(n)
                removed.append(n)
        return removed

    def _unlink(self, n: int) -> None:
        p = self.parent[n]
        del self.children[p][self.block[n]]
        self.parent[n] = -2  # marks the number dead until reused
        self.gen[n] += 1
        self.refs[n] = 0
        self.children[n] = {}
        self._free.append(n)
        self.size -= 1
        self.total_weight -= self.weight[n]

    def remove_subtree(self, node: int) -> list[int]:
        """Remove ``node`` and everything below it; return the removed nodes."""
        if node == ROOT or not self.is_live(node):
            return []
        order, stack = [], [node]
        while stack:
            n = stack.pop()
            order.append(n)
            stack.extend(self.children[n].values())
        for n in reversed(order):
            self._unlink(n)
        return order

    def path_to(self, node: int) -> list[int]:
        """Nodes from the root's child down to ``node`` (empty for the root)."""
        out = []
        while node > ROOT:
            out.append(node)
            node = self.parent[node]
        out.reverse()
        return out

    def blocks_to(self, node: int) -> list[Hashable]:
        return [self.block[n] for n in self.path_to(node)]

    def find(self, blocks: Sequence[Hashable], start: int = ROOT) -> int | None:
        """Node reached by following ``blocks`` exactly, or None."""
        node = start
        for b in blocks:
            node = self.children[node].get(b)
            if node is None:
                return None
        return node

    # -- queries ---------------------------------------------------------------
    def deepest_contained(
        self,
        members: Collection[Hashable],
        start: int = ROOT,
        budget: int = 4096,
        prefer: Callable[[int], float] | None = None,
        without: Sequence[int] = (),
        known: int = ROOT,
    ) -> int:
        """Deepest node (by path weight) whose path uses only blocks in ``members``.

        Depth-first search restricted to children in ``members``; ties go to the
        larger ``prefer(node)`` (default: more references), then to the older node
        (lower number), which makes the answer deterministic. ``budget`` caps visited nodes so
        adversarial tries (many permutations of one set) stay cheap; past it the best
        node found so far is returned. ``without``: a path as returned by ``insert``;
        the answer is the one ``release(without)`` would give (its nodes count one
        reference less, those only it holds are absent), with the trie left as is.
        ``known``: a node the caller knows qualifies (its path uses only ``members``,
        and it is not one only ``without`` holds); it starts the search as the best
        so far, so shallower subtrees are skipped. The answer is the same as without
        it, as long as the budget is not reached.
        """
        refs = self.refs
        own: set[int] = set(without)
        # The nodes only `without` holds are the end of its path from the first node
        # with at most one reference (references only fall along a path), and below
        # that node there is nothing else: leaving that one node out leaves them all out.
        cut = cut_parent = -1
        for i, n in enumerate(without):
            if refs[n] <= 1:
                cut, cut_parent = n, (without[i - 1] if i else ROOT)
                break
        if prefer is None:
            def score(c: int) -> int:
                return refs[c] - (c in own)
        else:
            score = prefer
        # The node number closes ties so the answer does not depend on set iteration order.
        best, best_key = start, (self.depth_weight[start], score(start) if start else 0, -start)
        if known != ROOT:
            known_key = (self.depth_weight[known], score(known), -known)
            if known_key > best_key:
                best, best_key = known, known_key
        stack = [start]
        visited = 0
        member_count = len(members)
        height, dweight, children = self.height, self.depth_weight, self.children
        bound = best_key[0]  # path weight of the best so far
        while stack and visited < budget:
            node = stack.pop()
            if height[node] < bound:
                continue  # nothing below can be deeper than the best so far
            visited += 1
            kids = children[node]
            if not kids:
                continue
            if len(kids) <= member_count:
                found = [c for b, c in kids.items() if b in members]
            else:
                found = [c for b in members if (c := kids.get(b)) is not None]
            if node == cut_parent and cut in found:
                found.remove(cut)
            for c in found:
                d = dweight[c]
                if d >= bound:  # a shallower node cannot be the best
                    if prefer is None:
                        key = (d, refs[c] - (c in own), -c)
                    else:
                        key = (d, prefer(c), -c)
                    if key > best_key:
                        best, best_key, bound = c, key, d
            # A subtree that cannot hold the best is not pushed: it would be popped and
            # skipped (the bound only rises), so the visits and the budget are the same.
            if len(found) > 1:
                found = [c for c in found if height[c] >= bound]
                if len(found) > 1:
                    # Most promising (tallest) subtree last, so it is searched first.
                    found.sort(key=lambda c: (height[c], -c))
                stack.extend(found)
            elif found and height[found[0]] >= bound:
                stack.append(found[0])
        return best

    def subtree_sizes(self) -> list[int]:
        """Number of live nodes under each node (itself included), index by node number."""
        sizes = [0] * len(self.parent)
        order, stack = [], [ROOT]
        while stack:
            n = stack.pop()
            order.append(n)
            stack.extend(self.children[n].values())
        for n in reversed(order):
            sizes[n] = 1 + sum(sizes[c] for c in self.children[n].values())
        return sizes
