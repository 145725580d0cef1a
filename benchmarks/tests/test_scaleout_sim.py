"""The scale-out simulation's parts: replica prefix cache, eviction sync, arms; no engine."""
from __future__ import annotations

import random

from benchmarks.scaleout.replica import PromptCache, Replica
from benchmarks.scaleout.simulate import ARMS, SimRequest, markdown, router_view, run_arm
from cp_engine.sim import simulate


def _requests(n, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        blocks = rng.sample(range(1, 40), rng.randrange(3, 8))
        out.append(SimRequest(tuple(blocks), tuple(5 + b * 7 % 45 for b in blocks), 7))  # a block's tokens are fixed
    return out


def test_an_unbounded_cache_serves_what_the_core_simulator_serves():
    reqs = _requests(60)
    weights = {b: n for r in reqs for b, n in zip(r.blocks, r.tokens)}
    cache = PromptCache(None)
    served = sum(cache.access(r.blocks, r.tokens)[0] for r in reqs)
    assert served == simulate([r.blocks for r in reqs], weights=weights).hits


def test_the_cache_evicts_least_recently_used_leaves_and_reports_their_paths():
    cache = PromptCache(capacity=30)
    assert cache.access([1, 2], [10, 10]) == (0, [])
    assert cache.access([3], [10]) == (0, [])
    served, evicted = cache.access([1, 4], [10, 10])  # 40 tokens: leaf 2, last used first, goes
    assert served == 10 and evicted == [[1, 2]]
    served, evicted = cache.access([5], [10])  # then 3, now the least recently used leaf
    assert evicted == [[3]] and cache.used == 30
    assert cache.access([1, 4], [10, 10])[0] == 20


def test_the_prompt_being_served_is_never_evicted():
    cache = PromptCache(capacity=10)
    served, evicted = cache.access([1, 2, 3], [10, 10, 10])
    assert served == 0 and evicted == [] and cache.used == 30
    assert cache.access([1, 2, 3], [10, 10, 10])[0] == 30


def test_a_replica_with_the_plugin_aligns_to_its_cache_and_forgets_what_it_evicted():
    rep = Replica(capacity=None, plugin=True)
    head = [(("system",), 5)]
    assert rep.serve([1, 2, 3], [10, 10, 10], head, [(("q", 0), 2)]) == (37, 0)
    total, served = rep.serve([3, 2, 1, 9], [10, 10, 10, 10], head, [(("q", 1), 2)])
    assert served == 35  # reordered to 1, 2, 3 behind the system prompt
    small = Replica(capacity=40, plugin=True)
    small.serve([1, 2, 3], [10, 10, 10], head, [(("q", 0), 2)])
    small.serve([7, 8, 9], [10, 10, 10], head, [(("q", 1), 2)])  # pushes 1, 2, 3 out
    assert small.index.match_length([1, 2, 3]) < 3  # eviction sync reached the index
    off = Replica(capacity=None, plugin=False)
    off.serve([1, 2, 3], [10, 10, 10], head, [(("q", 0), 2)])
    assert off.serve([3, 2, 1], [10, 10, 10], head, [(("q", 1), 2)])[1] == 5  # only the system prompt


def test_router_views_and_keys_do_not_depend_on_retrieval_order():
    a = SimRequest((5, 3, 9), (1, 2, 3), 4)
    b = SimRequest((9, 5, 3), (3, 1, 2), 4)
    assert router_view(a, 0, "canonical", 6) == router_view(b, 0, "canonical", 6)
    assert router_view(a, 0, "blind", 6).units == (("system",), ("q", 0))
    assert router_view(a, 0, "retrieval", 6).units[1:4] == (5, 3, 9)
    assert router_view(a, 0, "retrieval", 6).key == router_view(b, 0, "retrieval", 6).key


def test_every_arm_runs_and_the_table_compares_with_round_robin():
    reqs = _requests(120, 1)
    rows = [run_arm(arm, reqs, 4, 400, 6, 1.25, 0.5) for arm in ARMS]
    for row in rows:
        assert row["prompt_tokens"] == row["cached_tokens"] + row["recomputed_tokens"]
        assert 0.25 <= row["hottest_share"] <= 1.25 * 0.25 + 1 / 120
    by = {r["arm"]: r for r in rows}
    assert by["round_robin+plugin"]["cached_tokens"] > by["round_robin"]["cached_tokens"]
    table = markdown({"workload": "w", "requests": 120, "capacity_tokens": 400, "factor": 1.25, "threshold": 0.5,
                      "rows": rows})
    assert table.count("\n| 4 |") == len(ARMS) and "1.00×" in table


def test_api_servers_sharing_every_record_behave_like_one_and_own_indexes_do_not():
    from benchmarks.scaleout.api_servers import markdown as api_markdown, run

    reqs = _requests(200, 2)
    one = run(reqs, 1, False, None, 6)
    shared = run(reqs, 3, True, None, 6)
    own = run(reqs, 3, False, None, 6)
    assert shared["recomputed_tokens"] == one["recomputed_tokens"]
    assert own["recomputed_tokens"] > one["recomputed_tokens"]  # each index saw a third of the requests
    rows = [{"capacity_tokens": None, **r} for r in (one, shared, own)]
    assert "+0.0%" in api_markdown({"workload": "w", "requests": 200, "rows": rows})


def test_a_looser_load_bound_lets_the_hottest_replica_take_more():
    from benchmarks.scaleout.load_sweep import markdown as sweep_markdown

    reqs = _requests(300, 4)
    aff = next(a for a in ARMS if a.name == "block_affinity+plugin")
    rr = next(a for a in ARMS if a.name == "round_robin+plugin")
    rows = [{"factor": None, **run_arm(rr, reqs, 6, 400, 6, 1.0, 0.5)}]
    rows += [{"factor": f, **run_arm(aff, reqs, 6, 400, 6, f, 0.5)} for f in (1.0, 100.0)]
    assert rows[1]["hottest_share"] <= 1 / 6 + 1 / 300
    assert rows[2]["hottest_share"] > rows[1]["hottest_share"]  # bottom-1 MinHash keys are skewed
    table = sweep_markdown({"workload": "w", "requests": 300, "replicas": 6, "capacity_tokens": 400, "rows": rows})
    assert table.count("| block_affinity |") == 2


def test_the_ceiling_rows_bound_what_routing_can_win(tmp_path):
    from benchmarks.scaleout.ceiling import ceiling_rows, floor_recomputed, markdown, plot

    reqs = _requests(150, 5)
    rows = ceiling_rows(reqs, 3, 300, 6)
    by = {r["row"]: r for r in rows}
    assert list(by) == ["round_robin+plugin", "block_affinity+plugin", "pooled", "unbounded", "offline", "floor"]
    assert by["round_robin+plugin"]["vs_round_robin"] == 1.0
    floor = floor_recomputed(reqs, 6)
    assert by["floor"]["recomputed_tokens"] == floor
    # Every block of 39 ids computed once, the 150 questions (7 each) and the system prompt once.
    assert floor == sum({b: n for r in reqs for b, n in zip(r.blocks, r.tokens)}.values()) + 150 * 7 + 6
    assert all(r["recomputed_tokens"] >= floor for r in rows)
    # One cache that never evicts serves at least what it did with less room.
    assert by["unbounded"]["recomputed_tokens"] <= by["pooled"]["recomputed_tokens"]
    data = {"replicas": 3, "target": 1.5, "runs": [{"workload": "w", "requests": 150, "capacity_tokens": 300,
                                                     "rows": rows}]}
    table = markdown(data)
    assert "one replica, 3x the cache" in table and table.count("\n| ") == 7
    plot(data, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 0


def test_router_live_arms_mark_blocks_as_each_router_forwards_them():
    from types import SimpleNamespace

    from benchmarks.scaleout.router_live import ARMS, DEFAULT_ARMS, arm_requests
    from cp_engine.marking import find_marks

    rag = SimpleNamespace(docs=[["doc a", "doc b"], ["doc b", "doc c"]], queries=["q1?", "q2?"])
    by = {arm: arm_requests(arm, rag, "sys") for arm in ARMS}
    assert "on/smg_manual" not in DEFAULT_ARMS and DEFAULT_ARMS[-1] == "on/round_robin"
    body, headers = by["on/smg_manual"][0]
    assert "context_blocks" not in body and headers["X-SMG-Routing-Key"]
    marks = find_marks(body, body["messages"])  # what the replica's plugin reads behind SGLang's router
    assert marks.blocks == ["doc a", "doc b"] and marks.source == "template_kwargs"
    assert find_marks(*(lambda b: (b, b["messages"]))(by["on/round_robin"][1][0])).blocks == ["doc b", "doc c"]
    assert find_marks({}, by["off/round_robin"][0][0]["messages"]) is None  # plain text, unmarked


def test_a_longer_key_lead_makes_more_keys_and_the_sweep_reports_it():
    from benchmarks.scaleout.load_sweep import markdown as sweep_markdown
    from cp_engine.scaleout.key import key_hash

    reqs = _requests(300, 4)
    assert len({key_hash(r.blocks, 3) for r in reqs}) > len({key_hash(r.blocks, 1) for r in reqs})
    aff = next(a for a in ARMS if a.name == "block_affinity+plugin")
    rr = next(a for a in ARMS if a.name == "round_robin+plugin")
    one, three = (run_arm(aff, reqs, 6, 400, 6, 100.0, 0.5, lead) for lead in (1, 3))
    assert three["hottest_share"] < one["hottest_share"]  # one hot key pulls fewer requests
    rows = [{"factor": None, **run_arm(rr, reqs, 6, 400, 6, 1.0, 0.5)},
            {"factor": 100.0, "lead": 1, **one}, {"factor": 100.0, "lead": 3, **three}]
    table = sweep_markdown({"workload": "w", "requests": 300, "replicas": 6, "capacity_tokens": 400, "rows": rows})
    assert "| block_affinity | 3 | 100 |" in table and "| round_robin | – | – |" in table
