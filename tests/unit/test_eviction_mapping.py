"""Unit tests for the engine-neutral eviction mapping (cp_engine/eviction_mapping.py)."""
from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cp_engine.eviction_mapping import EvictionMapper


def test_hash_maps_to_shallowest_broken_block():
    m = EvictionMapper(block_size=16)
    # Context blocks end at tokens 20, 40, 100; the prompt has 8 full blocks (128 tokens).
    hashes = [f"h{j}" for j in range(8)]
    assert m.track(hashes, "ns", ["a", "b", "c"], [20, 40, 100]) == 7  # h7 starts at 112 > 100
    assert m.gone("h7") is None  # never tracked: only covers text after the blocks
    assert m.gone("h1") == ("ns", ("a",))  # tokens 16..31: block "a" ends at 20 > 16
    m.track(hashes, "ns", ["a", "b", "c"], [20, 40, 100])
    assert m.gone("h2") == ("ns", ("a", "b"))  # tokens 32..47: "a" intact, "b" broken
    assert m.gone("h6") is None  # deeper than the reported ("a","b"): subsumed
    assert m.gone("h0") == ("ns", ("a",))  # shallower: reported
    assert m.gone("unknown") is None


def test_copies_are_reference_counted():
    m = EvictionMapper(block_size=4)
    m.track(["x", "y"], "", [1, 2], [3, 8])
    m.stored("y")
    m.stored("y")
    assert m.removed("y") is None  # another physical block still holds "y"
    assert m.removed("y") == ("", (1, 2))


def test_reset_forgets_everything_and_memory_is_bounded():
    m = EvictionMapper(block_size=1, max_hashes=10)
    for r in range(5):
        m.track([(r, j) for j in range(6)], "", ["p"], [6])
    assert len(m) == 10 and m.dropped == 20
    assert m.gone((0, 0)) is None  # the oldest request's hashes were dropped first
    assert m.gone((4, 5)) == ("", ("p",))
    m.reset()
    assert len(m) == 0 and m.gone((4, 0)) is None


def test_malformed_hints_are_ignored():
    m = EvictionMapper(block_size=8)
    assert m.track(["a"], "", [], []) == 0
    assert m.track(["a"], "", ["x", "y"], [8]) == 0
    with pytest.raises(ValueError):
        EvictionMapper(block_size=0)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(1, 300), min_size=1, max_size=8),
    st.integers(1, 64),
    st.integers(0, 40),
)
def test_reported_prefix_is_the_first_block_ending_after_the_evicted_block(lengths, bs, n_hashes):
    ends = list(itertools.accumulate(lengths))
    path = [f"b{i}" for i in range(len(ends))]
    hashes = [("h", j) for j in range(n_hashes)]
    for j in range(n_hashes):
        m = EvictionMapper(block_size=bs)
        m.track(hashes, "n", path, ends)
        got = m.gone(("h", j))
        start = j * bs
        if start >= ends[-1]:
            assert got is None
            continue
        assert got is not None
        ns, prefix = got
        i = len(prefix) - 1
        assert ns == "n" and list(prefix) == path[: i + 1]
        assert ends[i] > start and (i == 0 or ends[i - 1] <= start)


def test_block_size_learned_late():
    m = EvictionMapper()  # the adapter learns the block size from the engine later
    m.track(["a", "b", "c"], "", ["x", "y"], [10, 40])
    assert m.gone("b") is None and len(m) == 3  # unknown size: nothing reported, nothing lost
    m.block_size = 16
    assert m.gone("b") == ("", ("x", "y"))
