"""The planner's faster paths give the answers of the code they stand in for: the
clustering with its NumPy count table merges as with posting lists alone, and the
popularity rank sorts as the (frequency, id) key."""
import random
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cp_engine import planner, planner_greedy, planner_local, planner_merge, planner_tree
from cp_engine.planner_merge import cluster_by_postings
from cp_engine.planner_tree import popularity_rank, tail_order
from cp_engine.planner_counts import SharedCounts
from cp_engine.planner_postings import Postings
from cp_engine.trie import BlockTrie


def zipf_sets(seed, n, corpus, k):
    rng = random.Random(seed)
    weights = [1 / (r + 1) ** 0.9 for r in range(corpus)]
    out = []
    for _ in range(n):
        chosen = set()
        target = rng.randint(1, k)
        while len(chosen) < target:
            chosen.add(rng.choices(range(corpus), weights)[0])
        out.append(sorted(chosen, key=lambda b: rng.random()))
    return out


def force_table(monkeypatch, on: bool):
    if on:  # the table kept, and every question goes to it
        for name in ("_TABLE_MIN_POSTINGS", "_TABLE_MIN_RANKED", "_KEEP_MIN_POSTINGS"):
            monkeypatch.setattr(planner_merge, name, -1)
        for name in ("_TABLE_COLUMNS_PER_POSTING", "_TABLE_COLUMNS_PER_RANKED", "_KEEP_COLUMNS_PER_POSTING"):
            monkeypatch.setattr(planner_merge, name, 10**9)
    else:
        monkeypatch.setattr(planner_merge, "_shared_counts", lambda *args: None)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("hot_cap", [10**9, 25, 6])
def test_count_table_merges_as_posting_lists(seed, hot_cap, monkeypatch):
    """hot_cap 25 and 6 send clusters with hot blocks through the ranked partner
    search; 10**9 keeps every cluster on the unit-weight path."""
    sets = zipf_sets(seed, n=150 + 40 * seed, corpus=60 + 20 * seed, k=9)
    assert_table_merges_as_posting_lists(sets, hot_cap, monkeypatch)


def assert_table_merges_as_posting_lists(sets, hot_cap, monkeypatch):
    freq = Counter(b for s in sets for b in s)
    freq = [freq[b] for b in range(max(freq) + 1)]
    w = [1.0] * len(freq)
    with monkeypatch.context() as m:
        force_table(m, on=False)
        want = cluster_by_postings(sets, w, freq, hot_cap=hot_cap)
    with monkeypatch.context() as m:
        force_table(m, on=True)
        assert planner_merge._shared_counts(sets, freq) is not None
        got = cluster_by_postings(sets, w, freq, hot_cap=hot_cap)
    assert got == want


@pytest.mark.parametrize("seed", range(3))
def test_count_table_merges_as_posting_lists_with_clusters_of_128_blocks_or_more(seed, monkeypatch):
    """Requests of 128 to 255 blocks: the table's loop masks merged-away clusters out
    by a multiply instead of lifting live ones by its spare row."""
    sets = zipf_sets(seed, n=40, corpus=400, k=220)
    assert 128 <= max(map(len, sets)) < 256
    assert_table_merges_as_posting_lists(sets, 10**9, monkeypatch)


@pytest.mark.parametrize("seed", range(3))
def test_plans_are_the_same_with_and_without_the_count_table(seed, monkeypatch):
    contexts = zipf_sets(100 + seed, n=300, corpus=90, k=10)
    with monkeypatch.context() as m:
        force_table(m, on=False)
        want = planner.plan_batch(contexts)
    with monkeypatch.context() as m:
        force_table(m, on=True)
        got = planner.plan_batch(contexts)
    assert got == want and got.stats == want.stats


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 12), min_size=1, max_size=60), st.integers(0, 6), st.integers(1, 10))
def test_best_counted_is_the_sort_by_count_then_number(values, drop, k):
    from cp_engine.planner_counts import best_counted

    counts = np.array(values, dtype=np.uint8)
    top = int(counts.max())
    floor = max(top - drop, 1) - 0.5 * (drop % 2)  # whole and fractional floors
    ranked = [c for c in range(len(values)) if values[c] >= floor]
    want = ranked if len(ranked) <= k else sorted(ranked, key=lambda c: (-values[c], c))[:k]
    assert best_counted(counts, top, floor, k) == want


