"""The optimality benchmark's exact search and hit bound against brute force.

``best_tree`` tries every ordering of every request's blocks, so on instances small
enough to enumerate it is the ground truth: the exact search must equal it and
``hit_upper_bound`` must never fall below it (it is used to claim no plan can do
better, so a bound that undercuts the optimum would be a false proof).
"""
from hypothesis import given, settings, strategies as st

from benchmarks.planner.optimality import best_tree, exact_best_hits, hit_upper_bound

# Few requests over few blocks so that blocks repeat across requests (sharing is the
# whole problem) and brute force stays at most 4!^4 orderings.
requests = st.lists(
    st.lists(st.integers(0, 6), max_size=4, unique=True),
    min_size=1, max_size=4,
)


def brute_hits(shared: list[list[int]]) -> int:
    """Most hits of any plan, by enumerating all orderings."""
    return sum(map(len, shared)) - best_tree(shared)


@settings(max_examples=150)
@given(requests)
def test_exact_search_matches_brute_force(shared):
    assert exact_best_hits(shared) == (brute_hits(shared), True)


@settings(max_examples=150)
@given(requests)
def test_hit_upper_bound_never_undercuts_the_optimum(shared):
    assert hit_upper_bound(shared) >= brute_hits(shared)


@settings(max_examples=50)
@given(requests, st.data())
def test_incumbent_and_budget_keep_the_bound_valid(shared, data):
    """A true incumbent never changes the answer; an exhausted budget still bounds it."""
    best = brute_hits(shared)
    incumbent = data.draw(st.integers(0, best))
    bound, exact = exact_best_hits(shared, incumbent, budget=data.draw(st.integers(0, 3)))
    assert bound >= best
    assert not exact or bound == best


def test_known_instance():
    # Three requests pairwise sharing one block each: only one pair can share a
    # first node, so the best tree has 5 nodes of 6 blocks (1 hit).
    shared = [[1, 2], [2, 3], [3, 1]]
    assert brute_hits(shared) == 1
    assert exact_best_hits(shared) == (1, True)
