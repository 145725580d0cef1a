"""Cache-aware waiting order on SGLang's real ``SchedulePolicy`` and real ``Req`` objects."""
from __future__ import annotations

import random
import time

import pytest

from sglang_support import build_cache, make_req, require_sglang, scheduler_ctx  # noqa: F401

require_sglang()

from cp_engine.hooks import metrics, runtime  # noqa: E402
from cp_engine.hooks.sglang import patch, queue  # noqa: E402

pytestmark = pytest.mark.sglang


def _policy(name="lpm", priority=False):
    from sglang.srt.managers.schedule_policy import SchedulePolicy

    cache, _ = build_cache("unified-rust")
    return SchedulePolicy(name, cache, False, priority, False)


@pytest.fixture
def patched(monkeypatch, scheduler_ctx):
    monkeypatch.setenv("CP_ENGINE_SCHEDULE_MAX_WAIT_S", "1000")
    monkeypatch.delenv("CP_ENGINE_FAULT", raising=False)
    runtime.reset_for_tests()
    metrics.reset()
    assert patch.patch()
    yield
    patch.unpatch()
    runtime.reset_for_tests()


def _prompt(group: int, i: int, shared: int = 192) -> list[int]:
    # `shared` tokens identify the group (three 64-token chunks), then a unique tail.
    return [10 + group] * shared + [100 + (i % 500)] * 20 + [7, i % 97, i % 89]


def _interleaved(n_groups: int, per_group: int, now: float):
    reqs, groups = [], {}
    k = 0
    for rnd in range(per_group):
        for g in range(n_groups):
            r = make_req(f"g{g}-{rnd}", _prompt(g, k), arrival=now - 1.0 + k * 1e-4)
            groups[r.rid] = g
            reqs.append(r)
            k += 1
    return reqs, groups


def _runs(seq) -> int:
    return 1 + sum(1 for a, b in zip(seq, seq[1:]) if a != b)


@pytest.mark.parametrize("policy_name", ["fcfs", "lpm", "dfs-weight"])
def test_groups_run_consecutively(policy_name, patched):
    reqs, groups = _interleaved(3, 6, time.perf_counter())
    policy = _policy(policy_name)
    policy.calc_priority(reqs)
    assert _runs([groups[r.rid] for r in reqs]) == 3
    # Inside a group, arrival order is kept.
    for g in range(3):
        assert [r.rid for r in reqs if groups[r.rid] == g] == [f"g{g}-{k}" for k in range(6)]


def test_aging_puts_the_starving_request_first(patched, monkeypatch):
    monkeypatch.setenv("CP_ENGINE_SCHEDULE_MAX_WAIT_S", "2")
    runtime.reset_for_tests()
    now = time.perf_counter()
    reqs, _ = _interleaved(2, 5, now)
    old = make_req("old", _prompt(9, 0), arrival=now - 30.0)  # waited 30 s > 2 s bound
    reqs.insert(5, old)
    _policy("fcfs").calc_priority(reqs)
    assert reqs[0] is old


def test_no_fcfs_fallback_above_128_waiting(patched):
    """SGLang's LPM sorts nothing above 128 waiting; the wrapper still groups 5,000."""
    now = time.perf_counter()
    rng = random.Random(0)
    reqs = []
    for i in range(5000):
        g = rng.randrange(40)
        reqs.append(make_req(f"{g}:{i}", _prompt(g, i), arrival=now - 2.0 + i * 1e-5))
    group = {r.rid: r.rid.split(":")[0] for r in reqs}
    plain = list(reqs)
    patch.unpatch()
    _policy("lpm").calc_priority(plain)
    assert [r.rid for r in plain] == [r.rid for r in reqs]  # the fallback: arrival order
    assert _runs([group[r.rid] for r in plain]) > 4000
    assert patch.patch()
    policy = _policy("lpm")
    t0 = time.perf_counter()
    policy.calc_priority(reqs)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    policy.calc_priority(reqs)  # unchanged queue: no re-sort
    again = time.perf_counter() - t0
    assert _runs([group[r.rid] for r in reqs]) == 40
    print(f"\n5,000 waiting: first calc_priority {first * 1e3:.0f} ms, unchanged queue {again * 1e3:.1f} ms")


