"""could_move answers the local search's first question as the tree search does, and
the first pass plans the same with its answers as with a search for every request."""
import random

import pytest
from hypothesis import given, settings, strategies as st

from cp_engine import planner_local
from cp_engine.planner import plan_batch
from cp_engine.planner_counts import SharedCounts
from cp_engine.planner_reach import Membership, could_move
from cp_engine.trie import ROOT, BlockTrie


def hang(trie: BlockTrie, path: list[int]) -> int:
    """Depth of the deepest node of ``path`` another request shares too."""
    return next((i for i, n in enumerate(path) if trie.refs[n] < 2), len(path))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.integers(0, 11), min_size=1, max_size=7, unique=True), min_size=2, max_size=30))
def test_could_move_is_whether_the_tree_search_leaves_the_node_a_request_hangs_at(orders):
    trie = BlockTrie()
    paths = trie.insert_all(orders, [1.0] * 12)
    ats = [hang(trie, p) for p in paths]
    todo = [r for r in range(len(orders)) if ats[r] < len(paths[r])]
    want = []
    for r in todo:
        shared = paths[r][ats[r] - 1] if ats[r] else ROOT
        want.append(trie.deepest_contained(set(orders[r]), without=paths[r], known=shared) != shared)
    assert could_move(trie, orders, paths, ats, todo) == want
    # The same answers reading the clustering's count table as the membership.
    table = SharedCounts.for_requests(orders, clusters=2 * len(orders), universe=12)
    held = Membership.of_table(table.table[:-1], table.rows, len(orders))
    assert could_move(trie, orders, paths, ats, todo, held) == want
    own = Membership(orders)
    for seq in orders:
        assert held.lead(seq).tolist() == own.lead(seq).tolist()


def zipf_batch(seed, n, corpus, k):
    rng = random.Random(seed)
    weights = [1 / (r + 1) for r in range(corpus)]
    out = []
    for _ in range(n):
        chosen = set()
        target = rng.randint(k // 2, k)
        while len(chosen) < target:
            chosen.add(rng.choices(range(corpus), weights)[0])
        out.append(rng.sample(sorted(chosen), len(chosen)))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_plans_are_the_same_with_and_without_the_known_stays(seed, monkeypatch):
    contexts = zipf_batch(seed, n=300, corpus=120, k=12)
    with monkeypatch.context() as m:
        m.setattr(planner_local, "_REACH_MIN_PAIRS", 0)  # always
        known = plan_batch(contexts, local_search_passes=3)
    with monkeypatch.context() as m:
        m.setattr(planner_local._KnownStays, "pays", classmethod(lambda cls, freq, n: False))
        m.setattr(planner_local, "_stays", lambda *a: False)  # a tree search for every request
        searched = plan_batch(contexts, local_search_passes=3)
    assert known == searched and known.stats == searched.stats