@pytest.mark.parametrize("seed", range(3))
def test_count_table_from_postings_is_the_table_from_requests(seed):
    sets = zipf_sets(seed, n=80, corpus=40, k=8)
    universe = 45  # (blocks 40..44 held by none)
    want = SharedCounts.for_requests(sets, clusters=160, universe=universe)
    got = SharedCounts.for_postings(Postings(sets, universe), clusters=160)
    for name in ("rows", "table", "alive"):
        assert np.array_equal(getattr(got, name), getattr(want, name))


def test_count_table_counts_live_clusters_only():
    sets = [[0, 1, 2], [1, 2], [2, 3], [0, 3]]
    table = SharedCounts.for_requests(sets, clusters=7, universe=4)
    assert table.count(0, sets[0]).tolist() == [0, 2, 1, 1, 0, 0, 0]
    table.kill(1)
    table.kill(2)
    table.add(4, [2])  # the merge of 1 and 2 shares block 2
    assert table.count(0, sets[0]).tolist() == [0, 0, 0, 1, 1, 0, 0]
    assert table.count(4, [2]).tolist() == [1, 0, 0, 0, 0, 0, 0]


@given(st.lists(st.integers(0, 30), max_size=40))
def test_popularity_rank_sorts_as_frequency_then_id(blocks):
    freq = [0] * 31
    for b in blocks:
        freq[b] += 1
    tail = list(dict.fromkeys(blocks))
    assert tail_order(tail, popularity_rank(freq)) == sorted(tail, key=lambda b: (-freq[b], b))


def greedy_by_definition(sets, w):
    """The greedy split spelled out: within a group, repeatedly take the block most
    worth sharing among the requests not yet taken ((holders - 1) x weight, ties to
    the lower id), give it to all its holders, and split them again on their own."""
    prefix = [[] for _ in sets]
    rem = [set(s) for s in sets]

    def split(group):
        left = list(group)
        while True:
            holders = {}
            for r in left:
                for b in rem[r]:
                    holders.setdefault(b, []).append(r)
            shared = [b for b, h in holders.items() if len(h) >= 2]
            if not shared:
                return
            best = max(shared, key=lambda b: ((len(holders[b]) - 1) * w[b], -b))
            sub = holders[best]
            for r in sub:
                prefix[r].append(best)
                rem[r].discard(best)
            left = [r for r in left if r not in sub]
            split(sub)

    split(range(len(sets)))
    return prefix


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.integers(0, 12), max_size=7, unique=True), max_size=14),
       st.lists(st.sampled_from([1.0, 2.0, 3.5, 0.0]), min_size=13, max_size=13),
       st.sampled_from([(64, 4), (2, 4), (2, 10**9), (2, 0)]))
def test_greedy_split_matches_its_definition(sets, w, paths):
    """Pairs of requests take their common blocks as one run; larger groups one block per level.
    Every way of splitting a group gives the definition's split: scanning the members
    (groups up to _GREEDY_SCAN_GROUP; scan 64 keeps small groups out of NumPy whatever
    the universe), postings, the batch's postings for the first group, and groups in
    NumPy (_SPLIT_PAD 10**9: always; 0: never; from _TABLE_GROUP members in a small
    universe). The tree counted from the split is the tree of the orders it gives."""
    scan, pad = paths
    want = greedy_by_definition(sets, w)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(planner_greedy, "_GREEDY_SCAN_GROUP", scan)
        m.setattr(planner_greedy, "_SPLIT_PAD", pad)
        m.setattr(planner_greedy, "_TABLE_UNIVERSE", -1 if scan >= 64 else 10**9)
        assert planner_greedy.greedy_prefixes(sets, w).prefix == want
        got = planner_greedy.greedy_prefixes(sets, w, Postings(sets, 13))
    assert got.prefix == want
    assert got.rest == [set(s) - set(p) for s, p in zip(sets, want)]
    rank = list(range(13))
    orders = got.orders(rank)
    assert got.tree(None) == planner_tree.tree_measure(orders)
    assert got.tree(w) == planner_tree.tree_measure(orders, w)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(0, 12), max_size=7, unique=True), max_size=40),
       st.sampled_from([(4, 4), (4, 10**9), (64, 10**9)]))
