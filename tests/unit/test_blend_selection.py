"""Which claimed tokens blend recomputes (cp_engine.blend.selection), on hand-made spans."""
import numpy as np
import pytest

from cp_engine.blend.selection import select_recompute

# claimed range of 20: label [0,2), block A [2,10), separator [10,12), block B [12,20)
SPANS = [(2, 10), (12, 20)]
UNCOVERED = [0, 1, 10, 11]
DEV = np.zeros(20)
DEV[[5, 15, 19]] = [3.0, 2.0, 1.0]


def chosen(**kw):
    sel = select_recompute(20, SPANS, **kw)
    return sel.positions.tolist(), (sel.uncovered, sel.first_tokens, sel.deviation)


def test_ratio_zero_recomputes_only_uncovered_tokens():
    for mode in ("both", "first_tokens", "deviation"):
        assert chosen(ratio=0.0, mode=mode) == (UNCOVERED, (4, 0, 0))  # no deviation needed


def test_ratio_one_recomputes_every_claimed_token():
    for mode in ("both", "first_tokens", "deviation"):
        positions, counts = chosen(ratio=1.0, mode=mode, first_tokens=2)
        assert positions == list(range(20)) and sum(counts) == 20


def test_first_tokens_mode_gives_each_block_the_same_leading_tokens():
    # 16 reused tokens, ratio 0.25 -> 4: offsets 0 and 1 of both blocks
    assert chosen(ratio=0.25, mode="first_tokens") == (sorted(UNCOVERED + [2, 3, 12, 13]), (4, 4, 0))
    # an odd budget goes to the earlier block first
    assert chosen(ratio=3 / 16, mode="first_tokens")[0] == sorted(UNCOVERED + [2, 3, 12])


def test_deviation_mode_takes_the_largest_deviations():
    assert chosen(ratio=3 / 16, mode="deviation", deviation=DEV) == (sorted(UNCOVERED + [5, 15, 19]), (4, 0, 3))
    # deviation at uncovered positions is irrelevant (they are chosen anyway); NaN ranks first
    dev = DEV.copy()
    dev[0], dev[7] = 100.0, np.nan
    assert chosen(ratio=1 / 16, mode="deviation", deviation=dev)[0] == sorted(UNCOVERED + [7])


def test_both_takes_first_tokens_then_deviation():
    # budget ceil(0.3 * 16) = 5: first_tokens=2 -> 2, 3, 12, 13; then the largest deviation, 5
    assert chosen(ratio=0.3, first_tokens=2, deviation=DEV) == (sorted(UNCOVERED + [2, 3, 12, 13, 5]), (4, 4, 1))
    # budget below the first tokens: blocks take turns
    assert chosen(ratio=1 / 16, first_tokens=2, deviation=DEV)[0] == sorted(UNCOVERED + [2])
    # ... where no deviation is needed at all
    assert chosen(ratio=4 / 16, first_tokens=2)[0] == sorted(UNCOVERED + [2, 3, 12, 13])
    with pytest.raises(ValueError, match="none given"):
        chosen(ratio=5 / 16, first_tokens=2)


def test_budget_rounds_up_so_a_positive_ratio_recomputes_something():
    assert len(chosen(ratio=0.001, mode="first_tokens")[0]) == 5


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="mode"):
        select_recompute(20, SPANS, 0.1, mode="magic")
    with pytest.raises(ValueError, match="ratio"):
        select_recompute(20, SPANS, 1.5)
    with pytest.raises(ValueError, match="none given"):
        select_recompute(20, SPANS, 0.5, mode="deviation")
    with pytest.raises(ValueError, match="shape"):
        select_recompute(20, SPANS, 0.5, mode="deviation", deviation=[1.0, 2.0])
    for spans in ([(5, 3)], [(2, 10), (8, 12)], [(12, 20), (2, 10)], [(0, 21)], [(3, 3)]):
        with pytest.raises(ValueError, match="spans"):
            select_recompute(20, spans, 0.5, mode="first_tokens")


def test_no_spans_means_everything_is_recomputed():
    sel = select_recompute(5, [], 0.0)
    assert sel.positions.tolist() == [0, 1, 2, 3, 4] and sel.uncovered == 5
