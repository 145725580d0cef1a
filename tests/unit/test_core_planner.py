"""plan_batch: valid permutations for any input, and it beats arrival order."""
import random
from collections import Counter

import pytest
from hypothesis import given, settings, strategies as st

from cp_engine.kernels.planning import PARTNER_SEARCH
from cp_engine.planner import PartnerSearch, plan_batch
from cp_engine.sim import bound, simulate


def assert_valid(contexts, plan):
    assert sorted(plan.order) == list(range(len(contexts)))
    assert len(plan.contexts) == len(contexts)
    for got, want in zip(plan.contexts, contexts):
        assert Counter(got) == Counter(want)


@given(st.lists(st.lists(st.integers(0, 25), max_size=15), max_size=40))
def test_plan_is_valid_permutation_any_input(contexts):
    assert_valid(contexts, plan_batch(contexts))


@given(st.lists(st.lists(st.text(max_size=3), max_size=6), max_size=20))
def test_plan_handles_text_blocks_and_duplicates(contexts):
    assert_valid(contexts, plan_batch(contexts))


def test_edge_cases():
    assert plan_batch([]).order == [] and plan_batch([]).contexts == []
    assert_valid([[]], plan_batch([[]]))
    assert_valid([[1, 1, 1]], plan_batch([[1, 1, 1]]))
    one = [[3, 1, 2]]
    assert plan_batch(one).order == [0]


def test_fifty_thousand_single_block_requests():
    rng = random.Random(0)
    contexts = [[rng.randrange(5000)] for _ in range(50_000)]
    plan = plan_batch(contexts)
    assert_valid(contexts, plan)


def test_unequal_token_lengths_weight_the_shared_prefix():
    # Block 9 is shared by 2 requests but is 50x longer than block 1 shared by 3.
    contexts = [[1, 9, 2], [1, 9, 3], [1, 4, 5], [6, 1, 7]]
    lengths = {1: 1, 9: 50, 2: 1, 3: 1, 4: 1, 5: 1, 6: 1, 7: 1}
    plan = plan_batch(contexts, token_lengths=lengths)
    assert_valid(contexts, plan)
    weighted = simulate(plan.scheduled(), weights=lengths).hits
    assert weighted >= 50 + 1  # the long block's second copy is a hit, plus a short one
    per_ctx = plan_batch(contexts, token_lengths=[[lengths[b] for b in c] for c in contexts])
    assert simulate(per_ctx.scheduled(), weights=lengths).hits == weighted


def test_bad_input_is_rejected_clearly():
    with pytest.raises(TypeError, match="list of block lists"):
        plan_batch("abc")
    with pytest.raises(TypeError, match=r"contexts\[1\]"):
        plan_batch([[1], 5])
    with pytest.raises(TypeError, match="unhashable"):
        plan_batch([[[1, 2]]])
    with pytest.raises(ValueError, match="token_lengths"):
        plan_batch([[1, 2]], token_lengths=[[1]])


def zipf_workload(n, seed=0, corpus=300):
    rng = random.Random(seed)
    weights = [1 / (r + 1) for r in range(corpus)]
    out = []
    for _ in range(n):
        k = rng.randint(5, 12)
        chosen = set()
        while len(chosen) < k:
            chosen.add(rng.choices(range(corpus), weights)[0])
        docs = list(chosen)
        rng.shuffle(docs)
        out.append(docs)
    return out


@pytest.mark.parametrize("capacity", [None, 40, 150])
def test_plan_beats_arrival_order_in_lru_prefix_cache(capacity):
    contexts = zipf_workload(400)
    plan = plan_batch(contexts)
    planned = simulate(plan.scheduled(), capacity=capacity).hit_ratio
    arrival = simulate(contexts, capacity=capacity).hit_ratio
    assert planned > arrival + 0.05
    assert planned <= bound(contexts) + 1e-9


def test_predicted_hit_ratio_matches_unbounded_simulation():
    contexts = zipf_workload(300, seed=3)
    plan = plan_batch(contexts)
    assert simulate(plan.scheduled()).hit_ratio == pytest.approx(plan.stats["predicted_hit_ratio"])


def test_local_search_never_grows_the_tree():
    contexts = zipf_workload(300, seed=5)
    plan = plan_batch(contexts)
    chosen = plan.stats["strategies"][plan.stats["strategy"]]
    assert chosen["tree_nodes"] == plan.stats["tree_nodes"] <= chosen["tree_nodes_before_local_search"]
    # The candidate kept is the smallest tree before local search.
    assert all(chosen["tree_nodes_before_local_search"] <= t["tree_nodes_before_local_search"]
               for t in plan.stats["strategies"].values())
    no_ls = plan_batch(contexts, local_search_passes=0)
    assert simulate(plan.scheduled()).hits >= simulate(no_ls.scheduled()).hits


