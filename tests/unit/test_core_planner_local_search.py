"""The local search's skip rule: skipping a request no move could affect changes nothing."""
import random

import pytest

from cp_engine import planner_local
from cp_engine.planner import plan_batch


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