def test_greedy_split_with_unit_weights_matches_its_definition(sets, paths):
    """With unit weights the NumPy split takes the first largest count (no value
    array); groups above 4 go to NumPy when _SPLIT_PAD allows (scan 64: only above 64)."""
    scan, pad = paths
    w = [1.0] * 13
    with pytest.MonkeyPatch.context() as m:
        m.setattr(planner_greedy, "_GREEDY_SCAN_GROUP", scan)
        m.setattr(planner_greedy, "_SPLIT_PAD", pad)
        m.setattr(planner_greedy, "_TABLE_UNIVERSE", -1 if scan >= 64 else 10**9)
        got = planner_greedy.greedy_prefixes(sets, w, Postings(sets, 13))
    assert got.prefix == greedy_by_definition(sets, w)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("weighted", [False, True])
def test_local_search_with_known_sorted_tails_is_the_same(seed, weighted):
    """The orders' sorted tails (where each request's own increment starts) let the
    local search skip re-sorting them: same orders, paths, tree and passes as
    without the hint."""
    sets = zipf_sets(300 + seed, n=250, corpus=80, k=9)
    universe = max(b for s in sets for b in s) + 1
    freq = [0] * universe
    for s in sets:
        for b in s:
            freq[b] += 1
    w = [1.0 + (b % 4) if weighted else 1.0 for b in range(universe)]
    hint: list[int] = []
    orders = cluster_by_postings(sets, w, freq, hot_cap=10**9, sorted_from=hint)
    rank = popularity_rank(freq)
    assert all(tail_order(o[k:], rank) == o[k:] for o, k in zip(orders, hint))
    runs = []
    for known in (hint, None):
        trie = BlockTrie()
        got = [list(o) for o in orders]
        paths = trie.insert_all(got, w)
        passes = planner_local.local_search(trie, got, paths, w, freq, 3, rank=rank,
                                           sorted_from=list(known) if known is not None else None)
        runs.append((got, paths, passes, vars(trie)))
    assert runs[0] == runs[1]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 9), min_size=1, max_size=6, unique=True), min_size=2, max_size=16),
       st.randoms(use_true_random=False))
def test_a_request_said_to_stay_is_where_the_tree_search_leaves_it(sets, rnd):
    """Whenever _stays answers True, BlockTrie.deepest_contained answers the node
    the request hangs at (orders: any arrangement of each request's blocks)."""
    from cp_engine.planner_overlap import first_partners

    orders = [rnd.sample(s, len(s)) for s in sets]
    trie = BlockTrie()
    paths = trie.insert_all(orders, lambda b: 1.0)
    overlaps = first_partners(sets, hot_cap=10**9, candidates=8)
    for r, order in enumerate(orders):
        path = paths[r]
        at = next((i + 1 for i in range(len(path) - 1, -1, -1) if trie.refs[path[i]] >= 2), 0)
        shared = path[at - 1] if at else 0
        members = set(order)
        if planner_local._stays(overlaps[r], at, shared, members, paths, orders):
            assert trie.deepest_contained(members, without=path, known=shared) == shared


@pytest.mark.parametrize("seed", range(4))
def test_plans_are_the_same_with_and_without_the_stay_test(seed, monkeypatch):
    contexts = zipf_sets(200 + seed, n=400, corpus=150, k=10)
    with monkeypatch.context() as m:
        m.setattr(planner_local, "_stays", lambda *a: False)
        want = planner.plan_batch(contexts, local_search_passes=3)
    got = planner.plan_batch(contexts, local_search_passes=3)
    assert got == want and got.stats == want.stats


@pytest.mark.parametrize("seed", range(4))
def test_plans_are_the_same_with_and_without_the_stay_test_where_blocks_are_hot(seed, monkeypatch):
    """Requests holding a block above the clustering's cap get first_partners'
    answer for the stay test too; it must still only skip searches that would not move."""
    contexts = zipf_sets(300 + seed, n=400, corpus=150, k=10)
    freq = Counter(b for c in contexts for b in c)
    cap = sorted(freq.values())[-4]  # the three most popular blocks are hot
    monkeypatch.setattr(planner, "cluster_cap", lambda f: cap)  # plan_batch looks it up in planner
    with monkeypatch.context() as m:
        m.setattr(planner_local, "_stays", lambda *a: False)
        want = planner.plan_batch(contexts, local_search_passes=3)
    got = planner.plan_batch(contexts, local_search_passes=3)
    assert 0 < sum(any(freq[b] > cap for b in c) for c in contexts) < len(contexts)
    assert got == want and got.stats == want.stats


