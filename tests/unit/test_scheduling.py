"""Unit tests for the engine-neutral cache-aware ordering (cp_engine/queue_order.py)."""
from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cp_engine.queue_order import PrefixScheduler, chained_key, schedule_order, truncated_key


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Req:
    """A waiting request: identity matters, the name only helps reading failures."""

    def __init__(self, name: int, key: tuple) -> None:
        self.name = name
        self.key = key

    def __repr__(self) -> str:
        return f"Req({self.name}, {self.key})"


# Small alphabets and short keys make shared prefixes frequent.
keys_st = st.lists(st.lists(st.integers(0, 2), max_size=4).map(tuple), max_size=40)


def contiguous_for_every_prefix(order: list[Req]) -> bool:
    prefixes = {r.key[:k] for r in order for k in range(1, len(r.key) + 1)}
    for p in prefixes:
        positions = [i for i, r in enumerate(order) if r.key[: len(p)] == p]
        if positions[-1] - positions[0] + 1 != len(positions):
            return False
    return True


@settings(max_examples=200, deadline=None)
@given(keys_st)
def test_pop_all_is_a_permutation_with_contiguous_prefix_groups(keys):
    sched = PrefixScheduler(max_wait_s=float("inf"), clock=Clock())
    reqs = [Req(i, k) for i, k in enumerate(keys)]
    for r in reqs:
        sched.add(r, r.key)
    order = [sched.pop() for _ in range(len(reqs))]
    assert sorted(r.name for r in order) == list(range(len(reqs)))
    assert contiguous_for_every_prefix(order)
    assert not sched
    with pytest.raises(IndexError):
        sched.pop()


ops_st = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.lists(st.integers(0, 2), max_size=4).map(tuple)),
        st.tuples(st.just("pop"), st.none()),
        st.tuples(st.just("peek"), st.none()),
        st.tuples(st.just("remove"), st.integers(0, 1000)),
        st.tuples(st.just("tick"), st.floats(0, 1.5)),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(ops_st, st.floats(0.0, 3.0))
def test_interleaved_operations_respect_aging_and_peek(ops, max_wait):
    clock = Clock()
    sched = PrefixScheduler(max_wait_s=max_wait, clock=clock)
    waiting: dict[int, tuple[Req, float]] = {}  # name -> (req, enqueue time)
    names = itertools.count()
    peeked = None
    for op, arg in ops:
        if op == "add":
            r = Req(next(names), arg)
            sched.add(r, r.key)
            waiting[r.name] = (r, clock.t)
            peeked = None
        elif op == "tick":
            clock.t += arg
        elif op == "remove":
            if waiting:
                name = sorted(waiting)[arg % len(waiting)]
                assert sched.remove(waiting.pop(name)[0])
                peeked = None
        elif op == "peek":
            if waiting:
                peeked = sched.peek()
        elif op == "pop" and waiting:
            oldest_name = min(waiting, key=lambda n: (waiting[n][1], n))
            oldest_age = clock.t - waiting[oldest_name][1]
            got = sched.pop()
            if peeked is not None:
                # peek() then pop() with no mutation between: the same item.
                assert got is peeked
            elif oldest_age > max_wait:
                # Aging: the oldest waiting request is served first, in arrival order.
                assert got.name == oldest_name
            waiting.pop(got.name)
            peeked = None
        assert len(sched) == len(waiting)
    # Whatever state we ended in, draining serves every prefix group contiguously.
    frozen = PrefixScheduler(max_wait_s=float("inf"), clock=clock)
    rest = [waiting[n][0] for n in sorted(waiting)]
    for r in rest:
        frozen.add(r, r.key)
    assert contiguous_for_every_prefix([frozen.pop() for _ in rest])


@settings(max_examples=100, deadline=None)
@given(ops_st)
def test_drain_after_any_history_keeps_groups_contiguous(ops):
    # The cursor left by earlier pops must not split a group during the drain.
    sched = PrefixScheduler(max_wait_s=float("inf"), clock=Clock())
    live = []
    names = itertools.count()
    for op, arg in ops:
        if op == "add":
            r = Req(next(names), arg)
            sched.add(r, r.key)
            live.append(r)
        elif op == "pop" and live:
            live.remove(sched.pop())
    iter_order = list(sched)
    drained = [sched.pop() for _ in range(len(live))]
    assert iter_order == drained  # iteration shows the order pops take
    assert contiguous_for_every_prefix(drained)


def test_largest_group_first_then_depth_first():
    sched = PrefixScheduler(max_wait_s=float("inf"), clock=Clock())
    a1, a2 = Req(0, ("A", 1)), Req(1, ("A", 2))
    b1, b2, b3 = Req(2, ("B", 1)), Req(3, ("B", 1)), Req(4, ("B", 2))
    for r in (a1, a2, b1, b2, b3):
        sched.add(r, r.key)
    # B (3 waiting) beats A (2); inside B the deeper shared group B/1 goes first.
    assert [sched.pop() for _ in range(5)] == [b1, b2, b3, a1, a2]


def test_new_arrival_in_current_group_is_served_before_other_groups():
    sched = PrefixScheduler(max_wait_s=float("inf"), clock=Clock())
    a1, b1, b2 = Req(0, ("A",)), Req(1, ("B",)), Req(2, ("B",))
    for r in (a1, b1, b2):
        sched.add(r, r.key)
    assert sched.pop() is b1
    b3 = Req(3, ("B", "x"))
    sched.add(b3, b3.key)  # its prefix is hot: keep going depth-first
    assert [sched.pop() for _ in range(3)] == [b2, b3, a1]