def test_priority_classes_keep_sglang_order(patched):
    now = time.perf_counter()
    reqs = [make_req(f"p{i % 2}-{i}", _prompt(i % 3, i), arrival=now - 1 + i * 1e-3, priority=i % 2)
            for i in range(12)]
    policy = _policy("fcfs", priority=True)
    policy.calc_priority(reqs)
    prios = [r.priority for r in reqs]
    sign = policy.priority_sign
    assert prios == sorted(prios, key=lambda p: p * sign)
    for p in (0, 1):
        groups = [r.origin_input_ids[0] for r in reqs if r.priority == p]
        assert _runs(groups) == len(set(groups))


def test_keyword_and_positional_calls(patched):
    reqs, groups = _interleaved(2, 4, time.perf_counter())
    policy = _policy("fcfs")
    policy.calc_priority(waiting_queue=reqs, running_batch=None, processed_tokens=0)
    assert _runs([groups[r.rid] for r in reqs]) == 2


def test_schedule_flag_off_leaves_order(patched, monkeypatch):
    monkeypatch.setenv("CP_ENGINE_SCHEDULE", "0")
    runtime.reset_for_tests()
    reqs, _ = _interleaved(3, 3, time.perf_counter())
    before = [r.rid for r in reqs]
    _policy("fcfs").calc_priority(reqs)
    assert [r.rid for r in reqs] == before


def test_fault_injection_keeps_sglang_order(patched, monkeypatch):
    monkeypatch.setenv("CP_ENGINE_FAULT", "sglang_schedule")
    reqs, _ = _interleaved(3, 3, time.perf_counter())
    before = [r.rid for r in reqs]
    _policy("fcfs").calc_priority(reqs)
    assert [r.rid for r in reqs] == before
    assert metrics.value("hook_failures", hook="sglang_schedule") == 1


def test_req_key_depends_only_on_prompt_prefix(scheduler_ctx):
    shared = [11] * 192
    a = make_req("a", shared + [5] * 64)
    b = make_req("b", shared + [6] * 64)
    c = make_req("c", [12] * 192 + [5] * 64)
    ka, kb, kc = queue.req_key(a), queue.req_key(b), queue.req_key(c)
    assert len(ka) == 4 and ka[:3] == kb[:3] and ka[3] != kb[3]  # one part per 64 tokens
    assert ka[0] != kc[0]
    assert queue.req_key(a) is ka  # computed once per request


def test_incremental_update_keeps_groups(patched):
    """Between full sorts: admitted requests leave, new ones join their group's run."""
    now = time.perf_counter()
    reqs, groups = _interleaved(3, 6, now)
    policy = _policy("fcfs")
    policy.calc_priority(reqs)
    del reqs[:2]  # admitted by the scheduler
    for rid, g in (("new-2", 2), ("new-0", 0), ("new-5", 5)):
        reqs.append(make_req(rid, _prompt(g, 999), arrival=now))
        groups[rid] = g
    policy.calc_priority(reqs)
    seq = [groups[r.rid] for r in reqs]
    assert _runs(seq) == 4 and len(reqs) == 19
    last0 = max(i for i, g in enumerate(seq) if g == 0)
    assert reqs[last0].rid == "new-0"  # appended to its group's run, not the queue end
    assert reqs[-1].rid == "new-5"


def test_incremental_update_honours_aging(patched, monkeypatch):
    monkeypatch.setenv("CP_ENGINE_SCHEDULE_MAX_WAIT_S", "5")
    runtime.reset_for_tests()
    now = time.perf_counter()
    reqs, _ = _interleaved(2, 4, now)
    policy = _policy("fcfs")
    policy.calc_priority(reqs)
    old = make_req("late-but-old", _prompt(7, 1), arrival=now - 60.0)
    reqs.append(old)
    policy.calc_priority(reqs)
    assert reqs[0] is old


def test_incremental_update_with_a_long_shared_system_prompt(patched):
    """Every prompt starts with the same 256-token system prompt; a new request still
    joins the run of the requests sharing its context, not the end of the queue."""
    system = [9] * 256
    now = time.perf_counter()
    reqs, groups = [], {}
    for k in range(12):
        g = k % 3
        r = make_req(f"s{g}-{k}", system + _prompt(g, k), arrival=now - 1 + k * 1e-4)
        groups[r.rid] = g
        reqs.append(r)
    policy = _policy("fcfs")
    policy.calc_priority(reqs)
    new = make_req("new-1", system + _prompt(1, 999), arrival=now)
    groups["new-1"] = 1
    reqs.append(new)
    policy.calc_priority(reqs)
    seq = [groups[r.rid] for r in reqs]
    assert _runs(seq) == 3
    assert reqs[max(i for i, g in enumerate(seq) if g == 1)] is new
