"""The scale-out simulation with blend: synthetic rendering, blend off and on per
replica, routing against per-replica stores, the table; no engine."""
from __future__ import annotations

import random

from benchmarks.blend.engine_model import PrefixCache
from benchmarks.scaleout.simulate import SimRequest
from benchmarks.scaleout.simulate_blend import POLICIES, Arm, Renderer, Setup, arms_for, markdown, plot, run_arm


def _requests(n, seed=0, pool=40):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        blocks = rng.sample(range(1, pool), rng.randrange(3, 8))
        out.append(SimRequest(tuple(blocks), tuple(20 + b * 7 % 45 for b in blocks), 7))
    return out


def test_the_renderer_gives_each_block_its_own_ids_wherever_it_sits():
    render = Renderer(5)
    a = render.render(SimRequest((11, 22), (30, 8), 3), 0)
    b = render.render(SimRequest((22, 11), (8, 30), 3), 1)
    assert a.ids[:5] == b.ids[:5] == [1, 2, 3, 4, 5]
    assert a.spans == [(5, 35), (35, 43)] and len(a.ids) == 46
    assert a.ids[5:35] == b.ids[13:43] and a.ids[35:43] == b.ids[5:13]
    assert a.ids[-3:] != b.ids[-3:]  # questions never share ids
    assert not set(a.ids[5:43]) & set(range(1, 6))


def test_blend_off_is_prefix_caching_and_blend_saves_on_shared_blocks():
    reqs = _requests(60)
    render = Renderer(6)
    prompts = [render.render(r, i) for i, r in enumerate(reqs)]
    cache, computed = PrefixCache(4, None), 0
    for p in prompts:
        computed += len(p.ids) - cache.lookup(p.ids)
        cache.commit(p.ids)
    setup = Setup(block_size=4, cache_tokens=1 << 20, store_tokens=1 << 20)
    off = run_arm(Arm("round_robin", None), reqs, 1, setup, 6)
    on = run_arm(Arm("round_robin", 0.0, None), reqs, 1, setup, 6)
    assert off["computed_tokens"] == computed and off["reused_tokens"] == 0
    assert on["computed_tokens"] < off["computed_tokens"] and on["hit_ratio"] > off["hit_ratio"]


def test_at_one_replica_every_policy_is_the_same():
    reqs = _requests(80, 1)
    setup = Setup(block_size=4, cache_tokens=400, store_tokens=300)
    rows = [run_arm(Arm(p, 0.15), reqs, 1, setup, 6) for p in POLICIES]
    assert len({r["computed_tokens"] for r in rows}) == 1
    assert [a.policy for a in arms_for(1, [0.15], [0], list(POLICIES))] == ["round_robin"] * 2


def test_affinity_keeps_a_block_set_where_its_blocks_are_stored():
    sets = [tuple(range(10 * s + 1, 10 * s + 5)) for s in range(3)]
    reqs = [SimRequest(sets[i % 3], (30,) * 4, 5) for i in range(90)]
    setup = Setup(block_size=4, cache_tokens=64, store_tokens=400, factor=100.0)  # the store holds all three
    rr = run_arm(Arm("round_robin", 0.0), reqs, 4, setup, 6)
    assert rr["hottest_share"] == 23 / 90
    # round-robin stores every set on every replica before it reuses it; the routers once
    for policy in ("block_affinity", "block_overlap"):
        routed = run_arm(Arm(policy, 0.0), reqs, 4, setup, 6)
        assert routed["computed_tokens"] < rr["computed_tokens"]
        assert routed["stored_tokens"] < rr["stored_tokens"]


def test_the_table_gives_round_robin_over_each_router_at_each_replica_count(tmp_path):
    reqs = _requests(100, 2)
    setup = Setup(block_size=4, cache_tokens=300, store_tokens=300)
    rows = [run_arm(a, reqs, r, setup, 6) for r in (1, 4) for a in arms_for(r, [0.0], [0], list(POLICIES))]
    for row in rows:
        assert row["computed_tokens"] <= row["prompt_tokens"]
        assert 0.0 <= row["hottest_computed_share"] <= 1.0
    data = {"setup": {**Setup().__dict__, "system_tokens": 6},
            "workloads": [{"workload": "w", "requests": 100, "rows": rows}]}
    table = markdown(data)
    assert table.count("\n| 4 |") == 2 * len(POLICIES) and "| w | 4 | blend@0 |" in table and "| w | 4 | prefix |" in table
    plot(data, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_the_store_sweep_table_compares_each_policy_with_round_robin_at_each_store_size(tmp_path):
    from benchmarks.scaleout.blend_store_sweep import markdown as sweep_markdown, plot as sweep_plot

    reqs = _requests(100, 3)
    rows = [{"store_tokens": s, **run_arm(Arm(p, 0.15), reqs, 4, Setup(block_size=4, store_tokens=s), 6)}
            for s in (200, 4000) for p in ("round_robin", "block_affinity")]
    data = {"setup": {**Setup().__dict__, "system_tokens": 6}, "replicas": 4, "ratio": 0.15, "depth": 0,
            "workloads": [{"workload": "w", "requests": 100, "block_tokens": 3000, "rows": rows}]}
    table = sweep_markdown(data)
    assert table.count("| round_robin | ") == 2 and table.count("| 1.00× |") >= 2
    sweep_plot(data, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_block_overlap_follows_the_replica_holding_most_of_the_set_within_the_load_bound():
    from benchmarks.scaleout.simulate_blend import BlockOverlap
    from cp_engine.scaleout.routing import RouteRequest

    def req(*blocks):
        return RouteRequest((("system",),) + blocks, (5,) + (10,) * len(blocks))

    router = BlockOverlap(3, store_tokens=30, factor=100.0)
    assert router.route(req(1, 2, 3)) == 0
    assert router.route(req(7, 8)) == 1  # no overlap: the least loaded
    assert router.route(req(3, 2, 9)) == 0  # two of three blocks on replica 0
    assert router.route(req(1)) == 2  # replica 0 dropped block 1 for 9 (30 tokens): the least loaded
    strict = BlockOverlap(2, store_tokens=100, factor=1.0)
    assert [strict.route(req(1, 2)) for _ in range(4)] == [0, 1, 0, 1]  # the bound overrides overlap