def cluster_cap_by_definition(freq):
    shared = sum(f - 1 for f in freq if f > 1)
    if shared == 0:
        return None
    for cap in sorted({max(freq), 2048, 1024, 512, 256, 128}, reverse=True):
        if sum(f * f for f in freq if 1 < f <= cap) <= planner_merge._CLUSTER_WORK_BUDGET:
            hot = sum(f - 1 for f in freq if f > cap)
            return cap if hot <= planner_merge._HOT_SHARE_LIMIT * shared else None
    return None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.integers(1, 3), st.integers(1, 300), st.integers(1, 5000)), min_size=1, max_size=400))
def test_cluster_cap_in_numpy_is_the_python_sums(freq):
    assert planner_merge.cluster_cap(freq) == cluster_cap_by_definition(freq)


def depth_first_by_definition(trie, paths):
    """Every node visited, children largest subtree first (then the older node), each
    request scheduled when its last node is reached."""
    ends = {}
    for r, path in enumerate(paths):
        ends.setdefault(path[-1] if path else 0, []).append(r)
    order, stack = [], [0]
    while stack:
        node = stack.pop()
        order.extend(ends.get(node, []))
        stack.extend(sorted(trie.children[node].values(), key=lambda c: (trie.refs[c], -c)))
    return order


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 6), max_size=6, unique=True), max_size=20))
def test_schedule_skipping_single_request_chains_is_the_full_walk(orders):
    trie = BlockTrie()
    paths = trie.insert_all(orders, lambda b: 1.0)
    assert planner_tree.depth_first_order(trie, paths) == depth_first_by_definition(trie, paths)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(0, 40), max_size=8, unique=True), max_size=30),
       st.sampled_from([41, 1 << 17, 1 << 62]))
def test_postings_holders_ascend_within_each_block(sets, universe):
    """Each block's holders in request order whichever sort builds them (16-bit
    radix, unique keys, or the stable sort where keys would overflow)."""
    from cp_engine.planner_postings import _holders
    import numpy as np

    p = Postings(sets, 41)
    got = _holders(p.blocks, p.owner, universe, len(sets))
    assert got.tolist() == p.owner[np.argsort(p.blocks, kind="stable")].tolist()
    holders, starts = p.lists()
    for b in range(41):
        assert holders[starts[b]:starts[b + 1]] == [r for r, s in enumerate(sets) if b in s]


def _token_weights(sets, seed, whole=True):
    rng = random.Random(seed)
    top = max(b for s in sets for b in s) + 1
    return [float(rng.randint(1, 300)) if whole else rng.uniform(0.5, 300.0) for _ in range(top)]


def _weighted_clusters(sets, w, hot_cap, monkeypatch, path):
    """cluster_by_postings under token weights with one partner search forced:
    "python" (a loop per posting entry), "sums" (NumPy bincount) or "table"."""
    freq = Counter(b for s in sets for b in s)
    freq = [freq[b] for b in range(len(w))]
    with monkeypatch.context() as m:
        if path != "table":
            m.setattr(planner_merge, "_weighted_counts", lambda *args: None)
        else:
            force_table(m, on=True)
            assert planner_merge._weighted_counts(sets, w, Postings(sets, len(w))) is not None
        m.setattr(planner_merge, "_WEIGHTED_ARRAY_POSTINGS", 0 if path == "sums" else 10**9)
        m.setattr(planner_merge, "_WEIGHTED_ARRAY_COLUMNS_PER_POSTING", 10**9)
        return cluster_by_postings(sets, w, freq, hot_cap=hot_cap)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("hot_cap", [10**9, 25, 6])
def test_weighted_partner_searches_merge_as_the_python_loop(seed, hot_cap, monkeypatch):
    """Whole token weights: the weighted count table and the NumPy sums find the
    partners the per-entry loop finds, hot blocks (their weight skipped) included."""
    sets = zipf_sets(200 + seed, n=120 + 30 * seed, corpus=50 + 15 * seed, k=9)
    w = _token_weights(sets, seed)
    want = _weighted_clusters(sets, w, hot_cap, monkeypatch, "python")
    assert _weighted_clusters(sets, w, hot_cap, monkeypatch, "sums") == want
    assert _weighted_clusters(sets, w, hot_cap, monkeypatch, "table") == want


@pytest.mark.parametrize("seed", range(3))
def test_weighted_sums_match_the_loop_with_fractional_weights(seed, monkeypatch):
    """Fractional weights: no table (its sums are integers), and the NumPy sums add
    each partner's weights in the loop's order, so the floats and the merges agree."""
    sets = zipf_sets(300 + seed, n=160, corpus=70, k=9)
    w = _token_weights(sets, seed, whole=False)
    assert planner_merge._weighted_counts(sets, w, Postings(sets, len(w))) is None
    want = _weighted_clusters(sets, w, 25, monkeypatch, "python")
    assert _weighted_clusters(sets, w, 25, monkeypatch, "sums") == want