def test_lone_blocks_go_last_in_retrieval_order():
    # Blocks held by one request cannot be shared: they follow the shared ones, in
    # the order the request gave them.
    contexts = [["x1", "s", "x2", "t"], ["u", "s", "t", "y"], ["v", "t"]]
    plan = plan_batch(contexts)
    assert plan.contexts[0][2:] == ["x1", "x2"]
    assert set(plan.contexts[1][:2]) == {"s", "t"} and plan.contexts[1][2:] == ["u", "y"]
    assert plan.contexts[2] == ["t", "v"]
    assert plan.stats["tree_nodes"] == len(set(map(tuple, [c[:i] for c in plan.contexts for i in range(1, len(c) + 1)])))


def test_schedule_is_depth_first_groups_contiguous():
    contexts = [[1, 2, 3], [7, 8], [1, 2, 4], [7, 9], [1, 5]]
    plan = plan_batch(contexts)
    firsts = [plan.contexts[i][0] for i in plan.order]
    # requests sharing a first block run consecutively
    runs = [b for i, b in enumerate(firsts) if i == 0 or firsts[i - 1] != b]
    assert len(runs) == len(set(runs))


def clustered_workload(n_topics=30, per_topic=8, seed=1):
    """Requests drawn from topics: each topic has its own documents plus a few
    popular cross-topic documents, like BM25 top-k over a knowledge base."""
    rng = random.Random(seed)
    popular = list(range(1000, 1010))
    out = []
    for t in range(n_topics):
        topic_docs = list(range(t * 20, t * 20 + 20))
        for _ in range(per_topic):
            docs = rng.sample(topic_docs[:8], 4) + rng.sample(topic_docs[8:], 3) + rng.sample(popular, 2)
            rng.shuffle(docs)
            out.append(docs)
    rng.shuffle(out)
    return out


@pytest.mark.parametrize("make", [zipf_workload, clustered_workload])
def test_auto_is_at_least_as_good_as_each_strategy(make):
    contexts = make(300) if make is zipf_workload else make()
    hits = {s: simulate(plan_batch(contexts, strategy=s).scheduled()).hits for s in ("greedy", "cluster", "auto")}
    assert hits["auto"] >= max(hits["greedy"], hits["cluster"]) or plan_batch(contexts).stats["strategy"] == "greedy"
    assert hits["auto"] >= hits["greedy"]


def test_clustering_beats_greedy_on_topic_clustered_retrieval():
    contexts = clustered_workload()
    greedy = simulate(plan_batch(contexts, strategy="greedy").scheduled()).hits
    cluster = simulate(plan_batch(contexts, strategy="cluster").scheduled()).hits
    assert cluster > greedy


def test_unknown_strategy_rejected():
    with pytest.raises(ValueError, match="strategy"):
        plan_batch([[1]], strategy="magic")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 30), max_size=12), max_size=40),
       st.sampled_from(["auto", "cluster"]))
def test_kernel_partner_search_gives_valid_plans(contexts, strategy):
    # The kNN-graph clustering (partners from cp_engine.kernels) on any input.
    plan = plan_batch(contexts, strategy=strategy, partners="kernel", partner_search=PARTNER_SEARCH)
    assert_valid(contexts, plan)
    # The prediction counts distinct blocks; compare on requests without repeats.
    contexts = [list(dict.fromkeys(c)) for c in contexts]
    plan = plan_batch(contexts, strategy=strategy, partners="kernel", partner_search=PARTNER_SEARCH)
    assert simulate(plan.scheduled()).hit_ratio == pytest.approx(plan.stats["predicted_hit_ratio"])


def test_kernel_partner_search_finds_the_shared_groups():
    contexts = clustered_workload()
    arrival = simulate(contexts).hits
    knn = plan_batch(contexts, strategy="cluster", partners="kernel", partner_search=PARTNER_SEARCH)
    assert knn.stats["strategy"] == "cluster_knn"
    postings = simulate(plan_batch(contexts, strategy="cluster", partners="postings").scheduled()).hits
    # Close to the exact posting-list search, far above arrival order.
    assert simulate(knn.scheduled()).hits >= 0.95 * postings > arrival


