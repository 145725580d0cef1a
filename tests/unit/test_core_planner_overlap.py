"""The planner's batch partner search and its requeue shortcut give the answers of
the one-request-at-a-time search they replace."""
import random

import pytest
from hypothesis import given, settings, strategies as st

from cp_engine.planner_merge import cluster_by_postings
from cp_engine.planner_overlap import first_partners


def brute_force(sets, hot_cap, candidates):
    """Count every pair directly: the definition first_partners must meet."""
    freq = {}
    for s in sets:
        for b in s:
            freq[b] = freq.get(b, 0) + 1
    out = []
    for x, sx in enumerate(sets):
        if any(freq[b] > hot_cap for b in sx):
            out.append(None)
            continue
        shared = {y: len(set(sx) & set(sy)) for y, sy in enumerate(sets) if y != x}
        top = max(shared.values(), default=0)
        if top == 0:
            out.append((0, -1, []))
            continue
        ties = sorted(y for y, v in shared.items() if v == top)
        pick = min(ties[:candidates], key=lambda y: (len(sets[y]), y))
        out.append((top, pick, ties))
    return out


@settings(max_examples=80, deadline=None)
@given(st.lists(st.lists(st.integers(0, 20), max_size=8, unique=True), max_size=30),
       st.integers(1, 12), st.integers(1, 4), st.integers(1, 64))
def test_first_partners_match_counting_each_request(sets, hot_cap, candidates, chunk_pairs):
    want = brute_force(sets, hot_cap, candidates)
    # 0: every chunk sorts its pair keys; 10**9: every chunk counts in a dense table,
    # with popular blocks as bit columns (bit_share 0: every shared block; 0.3: some;
    # None: none).
    for dense_cells_per_pair, bit_share in ((0, None), (10**9, None), (10**9, 0.0), (10**9, 0.3)):
        got = first_partners(sets, hot_cap, candidates, chunk_pairs=chunk_pairs,
                             dense_cells_per_pair=dense_cells_per_pair, bit_share=bit_share)
        assert got == want


@pytest.mark.parametrize("longest", [254, 255, 300])
def test_dense_counts_near_the_byte_limit(longest):
    """Dense tables are bytes while every request holds fewer than 255 blocks, int64
    from there on: both give the definition's answer, near and past the limit."""
    rng = random.Random(longest)
    sets = [list(range(longest))] + [rng.sample(range(longest + 40), rng.randint(1, longest)) for _ in range(12)]
    want = brute_force(sets, 10**9, 4)
    for bit_share in (None, 0.3):
        assert first_partners(sets, 10**9, 4, dense_cells_per_pair=10**9, bit_share=bit_share) == want


def test_requeue_from_ties_merges_as_a_full_recount():
    """Unit weights take the batch search and re-queue from kept ties; weight 2
    everywhere scores every pair alike through the general path, which recounts."""
    rng = random.Random(11)
    for n, corpus, k in ((300, 60, 6), (400, 200, 10), (200, 25, 4)):
        sets = [rng.sample(range(corpus), rng.randint(1, k)) for _ in range(n)]
        counts = [0] * corpus
        for s in sets:
            for b in s:
                counts[b] += 1
        unit = cluster_by_postings(sets, [1.0] * corpus, counts, hot_cap=10**9)
        general = cluster_by_postings(sets, [2.0] * corpus, counts, hot_cap=10**9)
        assert unit == general


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 20), max_size=8, unique=True), max_size=30),
       st.integers(1, 12), st.integers(1, 4), st.integers(1, 64))
def test_first_partners_answer_hot_rows_as_without_a_cap(sets, hot_cap, candidates, chunk_pairs):
    """answer_hot: every row gets the answer it would have with no cap; hot_rows names
    the rows the cap would have left out."""
    from cp_engine.planner_overlap import hot_rows
    from cp_engine.planner_postings import Postings

    want = brute_force(sets, 10**9, candidates)
    capped = brute_force(sets, hot_cap, candidates)
    for dense_cells_per_pair in (0, 10**9):
        got = first_partners(sets, hot_cap, candidates, chunk_pairs=chunk_pairs,
                             dense_cells_per_pair=dense_cells_per_pair, answer_hot=True)
        assert got == want
    if sets:
        assert hot_rows(Postings(sets), hot_cap).tolist() == [c is None for c in capped]


def ranked_pick(sets, hot_cap, candidates, x):
    """The clustering's ranked first search for request x, by its definition: partners
    by blocks shared outside the hot ones, within x's hot-block count of the best, the
    `candidates` best of them (count, then number); of those the one sharing the most
    blocks in all, then with the fewest blocks, then the lowest number."""
    freq = {}
    for s in sets:
        for b in s:
            freq[b] = freq.get(b, 0) + 1
    mine = set(sets[x])
    cool = {b for b in mine if freq[b] <= hot_cap}
    part = {y: len(cool & set(sy)) for y, sy in enumerate(sets) if y != x}
    top = max(part.values(), default=0)
    if top == 0:
        return None
    floor = max(top - (len(mine) - len(cool)), 1)
    ranked = [y for y in sorted(part) if part[y] >= floor]
    if len(ranked) > candidates:
        ranked = sorted(ranked, key=lambda y: (-part[y], y))[:candidates]
    y = min(ranked, key=lambda y: (-len(mine & set(sets[y])), len(sets[y]), y))
    return len(mine & set(sets[y])), len(mine) + len(sets[y]), y


@settings(max_examples=80, deadline=None)
@given(st.lists(st.lists(st.integers(0, 20), max_size=8, unique=True), min_size=1, max_size=30),
       st.integers(1, 12), st.integers(1, 4), st.integers(1, 64))
def test_hot_requests_ranked_picks_match_the_ranked_search(sets, hot_cap, candidates, chunk_pairs):
    from cp_engine.planner_overlap import hot_rows
    from cp_engine.planner_postings import Postings

    hot = hot_rows(Postings(sets), hot_cap).tolist()
    ranked = []
    first_partners(sets, hot_cap, candidates, chunk_pairs=chunk_pairs, dense_cells_per_pair=10**9,
                   ranked=ranked)
    want = [ranked_pick(sets, hot_cap, candidates, x) if hot[x] else None for x in range(len(sets))]
    assert ranked == (want if any(hot) else [])  # no hot block: nothing to pick
    ranked = []
    first_partners(sets, hot_cap, candidates, dense_cells_per_pair=0, ranked=ranked)
    assert ranked == []  # a sorted count leaves the hot requests to the caller


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("hot_cap", [25, 6])
def test_clustering_with_and_without_the_hot_picks(seed, hot_cap, monkeypatch):
    from cp_engine import planner_overlap

    rng = random.Random(seed)
    weights = [1 / (r + 1) for r in range(80)]
    sets = [list({rng.choices(range(80), weights)[0] for _ in range(rng.randint(1, 9))}) for _ in range(250)]
    counts = [0] * 80
    for s in sets:
        for b in s:
            counts[b] += 1
    got = cluster_by_postings(sets, [1.0] * 80, counts, hot_cap=hot_cap, overlaps=[])
    monkeypatch.setattr(planner_overlap._HotPicks, "for_batch", classmethod(lambda cls, *a: None))
    want = cluster_by_postings(sets, [1.0] * 80, counts, hot_cap=hot_cap, overlaps=[])
    assert got == want
