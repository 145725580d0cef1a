"""Public API and the prefix-cache simulator."""
from collections import Counter

import pytest

import cp_engine
from cp_engine.sim import PrefixCacheSim, bound, simulate


def test_public_api_names():
    for name in cp_engine.__all__:
        assert hasattr(cp_engine, name)


def test_build_batch_messages_covers_every_item_once():
    items = [(["a", "b", "c"], "q0"), (["c", "b", "d"], "q1"), (["x"], "q2"), ([], "q3")]
    batch = cp_engine.build_batch_messages(items, system="S")
    seen = [i for i, _ in batch]
    assert sorted(seen) == [0, 1, 2, 3]
    for i, msgs in batch:
        assert msgs[0] == {"role": "system", "content": "S"}
        assert msgs[-1]["content"].endswith(items[i][1])
        for block in items[i][0]:
            assert block in msgs[-1]["content"]
    # the two requests sharing b and c start with the same rendered prefix
    c0, c1 = batch.messages[0][-1]["content"], batch.messages[1][-1]["content"]
    common = c0[:next((i for i, (x, y) in enumerate(zip(c0, c1)) if x != y), min(len(c0), len(c1)))]
    assert "] b\n\n" in common and "] c\n\n" in common


def test_build_messages_and_reorder_online():
    pipe = cp_engine.ContextPipeline(cp_engine.Config())
    m1 = cp_engine.build_messages(["d1", "d2", "d3"], "q", pipeline=pipe)
    assert m1[-1]["role"] == "user"
    assert cp_engine.reorder(["d3", "d2", "d1"], pipeline=pipe) == ["d1", "d2", "d3"]
    assert cp_engine.deduplicate("c", ["x", "y", "x"], pipeline=pipe) == [True, True, False]


def test_simulator_lru_and_bound():
    seqs = [[1, 2, 3], [1, 2, 4], [1, 2, 3], [5]]
    assert simulate(seqs).hits == 5
    assert simulate(seqs, capacity=3).hits == 4
    assert bound(seqs) == 0.5
    sim = PrefixCacheSim(capacity=2)
    for s in seqs:
        sim.access(s)
        assert len(sim) <= max(2, len(s))


def test_simulator_weights():
    seqs = [["a", "b"], ["a", "c"]]
    res = simulate(seqs, weights={"a": 10, "b": 1, "c": 1})
    assert res.hits == 10 and res.total == 22
    assert Counter(b for s in seqs for b in s)["a"] == 2


def test_batch_plan_weighs_blocks_by_tokens():
    # Request 0 can share "s" (short, also in requests 2 and 3) or "L" (long, also in
    # request 1) at its front, not both. Counted in blocks, s serves more; counted in
    # tokens (what the cache serves), L must lead requests 0 and 1.
    short, long_ = "s" * 8, "L" * 4000
    items = [([short, long_], "q0"), ([long_, "a"], "q1"), ([short, "b"], "q2"), ([short, "c"], "q3")]
    batch = cp_engine.build_batch_messages(items)
    for i in range(2):
        assert batch.messages[i][-1]["content"].startswith("[1] " + long_), i
        assert batch.plan.contexts[i][0] == long_, i
    assert batch.plan.contexts[2][0] == batch.plan.contexts[3][0] == short


def test_batch_plan_uses_exact_token_counts_when_given():
    # Same choice as above, but the texts are equally long: only the caller's token
    # counts (a tokenizer that splits "L" finely) can say that "L..." is worth more.
    short, long_ = "s" * 40, "L" * 40
    items = [([short, long_], "q0"), ([long_, "a"], "q1"), ([short, "b"], "q2"), ([short, "c"], "q3")]
    calls = []

    def count(text):
        calls.append(text)
        return 1000 if text == long_ else 3

    by_estimate = cp_engine.build_batch_messages(items)
    assert by_estimate.plan.contexts[0][0] == short
    exact = cp_engine.build_batch_messages(items, count_tokens=count)
    assert exact.plan.contexts[0][0] == exact.plan.contexts[1][0] == long_
    assert sorted(calls) == sorted({t for blocks, _ in items for t in blocks})  # once per distinct block


def test_batch_count_tokens_bad_values_are_clear_errors():
    import numpy as np

    items = [(["a", "b"], "q0"), (["b", "a"], "q1")]
    assert cp_engine.build_batch_messages(items, count_tokens=lambda t: np.int64(2)).plan.contexts
    for bad in (lambda t: 2.5, lambda t: -1, lambda t: True, lambda t: "3"):
        with pytest.raises(ValueError, match="token lengths must be non-negative ints"):
            cp_engine.build_batch_messages(items, count_tokens=bad)
    with pytest.raises(TypeError, match="count_tokens must be callable"):
        cp_engine.build_batch_messages(items, count_tokens=7)