def test_auto_uses_postings_without_a_gpu():
    # On a CPU-only machine the kernel would run on NumPy: auto keeps the posting search.
    import cp_engine
    from cp_engine.kernels.planning import runs_on_gpu
    if runs_on_gpu(10_000):
        pytest.skip("GPU kernel available: auto may take the kNN path")
    plan = cp_engine.plan_batch(zipf_workload(1200), partners="auto")
    assert plan.stats["strategy"] in ("greedy", "cluster")


def test_public_plan_batch_plugs_in_the_kernel_partner_search():
    import cp_engine

    contexts = clustered_workload()
    assert cp_engine.plan_batch(contexts, strategy="cluster", partners="kernel").stats["strategy"] == "cluster_knn"
    assert cp_engine.plan_batch(contexts) == plan_batch(contexts, partner_search=PARTNER_SEARCH)


def test_unknown_partner_search_rejected():
    with pytest.raises(ValueError, match="partners"):
        plan_batch([[1]], partners="magic")
    with pytest.raises(ValueError, match="partner_search"):
        plan_batch([[1]], partners="kernel")  # the core has no kNN search of its own


def hot_batch(n=1100, seed=0):
    """Every request holds blocks 0-9: too hot for the posting search (auto's kNN case)."""
    rng = random.Random(seed)
    return [list(range(10)) + rng.sample(range(10, 3000), 5) for _ in range(n)]


def test_auto_asks_the_supplied_partner_search_and_uses_its_graph():
    asked, found = [], []

    def find(sets, k, weights):
        found.append((len(sets), k, len(weights)))
        return [[(i + 1) % len(sets)] + [-1] * (k - 1) for i in range(len(sets))]  # a ring

    def use_for(n):
        asked.append(n)
        return True

    contexts = hot_batch()
    plan = plan_batch(contexts, partner_search=PartnerSearch(find=find, use_for=use_for))
    assert asked == [len(contexts)] and found and found[0][:2] == (len(contexts), 16)
    assert "cluster_knn" in plan.stats["strategies"]
    assert_valid(contexts, plan)
    declined = PartnerSearch(find=find, use_for=lambda n: False)
    found.clear()
    assert "cluster_knn" not in plan_batch(contexts, partner_search=declined).stats["strategies"]
    assert not found
    assert "cluster_knn" not in plan_batch(contexts).stats["strategies"]  # none supplied: postings only


def test_core_modules_import_no_kernels_or_hooks():
    """Dependencies run one way (core <- kernels <- hooks): the core receives a scoring
    backend and never imports one. cp_engine/api.py is the composition point that
    plugs the kernels' partner search into the public plan_batch; devtools are tools."""
    import ast
    import os
    import subprocess
    import sys
    from pathlib import Path

    import cp_engine

    pkg = Path(cp_engine.__file__).parent
    core = sorted(p for p in pkg.glob("*.py") if p.name not in ("__init__.py", "api.py"))
    assert any(p.name == "planner.py" for p in core)
    upward = ("kernels", "hooks")
    for path in core:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                names = [(node.module or "")] if node.level == 0 else [
                    f".{node.module or ''}"] + [f".{a.name}" for a in node.names if not node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                parts = name.lstrip(".").split(".")
                local = name.startswith(".") or parts[0] == "cp_engine"
                first = parts[0] if name.startswith(".") else (parts[1] if len(parts) > 1 else "")
                assert not (local and first in upward), f"{path.name} imports {name}"
    # What the package itself loads (the public facade) is the composition point's business.
    modules = ", ".join(f"cp_engine.{p.stem}" for p in core)
    code = ("import sys, cp_engine\n"
            "before = set(sys.modules)\n"
            f"import {modules}\n"
            "print(sorted(m for m in set(sys.modules) - before\n"
            "             if m.startswith(('cp_engine.kernels', 'cp_engine.hooks'))))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "CP_ENGINE_DISABLE": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_cpu_planning_never_imports_torch():
    # The GPU probe must not cost a torch import (seconds, hundreds of MB) without a GPU.
    import subprocess
    import sys
    from cp_engine.kernels.backend import gpu_device_present
    if gpu_device_present():
        pytest.skip("GPU device present")
    code = ("import random, sys\n"
            "from cp_engine import plan_batch\n"
            "rng = random.Random(0)\n"
            # ten blocks in every request: hot enough that the kNN path is considered
            "ctx = [list(range(10)) + rng.sample(range(10, 3000), 5) for _ in range(2100)]\n"
            "plan_batch(ctx)\n"
            "print('torch' in sys.modules, 'triton' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 5), max_size=6), max_size=12),
       st.lists(st.integers(1, 50), min_size=6, max_size=6))
def test_tree_size_counts_the_prefix_tree_nodes(orders, weights):
    """The sort-based count and weight equal those of the prefix tree built block by block."""
    from cp_engine.planner_tree import live_weight, tree_measure, tree_size
    from cp_engine.trie import BlockTrie

    trie = BlockTrie()
    for order in orders:
        trie.insert(order, [float(weights[b]) for b in order])
    assert tree_size(orders) == trie.size
    assert tree_measure(orders, [float(x) for x in weights]) == (trie.size, live_weight(trie))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 6), min_size=1, max_size=6, unique=True), min_size=1, max_size=15),
       st.data())
