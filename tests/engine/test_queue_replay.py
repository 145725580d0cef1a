"""The queue-order replay (``benchmarks.reliability.queue_replay``) on vLLM's real
Scheduler: each order gets the queue it names, runs are reproducible, every request
drains, and the aging bound is what keeps the cache-aware order from starving."""
from __future__ import annotations

import pytest

pytest.importorskip("vllm")
pytest.importorskip("transformers")  # the tiny model's tokenizer and chat template
pytestmark = pytest.mark.vllm

from vllm.v1.core.sched.request_queue import FCFSRequestQueue  # noqa: E402

from benchmarks.reliability import queue_replay as qr  # noqa: E402
from cp_engine.devtools.vllm_scheduler import make_scheduler  # noqa: E402
from cp_engine.hooks.vllm.queue import CacheAwareRequestQueue  # noqa: E402

COST = qr.StepCost(0.010, 100e-6)
SMALL = {"clients": 16, "rounds": 1, "round_s": 15.0, "warmup_s": 5.0, "gap_s": 5.0, "cost": COST}


@pytest.fixture(scope="module")
def tokens():
    return qr.Tokens()


@pytest.fixture(scope="module")
def runs(tokens):
    return {order: qr.replay(order, seed=1, tokens=tokens, **SMALL)[0] for order in qr.ORDERS}


def test_each_order_installs_the_queue_it_names():
    now = [0.0]
    for order, kind in (("fcfs", FCFSRequestQueue), ("cache_aware", CacheAwareRequestQueue)):
        sched = make_scheduler(8, 16)
        qr.install_order(sched, order, lambda: now[0], 2.0)
        # exactly vLLM's class for fcfs, even where the plugin's factory patch is installed
        assert type(sched.waiting) is kind and type(sched.kv_holding_waiting) is kind
    sched = make_scheduler(8, 16)
    qr.install_order(sched, "cache_aware_no_aging", lambda: now[0], 2.0)
    assert sched.waiting._sched.max_wait_s == float("inf")


def test_replay_is_reproducible_and_drains(tokens, runs):
    again = qr.replay("cache_aware", seed=1, tokens=tokens, **SMALL)[0]
    measured = ("add_cpu_us_per_req", "step_cpu_us_per_step")  # real CPU time: varies run to run
    assert {k: v for k, v in again.items() if k not in measured} == \
        {k: v for k, v in runs["cache_aware"].items() if k not in measured}
    for order, r in runs.items():
        # every request sent in the round finished (its latency was recorded)
        assert r["requests"] > 50 and r["too_long"] == 0, order
        assert 0 < r["p50_s"] <= r["p99_s"], order
        assert 1000 < r["prompt_tokens_per_req"] < 1300, order  # the soak's mix, tokenized
        assert r["scheduled_tokens_per_req"] <= r["prompt_tokens_per_req"] + qr.MAX_TOKENS, order
        assert r["add_cpu_us_per_req"] > 0 and r["step_cpu_us_per_step"] > 0, order


def test_aging_bound_keeps_the_tail_near_fcfs(runs):
    fcfs, aged, unaged = runs["fcfs"], runs["cache_aware"], runs["cache_aware_no_aging"]
    # Without the bound, depth-first order keeps serving the groups that keep arriving
    # and some requests wait most of the round; with it, the tail stays near FCFS's.
    assert unaged["p99_s"] > 2 * aged["p99_s"]
    assert aged["p99_s"] < 1.5 * fcfs["p99_s"]
