"""The local search's skip rule: skipping a request no move could affect changes nothing;
and why its first moves on an uncapped clustering tree are sideways."""
import random
from collections import Counter

import pytest

from cp_engine import planner_local, planner_merge
from cp_engine.planner import plan_batch
from cp_engine.planner_merge import cluster_by_postings
from cp_engine.trie import BlockTrie
from test_core_planner_fast_paths import force_table  # (pytest puts this folder on the path)


def workload(seed, n=300, corpus=80):
    rng = random.Random(seed)
    weights = [1 / (r + 1) ** 0.7 for r in range(corpus)]
    out = []
    for _ in range(n):
        chosen = set()
        while len(chosen) < rng.randint(3, 10):
            chosen.add(rng.choices(range(corpus), weights)[0])
        out.append(list(chosen))
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("strategy", ["greedy", "cluster"])
def test_skipping_unaffected_requests_gives_the_plan_of_searching_all(seed, strategy, monkeypatch):
    contexts = workload(seed)
    lengths = {b: 1 + b % 7 for c in contexts for b in c} if seed % 2 else None
    skipped = plan_batch(contexts, token_lengths=lengths, strategy=strategy, local_search_passes=4)
    monkeypatch.setattr(planner_local._MoveLog, "touches", lambda self, *a: True)
    searched = plan_batch(contexts, token_lengths=lengths, strategy=strategy, local_search_passes=4)
    assert skipped == searched
    assert skipped.stats == searched.stats


def _first_answers(orders):
    """Per request whose path others do not wholly share: (depth it hangs at, depth of
    the local search's first answer), on the tree of ``orders`` before any move."""
    trie = BlockTrie()
    paths = trie.insert_all(orders, [1.0] * (1 + max(b for o in orders for b in o)))
    out = []
    for order, path in zip(orders, paths):
        if not path or trie.refs[path[-1]] >= 2:
            continue
        at, shared = planner_local._hang(path, trie.refs)
        node = trie.deepest_contained(set(order), without=path, known=shared)
        out.append((at, int(trie.depth_weight[node])))
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("table", [False, True])
def test_on_an_uncapped_clustering_tree_the_first_moves_are_sideways(seed, table, monkeypatch):
    """docs/planner.md: with unit weights and exact best partners every merge is the best
    live pair and merge scores never rise, so before any move no request holds a node
    deeper than where it hangs (both merge loops: posting lists and the count table)."""
    contexts = workload(seed, n=200 + 50 * seed, corpus=60 + 10 * seed)
    freq = Counter(b for c in contexts for b in c)
    freq = [freq[b] for b in range(max(freq) + 1)]
    w = [1.0] * len(freq)
    with monkeypatch.context() as m:
        force_table(m, on=table)
        assert (planner_merge._shared_counts(contexts, freq) is not None) == table
        orders = cluster_by_postings(contexts, w, freq, hot_cap=max(freq))
    answers = _first_answers(orders)
    assert answers and all(depth == at for at, depth in answers)
    # The question bites where partners are not exact (a hot-block cap: the ranked
    # search looks at 8 candidates) and on orders that were not clustered at all.
    capped = cluster_by_postings(contexts, w, freq, hot_cap=10)
    assert any(depth > at for at, depth in _first_answers(capped))
    rng = random.Random(seed)
    shuffled = [rng.sample(c, len(c)) for c in contexts]
    assert any(depth > at for at, depth in _first_answers(shuffled))