def test_weighted_table_refuses_weights_below_one():
    """A zero-weight block would share nothing yet still be a partner in the loop: no table."""
    sets = zipf_sets(7, n=120, corpus=40, k=8)
    w = _token_weights(sets, 7)
    w[sets[0][0]] = 0.0
    assert planner_merge._weighted_counts(sets, w, Postings(sets, len(w))) is None


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("hot_cap", [10**9, 20, 5])
def test_weighted_first_partners_are_the_first_searches_answers(seed, hot_cap, monkeypatch):
    """Every request's first weighted search, all at once: the same partner set as
    _posting_partners asked request by request before any merge."""
    from cp_engine import planner_overlap

    monkeypatch.setattr(planner_overlap, "WEIGHTED_CELLS_PER_PAIR", 10**9)
    sets = zipf_sets(500 + seed, n=100 + 40 * seed, corpus=40 + 20 * seed, k=9)
    w = _token_weights(sets, seed)
    postings = Postings(sets, len(w))
    got = planner_overlap.weighted_first_partners(postings, w, hot_cap, 8)
    m = planner_merge._Merges(sets, w)
    live = [set() for _ in w]
    for r, s in enumerate(sets):
        for b in s:
            live[b].add(r)
    want = [sorted(planner_merge._posting_partners(m, live, x, hot_cap, 8, False)) for x in range(len(sets))]
    assert got == want
    assert any(len(p) == 8 for p in got)  # some requests had more than 8 in reach


def test_weighted_first_partners_decline_what_they_cannot_answer_exactly(monkeypatch):
    from cp_engine import planner_overlap

    sets = zipf_sets(9, n=120, corpus=40, k=8)
    postings = Postings(sets, max(b for s in sets for b in s) + 1)
    fractional = _token_weights(sets, 9, whole=False)
    assert planner_overlap.weighted_first_partners(postings, fractional, 10**9, 8) is None
    zero = _token_weights(sets, 9)
    zero[sets[0][0]] = 0.0
    assert planner_overlap.weighted_first_partners(postings, zero, 10**9, 8) is None
    huge = [2.0 ** 50] * len(zero)  # whole, but sums past 2**53 would round
    assert planner_overlap.weighted_first_partners(postings, huge, 10**9, 8) is None
    monkeypatch.setattr(planner_overlap, "WEIGHTED_CELLS_PER_PAIR", 0)  # too sparse for a table
    assert planner_overlap.weighted_first_partners(postings, _token_weights(sets, 9), 10**9, 8) is None


@pytest.mark.parametrize("seed", range(4))
def test_weighted_plans_are_the_same_with_and_without_the_faster_searches(seed, monkeypatch):
    """Token weights: the plan with the per-entry loop only, and with the first pass,
    the weighted table and the NumPy sums all forced on."""
    from cp_engine import planner_overlap

    contexts = zipf_sets(600 + seed, n=300, corpus=80 + 10 * seed, k=10)
    lengths = {b: 1 + (b * 53 + seed) % 300 for s in contexts for b in s}
    with monkeypatch.context() as m:
        m.setattr(planner_merge, "weighted_first_partners", lambda *args: None)
        m.setattr(planner_merge, "_weighted_counts", lambda *args: None)
        m.setattr(planner_merge, "_WEIGHTED_ARRAY_POSTINGS", 10**9)
        want = planner.plan_batch(contexts, lengths)
    with monkeypatch.context() as m:
        force_table(m, on=True)
        m.setattr(planner_overlap, "WEIGHTED_CELLS_PER_PAIR", 10**9)
        m.setattr(planner_merge, "_WEIGHTED_ARRAY_POSTINGS", 0)
        m.setattr(planner_merge, "_WEIGHTED_ARRAY_COLUMNS_PER_POSTING", 10**9)
        calls = []
        real = planner_merge.weighted_first_partners
        m.setattr(planner_merge, "weighted_first_partners", lambda *a: calls.append(real(*a)) or calls[-1])
        got = planner.plan_batch(contexts, lengths)
    assert calls and calls[0] is not None
    assert got.contexts == want.contexts and got.order == want.order and got.stats == want.stats
