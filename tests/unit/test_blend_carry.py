"""Carried blocks: a reused block stored behind the same lead as now is kept whole
(cp_engine.blend.leads, the ``carried`` paths of selection and plan)."""
import math

import numpy as np
import pytest

from cp_engine.blend.leads import lead_digest, lead_digests
from cp_engine.blend.plan import plan_reuse
from cp_engine.blend.selection import select_recompute
from cp_engine.blend.settings import CARRY_KEY, InvalidBlendSetting, check_settings, read_settings

# system [0, 40), a dynamic segment [40, 100), then blocks A, B, C separated by 2 tokens
PROMPT = list(range(5000, 5400))
SPANS = [(100, 200), (202, 302), (304, 364)]


def test_a_lead_is_the_previous_block_and_what_separates_them():
    leads = lead_digests(PROMPT, SPANS)
    assert leads[0] is None  # the first located block has none
    assert leads[1] == lead_digest(PROMPT[100:202]) and leads[2] == lead_digest(PROMPT[202:304])
    # a block not located is skipped: the next one's lead runs from the last located start
    leads = lead_digests(PROMPT, [SPANS[0], None, SPANS[2]])
    assert leads[1] is None and leads[2] == lead_digest(PROMPT[100:304])


def test_the_digest_depends_on_the_ids_only():
    assert lead_digest([1, 2, 3]) == lead_digest(np.array([1, 2, 3], dtype=np.int32))
    assert lead_digest([1, 2, 3]) != lead_digest([1, 2, 4]) and lead_digest([1, 2]) != lead_digest([1, 2, 0])


def _stored_behind(prompt, spans):
    """lead_of for a store that holds every block of ``spans`` as computed in ``prompt``."""
    leads = {tuple(prompt[s:e]): lead for (s, e), lead in zip(spans, lead_digests(prompt, spans))}
    return leads.__contains__, leads.get


def test_blocks_behind_the_same_neighbour_are_carried_and_outside_the_ratio():
    # stored as A, B, C behind another dynamic segment; now behind this one
    stored = PROMPT[:40] + list(range(9000, 9030)) + PROMPT[100:]
    shift = 30
    contains, lead_of = _stored_behind(stored, [(s - shift, e - shift) for s, e in SPANS])
    plan = plan_reuse(PROMPT, SPANS, 32, 16, contains, ratio=0.15, mode="first_tokens", lead_of=lead_of)
    assert [b.carried for b in plan.blocks] == [False, True, True]
    uncovered = (100 - 32) + 2 + 2
    assert plan.recomputed == uncovered + math.ceil(0.15 * 100)  # only A is in the ratio's base
    assert plan.carried_tokens == 160
    sel = plan.selection()
    assert len(sel.positions) == plan.recomputed and sel.carried == 160
    assert not set(sel.positions.tolist()) & (set(range(202, 302)) | set(range(304, 364)))
    # a caller that has the prompt's leads already passes them: the same plan
    assert plan_reuse(PROMPT, SPANS, 32, 16, contains, ratio=0.15, mode="first_tokens", lead_of=lead_of,
                      leads=lead_digests(PROMPT, SPANS)) == plan
    with pytest.raises(ValueError, match="leads"):
        plan_reuse(PROMPT, SPANS, 32, 16, contains, ratio=0.15, lead_of=lead_of, leads=[None])
    without = plan_reuse(PROMPT, SPANS, 32, 16, contains, ratio=0.15, mode="first_tokens")
    assert without.recomputed == uncovered + math.ceil(0.15 * 260) and without.carried_tokens == 0


def test_a_block_behind_another_neighbour_is_displaced():
    # B was stored behind C, not behind A: the same block, another lead
    stored = PROMPT[:100] + PROMPT[304:364] + PROMPT[200:202] + PROMPT[202:302]
    contains, lead_of = _stored_behind(stored, [(100, 160), (162, 262)])
    plan = plan_reuse(PROMPT, SPANS, 96, 16, contains, ratio=0.0, lead_of=lead_of)
    assert [b.carried for b in plan.blocks] == [False, False]


def test_ratio_one_recomputes_carried_blocks_too():
    contains, lead_of = _stored_behind(PROMPT, SPANS)
    sel = select_recompute(300, [(0, 100), (102, 202), (204, 264)], 1.0, "both", 16, None, [False, True, True])
    assert len(sel.positions) == 300 and sel.carried == 0
    plan = plan_reuse(PROMPT, SPANS, 96, 16, contains, ratio=0.3, mode="first_tokens", lead_of=lead_of)
    # checked: the head and the separators, never a carried block
    assert plan.carried_tokens == 160
    assert plan.checked_positions().tolist() == list(range(96, 202)) + [302, 303]


def test_the_check_pass_skips_carried_blocks():
    # a long displaced head: its budget passes its first tokens, so the deviation is ranked
    prompt = list(range(3000, 3800))
    spans = [(96, 596), (598, 700)]
    stored = prompt[:64] + prompt[96:]
    contains, lead_of = _stored_behind(stored, [(64, 564), (566, 668)])
    plan = plan_reuse(prompt, spans, 96, 16, contains, ratio=0.05, mode="both", lead_of=lead_of)
    assert [b.carried for b in plan.blocks] == [False, True] and plan.needs_deviation
    assert plan.recomputed == 2 + 25
    assert plan.checked_positions().tolist() == list(range(96, 598))
    # the check pass covers the displaced block's kept tokens only (of a 4-layer model, 1 layer)
    assert plan.full_depth_tokens(4, 1) == pytest.approx(27 + (500 - 25) / 4)
    dev = np.zeros(plan.claimed)
    dev[300:309] = 1.0  # inside the head
    dev[550:600] = 9.0  # inside the carried block: never ranked
    chosen = plan.selection(dev).positions.tolist()
    assert len(chosen) == 27 and not set(chosen) & set(range(598, 700))
    assert set(range(396, 405)) <= set(chosen)


def test_selection_refuses_flags_that_do_not_match_the_spans():
    with pytest.raises(ValueError, match="carried"):
        select_recompute(50, [(0, 20), (20, 40)], 0.1, "first_tokens", 16, None, [True])


def test_a_request_sets_carry_with_a_bool_or_0_1():
    assert read_settings({CARRY_KEY: False}, 0.05, "both").carry is False
    assert read_settings({CARRY_KEY: 1}, 0.05, "both", carry=False).carry is True
    assert read_settings({}, 0.05, "both", carry=False).carry is False
    assert read_settings({CARRY_KEY: "yes"}, 0.05, "both").carry is True  # refused: the default
    for bad in ("yes", 2, 0.5, None):
        with pytest.raises(InvalidBlendSetting) as err:
            check_settings({CARRY_KEY: bad})
        assert err.value.field == CARRY_KEY
