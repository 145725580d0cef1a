"""Per-request hooks count their own thread CPU time (``hook_cpu_seconds``, ``hook_calls``)."""
from __future__ import annotations

import asyncio
import time

import pytest

from cp_engine.hooks import faults, metrics
from cp_engine.hooks.vllm.serving_patch import make_wrapper


@pytest.fixture(autouse=True)
def clean_metrics():
    metrics.reset()
    yield
    metrics.reset()


def _burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_a_cpu_watched_hook_counts_its_calls_and_their_cpu_time():
    @faults.stall_watched("cpu_hook", cpu=True)
    def body(seconds):
        _burn(seconds)
        return "done"

    wall = time.perf_counter()
    assert [body(0.005) for _ in range(3)] == ["done"] * 3
    wall = time.perf_counter() - wall
    assert metrics.value("hook_calls", hook="cpu_hook") == 3
    assert 0.015 <= metrics.value("hook_cpu_seconds", hook="cpu_hook") <= wall


def test_a_raising_hook_still_counts_and_a_plain_watch_counts_nothing():
    @faults.stall_watched("cpu_hook", cpu=True)
    def failing():
        raise ValueError("boom")

    @faults.stall_watched("plain_hook")
    def plain():
        _burn(0.002)

    with pytest.raises(ValueError):
        failing()
    plain()
    assert metrics.value("hook_calls", hook="cpu_hook") == 1
    assert metrics.value("hook_calls", hook="plain_hook") == 0
    assert metrics.value("hook_cpu_seconds", hook="plain_hook") == 0


class _Pending:
    """What ``serving_patch`` settles: a rewritten request's commit (hand-written fake)."""

    def __init__(self, hook: str, accept_cost: float):
        self.hook, self.state, self._cost = hook, "pending", accept_cost

    def accept(self):
        _burn(self._cost)
        self.state = "accepted"

    def reject(self):
        self.state = "rejected"


def test_settling_the_answer_counts_as_the_rewrites_cpu_without_a_second_call():
    pending = _Pending("settle_hook", 0.005)

    async def vllm_method(request, raw_request=None):
        return {"choices": []}

    wrapper = make_wrapper("settle_hook", lambda request, raw, serving: pending)
    answer = asyncio.run(wrapper(vllm_method, object(), (object(), None), {}))
    assert answer == {"choices": []} and pending.state == "accepted"
    assert metrics.value("hook_cpu_seconds", hook="settle_hook") >= 0.005
    assert metrics.value("hook_calls", hook="settle_hook") == 0  # the rewrite's decorator counts calls