def test_deepest_contained_without_a_path_answers_as_if_it_were_released(orders, data):
    """The local search asks with the request still inserted: same node as after release."""
    import copy

    from cp_engine.trie import BlockTrie

    trie = BlockTrie()
    paths = [trie.insert(o, [1.0 + (b % 3) for b in o]) for o in orders]
    r = data.draw(st.integers(0, len(orders) - 1))
    members = set(data.draw(st.lists(st.integers(0, 6), max_size=7))) | set(orders[r])
    released = copy.deepcopy(trie)
    released.release(paths[r])
    assert trie.deepest_contained(members, without=paths[r]) == released.deepest_contained(members)


@pytest.mark.parametrize("hot_cap", [10**9, 12])
def test_unit_weight_partner_search_matches_the_general_one(hot_cap):
    """The unit-weight shortcut (counts as exact scores, ties from the rarest postings)
    merges exactly as the general path: uniform weight 2 takes the general path and
    scales every score alike. hot_cap=12 mixes both paths (requests with hot blocks)."""
    from cp_engine.planner_merge import cluster_by_postings

    rng = random.Random(3)
    # Blocks 0-2 are in a third of the requests each half the time: hot at hot_cap=12.
    sets = [list(dict.fromkeys(rng.sample(range(120), rng.randint(1, 8)) + [rng.randrange(3)] * (i % 2)))
            for i in range(200)]
    freq = Counter(b for s in sets for b in s)
    freq = [freq[b] for b in range(120)]
    unit = cluster_by_postings(sets, [1.0] * 120, freq, hot_cap=hot_cap)
    general = cluster_by_postings(sets, [2.0] * 120, freq, hot_cap=hot_cap)
    assert unit == general
    assert [sorted(o) for o in unit] == [sorted(s) for s in sets]


@pytest.mark.parametrize("enabled", [True, False])
def test_planning_restores_the_garbage_collector_state(enabled):
    import gc

    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        plan_batch([[1, 2], [2, 3]])
        assert gc.isenabled() is enabled
        with pytest.raises(TypeError):
            plan_batch([[1, [2]]])  # fails inside the paused block
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()


def weighted_hits(plan, lengths):
    return simulate(plan.scheduled(), weights=lengths).hits


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 30), min_size=1, max_size=10, unique=True), min_size=2, max_size=40),
       st.lists(st.integers(2, 500), min_size=31, max_size=31))
def test_weighted_plan_keeps_the_candidate_sharing_most_tokens(contexts, sizes):
    # With token lengths the candidate trees are compared by tokens, not nodes: the
    # one kept computes the fewest tokens, and local search never adds any.
    lengths = dict(enumerate(sizes))
    plan = plan_batch(contexts, token_lengths=lengths)
    assert_valid(contexts, plan)
    tried = plan.stats["strategies"]
    chosen = tried[plan.stats["strategy"]]
    if len(tried) > 1:
        before = chosen["tree_tokens_before_local_search"]
        assert all(before <= t["tree_tokens_before_local_search"] for t in tried.values())
        assert chosen["tree_tokens"] <= before
    total = sum(lengths[b] for c in contexts for b in set(c))
    assert weighted_hits(plan, lengths) == pytest.approx(total - chosen["tree_tokens"])


def test_weighted_plan_shares_at_least_as_many_tokens_as_each_candidate():
    rng = random.Random(7)
    contexts = zipf_workload(300, seed=2)
    lengths = {b: rng.randint(20, 2000) for c in contexts for b in c}
    plan = plan_batch(contexts, token_lengths=lengths)
    assert len(plan.stats["strategies"]) == 2  # both candidates were built
    got = weighted_hits(plan, lengths)
    for strategy in ("greedy", "cluster"):
        alone = plan_batch(contexts, token_lengths=lengths, strategy=strategy, local_search_passes=0)
        assert got >= weighted_hits(alone, lengths)