def test_aging_overrides_grouping():
    clock = Clock()
    sched = PrefixScheduler(max_wait_s=2.0, clock=clock)
    old = Req(0, ("lonely",))
    sched.add(old, old.key)
    clock.t = 1.0
    group = [Req(i, ("G",)) for i in range(1, 4)]
    for r in group:
        sched.add(r, r.key)
    assert sched.pop() is group[0]  # nothing aged yet: largest group first
    clock.t = 2.5
    assert sched.peek() is old and sched.pop() is old
    assert sched.aged_pops == 1


def test_peek_is_stable_until_mutation_and_pop_honours_it():
    clock = Clock()
    sched = PrefixScheduler(max_wait_s=1.0, clock=clock)
    x, y = Req(0, ("x",)), Req(1, ("y",))
    sched.add(x, x.key)
    clock.t = 0.5
    sched.add(y, y.key)
    assert sched.peek() is x
    clock.t = 10.0
    assert sched.peek() is x  # x is the oldest and aged: still x
    assert sched.pop() is x


def test_duplicate_add_and_unknown_remove():
    sched = PrefixScheduler(clock=Clock())
    r = Req(0, ())
    sched.add(r, ())
    with pytest.raises(ValueError):
        sched.add(r, ())
    assert not sched.remove(Req(1, ()))
    assert r in sched and sched.remove(r) and r not in sched


def test_schedule_order_matches_pops_and_is_deterministic():
    keys = [("s", i % 3, i % 2) for i in range(30)] + [()] * 3
    first = schedule_order(keys)
    assert first == schedule_order(keys)
    assert sorted(first) == list(range(len(keys)))
    served = [keys[i] for i in first]
    for p in {k[:n] for k in keys for n in range(1, len(k) + 1)}:
        pos = [i for i, k in enumerate(served) if k[: len(p)] == p]
        assert pos[-1] - pos[0] + 1 == len(pos)


def test_schedule_order_serves_aged_items_first_in_arrival_order():
    keys = [("g",), ("g",), ("h",), ("g",)]
    arrivals = [5.0, 0.0, 1.0, 9.0]
    order = schedule_order(keys, arrivals=arrivals, now=10.0, max_wait_s=6.0)
    # Aged at t=10: arrivals 0.0 (idx 1) and 1.0 (idx 2), in arrival order.
    assert order[:2] == [1, 2]
    assert sorted(order) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        schedule_order(keys, arrivals=[0.0])


def test_schedule_order_continues_from_last_key():
    keys = [("a", 1), ("b", 1), ("b", 2), ("a", 2), ("a", 3)]
    assert schedule_order(keys)[0] in (0, 3, 4)  # "a" is the larger group
    assert schedule_order(keys, last_key=("b", 2))[:2] == [2, 1]


@given(st.lists(st.integers(), max_size=3000), st.integers(1, 40), st.integers(1, 200))
def test_chained_key_is_bounded_and_prefix_consistent(hashes, dense, max_depth):
    full = chained_key(hashes, dense=dense, max_depth=max_depth)
    assert len(full) <= max_depth
    for m in (0, len(hashes) // 3, len(hashes) // 2):
        part = chained_key(hashes[:m], dense=dense, max_depth=max_depth)
        assert full[: len(part)] == part  # fixed positions: shorter prompts are prefixes
    assert truncated_key(hashes, 5) == tuple(hashes[:5])


def _by_pops(keys, arrivals=None, now=None, max_wait_s=2.0, last_key=None):
    """Reference: pop everything from a PrefixScheduler frozen at ``now``."""
    n = len(keys)
    times = range(n) if arrivals is None else arrivals
    frozen = float(n) if arrivals is None else now
    sched = PrefixScheduler(float("inf") if arrivals is None else max_wait_s, clock=lambda: frozen)
    boxes = [[i] for i in range(n)]
    for i in sorted(range(n), key=lambda i: (times[i], i)):
        sched.add(boxes[i], keys[i], enqueued_at=times[i])
    if last_key is not None:
        sched.set_cursor(last_key)
    return [sched.pop()[0] for _ in range(n)]


part_st = st.one_of(st.integers(0, 2), st.sampled_from([b"x", b"y", "s"]))


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.lists(part_st, max_size=7).map(tuple), max_size=30),
    st.booleans(),
    st.lists(st.floats(0, 10), min_size=30, max_size=30),
    st.one_of(st.none(), st.lists(part_st, max_size=7).map(tuple)),
)
def test_schedule_order_equals_popping_a_frozen_scheduler(keys, timed, times, last_key):
    arrivals = times[: len(keys)] if timed else None
    got = schedule_order(keys, arrivals=arrivals, now=8.0, max_wait_s=5.0, last_key=last_key)
    assert got == _by_pops(keys, arrivals=arrivals, now=8.0, max_wait_s=5.0, last_key=last_key)


def test_schedule_order_on_long_random_lists_equals_pops():
    import random

    rng = random.Random(3)
    for n in (200, 700):
        keys = [tuple(rng.choice((0, 1, 2, b"h")) for _ in range(rng.randint(0, 9))) for _ in range(n)]
        arrivals = [rng.uniform(0, 10) for _ in range(n)]
        last = keys[rng.randrange(n)] + (1,)
        args = dict(arrivals=arrivals, now=11.0, max_wait_s=9.5, last_key=last)
        assert schedule_order(keys, **args) == _by_pops(keys, **args)


def test_unhashable_key_is_rejected_before_any_change():
    sched = PrefixScheduler(max_wait_s=float("inf"), clock=Clock())
    a = Req(0, ("x",))
    sched.add(a, a.key)
    with pytest.raises(TypeError):
        sched.add(Req(1, ()), ("x", ["unhashable"]))
    assert len(sched) == 1 and sched.pop() is a and not sched
