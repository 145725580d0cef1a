"""Reference planners for the benchmarks (same output convention as cp_engine.plan_batch).

``arrival(contexts)``: retrieval order, arrival order: what an engine sees unplanned.
``greedy_trie(contexts)``: plain frequency-greedy trie emitted depth-first. At each
node, among the requests still in the node's group, take the block that most of them
contain as the next child; those requests follow it (and recurse on their remaining
blocks), the rest stay for the next pick. Requests that run out of blocks finish at
the node, before its children, so every request's path is a prefix of what follows.
Children are visited largest first, so a bounded LRU cache keeps the big subtrees.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass


@dataclass
class Plan:
    contexts: list[list]  # contexts[i]: a permutation of input request i
    order: list[int]  # execution order (input indices)


def arrival(contexts) -> Plan:
    return Plan(contexts=[list(c) for c in contexts], order=list(range(len(contexts))))


def greedy_trie(contexts) -> Plan:
    n = len(contexts)
    out: list[list] = [[] for _ in range(n)]
    order: list[int] = []
    # A request repeating a block keeps its copies: the extra copies are placed after
    # its distinct blocks (they can never extend a shared prefix further).
    extras = [list((Counter(c) - Counter(set(c))).elements()) for c in contexts]
    # Explicit stack instead of recursion: each frame is (group, remaining sets, prefix).
    stack = [([i for i in range(n)], [set(c) for c in contexts], [])]
    while stack:
        group, remaining, prefix = stack.pop()
        done = [i for i, r in zip(group, remaining) if not r]
        for i in done:
            out[i] = prefix + extras[i]
            order.append(i)
        live = [(i, r) for i, r in zip(group, remaining) if r]
        counts = Counter(b for _, r in live for b in r)
        children = []
        while live:
            # Most frequent block; ties by first appearance keep it deterministic.
            block = max(counts, key=counts.__getitem__)
            take, keep = [], []
            for i, r in live:
                (take if block in r else keep).append((i, r))
            for _, r in take:
                counts.subtract(r)
                r.discard(block)
            for b in [b for b, c in counts.items() if c <= 0]:
                del counts[b]
            children.append(([i for i, _ in take], [r for _, r in take], prefix + [block]))
            live = keep
        # Stack is LIFO: push the smallest child first so the largest runs first.
        stack.extend(reversed(children))
    return Plan(contexts=out, order=order)


PLANNERS = {"arrival": arrival, "greedy": greedy_trie}
