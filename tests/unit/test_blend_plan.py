"""The scheduler-side reuse plan (cp_engine.blend.plan): hand-built spans, then the tiny
model's real tokenizer with a real BlockKVStore."""
import math

import numpy as np
import pytest

from cp_engine.blend.plan import MIN_SAVED_TOKENS, blocks_to_store, plan_from_config, plan_reuse

# A 400-token prompt: blocks A [10, 110), B [120, 220), C [230, 330), question after.
PROMPT = list(range(1000, 1400))
SPANS = [(10, 110), (120, 220), (230, 330)]


def ids_of(span):
    return tuple(PROMPT[span[0]:span[1]])


def holder(*spans):
    held = {ids_of(s) for s in spans}
    return lambda key: key in held


def test_claim_runs_from_the_hit_to_the_end_of_the_last_stored_block():
    plan = plan_reuse(PROMPT, SPANS, 0, 16, holder(SPANS[0], SPANS[1]), ratio=0.0)
    assert (plan.claim_start, plan.claim_end) == (0, 220)  # C is not stored: left to the engine
    assert [(b.key, b.start, b.end, b.offset) for b in plan.blocks] == [
        (ids_of(SPANS[0]), 10, 110, 0), (ids_of(SPANS[1]), 120, 220, 0)]
    # ratio 0: only the uncovered tokens: [0, 10) and [110, 120)
    assert plan.recomputed == 20 and plan.reused == 200 and plan.claimed == 220
    assert plan.selection().positions.tolist() == list(range(10)) + list(range(110, 120))


def test_an_unstored_block_between_stored_ones_is_recomputed_whole():
    plan = plan_reuse(PROMPT, SPANS, 0, 16, holder(SPANS[0], SPANS[2]), ratio=0.0)
    assert plan.claim_end == 330
    assert plan.recomputed == 330 - 200 and plan.reused == 200
    assert set(range(120, 220)) <= set(plan.selection().positions.tolist())


@pytest.mark.parametrize("ratio", [0.05, 0.15, 0.3, 1.0])
def test_the_ratio_counts_reused_tokens(ratio):
    plan = plan_reuse(PROMPT, SPANS, 0, 16, holder(*SPANS), ratio=ratio, mode="first_tokens")
    covered = 300
    expected = 30 + math.ceil(ratio * covered - 1e-9)  # 30 label/separator tokens always
    if covered + 30 - expected < MIN_SAVED_TOKENS:
        assert plan.empty
    else:
        assert plan.recomputed == expected and plan.claimed == 330
        assert len(plan.selection().positions) == expected


def test_deviation_modes_know_the_count_and_take_positions_from_the_worker():
    plan = plan_reuse(PROMPT, SPANS, 0, 16, holder(*SPANS), ratio=0.3, mode="deviation")
    with pytest.raises(ValueError, match="deviation"):
        plan.selection()
    dev = np.zeros(plan.claimed)
    dev[300:320] = 5.0  # the largest deviations sit in block C
    sel = plan.selection(dev)
    assert len(sel.positions) == plan.recomputed == 30 + 90
    assert set(range(300, 320)) <= set(sel.positions.tolist())


def test_the_claim_starts_at_the_prefix_hit_and_a_cut_block_reuses_its_tail():
    plan = plan_reuse(PROMPT, SPANS, 64, 16, holder(*SPANS), ratio=0.0)
    assert plan.claim_start == 64
    first = plan.blocks[0]
    assert (first.start, first.end, first.offset) == (64, 110, 54)
    assert plan.selection().positions.min() >= 64
    # a hit past every stored block leaves nothing to claim
    late = plan_reuse(PROMPT, SPANS, 336, 16, holder(*SPANS), ratio=0.0)
    assert late.empty and late.claim_start == 336 and "no stored block" in late.reason


def test_the_claim_never_takes_the_last_prompt_token():
    prompt = list(range(200))
    plan = plan_reuse(prompt, [(0, 200)], 0, 16, lambda k: True, ratio=0.0)
    assert plan.claim_end == 199 and plan.blocks[0].end == 199


def test_small_savings_make_no_plan():
    prompt = list(range(100))
    spans = [(10, 10 + MIN_SAVED_TOKENS - 1), (50, 50 + MIN_SAVED_TOKENS)]
    small = plan_reuse(prompt, spans[:1], 0, 16, lambda k: True, ratio=0.0)
    assert small.empty and "saves" in small.reason
    enough = plan_reuse(prompt, spans, 0, 16, lambda k: k == tuple(range(50, 50 + MIN_SAVED_TOKENS)), ratio=0.0)
    assert not enough.empty and enough.reused == MIN_SAVED_TOKENS


def test_nothing_stored_means_no_plan():
    plan = plan_reuse(PROMPT, SPANS + [None], 0, 16, lambda k: False, ratio=0.15)
    assert plan.empty and plan.recomputed == 0 and plan.blocks == ()


@pytest.mark.parametrize("hit, bs, msg", [(10, 16, "multiple"), (-16, 16, "multiple"), (416, 16, "within"),
                                          (0, 0, "block_size")])
def test_bad_hits_and_block_sizes_are_refused(hit, bs, msg):
    with pytest.raises(ValueError, match=msg):
        plan_reuse(PROMPT, SPANS, hit, bs, lambda k: True, ratio=0.1)


def test_unsorted_spans_and_bad_settings_are_refused():
    with pytest.raises(ValueError, match="sorted"):
        plan_reuse(PROMPT, [SPANS[1], SPANS[0]], 0, 16, lambda k: True, ratio=0.1)
    with pytest.raises(ValueError, match="ratio"):
        plan_reuse(PROMPT, SPANS, 0, 16, lambda k: True, ratio=1.5)
    with pytest.raises(ValueError, match="mode"):
        plan_reuse(PROMPT, SPANS, 0, 16, lambda k: True, ratio=0.1, mode="random")


def test_store_side_keeps_each_new_block_once():
    dup = [(0, 5), None, (10, 15), (20, 25)]
    prompt = [1, 2, 3, 4, 5] * 2 + [7] * 5 + [0] * 5 + [9] * 5
    # (0,5) is stored; (10,15) and (20,25) are new
    out = blocks_to_store(prompt, dup, lambda k: k == (1, 2, 3, 4, 5))
    assert out == [((7,) * 5, (10, 15)), ((9,) * 5, (20, 25))]
    # the same block twice in one prompt is stored once
    twice = blocks_to_store([3] * 4 + [8] + [3] * 4, [(0, 4), (5, 9)], lambda k: False)
    assert twice == [((3,) * 4, (0, 4))]


def test_store_side_keeps_only_blocks_computed_before_the_first_stitched_token():
    plan = plan_reuse(PROMPT, SPANS, 0, 16, holder(SPANS[1]), ratio=0.0)
    assert plan.first_stitched == SPANS[1][0]
    # the store evicted B meanwhile: A (exact, before B) is stored; B was stitched, C
    # attends to stitched KV
    out = blocks_to_store(PROMPT, SPANS, lambda k: False, plan)
    assert [s for _, s in out] == [SPANS[0]]
    # asked to, C is stored too; the reused block B never is
    out = blocks_to_store(PROMPT, SPANS, lambda k: False, plan, after_stitched=True)
    assert [s for _, s in out] == [SPANS[0], SPANS[2]]
    # an empty plan stitched nothing: every new block is stored
    empty = plan_reuse(PROMPT, SPANS, 0, 16, lambda k: False, ratio=0.0)
    assert [s for _, s in blocks_to_store(PROMPT, SPANS, lambda k: False, empty)] == SPANS


def test_deviation_is_measured_only_when_the_ratio_reaches_past_the_first_tokens():
    # 3 blocks of 100 tokens, 16 first tokens each = 48 leading tokens
    small = plan_reuse(PROMPT, SPANS, 0, 16, holder(*SPANS), ratio=0.15)  # budget 45 <= 48
    assert not small.needs_deviation and small.full_depth_tokens(4, 1) == small.recomputed
    assert len(small.selection().positions) == small.recomputed  # no deviation needed
    big = plan_reuse(PROMPT, SPANS, 0, 16, holder(*SPANS), ratio=0.3)  # budget 90 > 48
    assert big.needs_deviation
    # the kept tokens pass through 1 of 4 layers to be ranked
    assert big.full_depth_tokens(4, 1) == big.recomputed + big.reused / 4
    assert big.full_depth_tokens(4, 9) == big.claimed
    first = plan_reuse(PROMPT, SPANS, 0, 16, holder(*SPANS), ratio=0.3, mode="first_tokens")
    assert not first.needs_deviation and first.recomputed == big.recomputed
    with pytest.raises(ValueError):
        big.full_depth_tokens(0, 1)


def test_settings_come_from_the_config():
    from cp_engine.config import Config

    cfg = Config(blend_ratio=0.3, blend_mode="first_tokens", blend_first_tokens=4)
    plan = plan_from_config(cfg, PROMPT, SPANS, 0, 16, holder(*SPANS))
    assert (plan.ratio, plan.mode, plan.first_tokens) == (0.3, "first_tokens", 4)
    assert plan.recomputed == 30 + 90


# ------------------------------------------------------------ with the real tokenizer


@pytest.fixture(scope="module")
def encode():
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from cp_engine.devtools.vllm_server import tiny_model_dir

    tok = AutoTokenizer.from_pretrained(tiny_model_dir())
    return lambda text: tok.encode(text, add_special_tokens=False)


DOCS = ["The river Elbe rises in the Krkonose mountains and flows north-west to the North Sea. " * 3,
        "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen in plants. " * 3,
        "A binary heap keeps the smallest element at its root and supports pushes in log time. " * 3]


def test_real_prompts_reuse_stored_blocks_at_new_positions(encode):
    from cp_engine.blend.keys import KVLayout, Scope, block_key
    from cp_engine.blend.spans import Segment, encode_segments, locate_spans
    from cp_engine.blend.store import BlockKVStore, kv_shape

    layout = KVLayout.make(model="tiny", fingerprint="f", dtype="float32", num_layers=2, num_kv_heads=1,
                           head_dim=4, block_size=16, rope="r")
    scope = Scope()
    store = BlockKVStore(1 << 20)

    def key_of(ids):
        return block_key(layout, scope, ids)

    def render(docs, question):
        segs = [Segment("<|im_start|>system\nAnswer from the documents.<|im_end|>\n<|im_start|>user\n")]
        for d in docs:
            segs += [Segment(d, block=True), Segment("\n\n")]
        return encode_segments(encode, segs + [Segment(question + "<|im_end|>\n<|im_start|>assistant\n")])

    first = render(DOCS[:2], "Where does the Elbe rise?")
    spans = locate_spans(first.ids, [encode(d) for d in DOCS[:2]])
    assert spans == first.spans
    cold = plan_reuse(first.ids, spans, 0, 16, store.contains, ratio=0.15, key_of=key_of)
    assert cold.empty
    for key, (s, e) in blocks_to_store(first.ids, spans, store.contains, cold, key_of=key_of):
        assert store.put(key, np.zeros(kv_shape(key), np.float32))
    assert len(store) == 2

    # the blocks again, in the other order and behind a new one: both reused, elsewhere
    second = render([DOCS[2], DOCS[1], DOCS[0]], "What does a heap keep at its root?")
    spans2 = locate_spans(second.ids, [encode(d) for d in (DOCS[2], DOCS[1], DOCS[0])])
    plan = plan_reuse(second.ids, spans2, 0, 16, store.contains, ratio=0.15, key_of=key_of)
    assert [(b.start, b.end) for b in plan.blocks] == [spans2[1], spans2[2]]
    assert spans2[2] != spans[0]
    assert plan.claim_end == spans2[2][1] < len(second.ids) - 1  # the question is the engine's
    for b in plan.blocks:
        assert store.get(b.key) is not None and len(b.key) == b.end - b.start
    covered = sum(b.end - b.start for b in plan.blocks)
    uncovered = plan.claimed - covered
    assert plan.recomputed == uncovered + math.ceil(0.15 * covered - 1e-9)
    assert plan.selection(np.zeros(plan.claimed)).positions.max() < plan.claim_end
    new = blocks_to_store(second.ids, spans2, store.contains, plan, key_of=key_of)
    assert [span for _, span in new] == [spans2[0]]


def _saved(plan, cost):
    covered = sum(b.end - b.start for b in plan.blocks)
    return covered * (1 - cost * plan.ratio) - (plan.claimed - covered) * (cost - 1)


def test_a_costly_recompute_ends_the_claim_before_a_gap_that_would_cost_more_than_it_saves():
    # A and C stored, B (100 tokens) not: claiming C means recomputing B in blend's pass.
    gap = holder(SPANS[0], SPANS[2])
    cheap = plan_reuse(PROMPT, SPANS, 0, 16, gap, ratio=0.0, recompute_cost=1.0)
    assert cheap.claim_end == 330  # cost 1: to the last stored block, as always
    assert cheap == plan_reuse(PROMPT, SPANS, 0, 16, gap, ratio=0.0)
    # cost 3, ratio 0: ending after A saves 100 - 10*2 = 80; after C, 200 - 130*2 < 0
    costly = plan_reuse(PROMPT, SPANS, 0, 16, gap, ratio=0.0, recompute_cost=3.0)
    assert costly.claim_end == 110 and [b.start for b in costly.blocks] == [10]
    assert costly.recomputed == 10 and costly.reused == 100
    # cost 1.5: after C saves 200 - 130*0.5 = 135 > 100 - 10*0.5 = 95: C is worth its gap
    mid = plan_reuse(PROMPT, SPANS, 0, 16, gap, ratio=0.0, recompute_cost=1.5)
    assert mid.claim_end == 330


def test_the_chosen_end_is_the_best_of_every_stored_block_end():
    import random

    rng = random.Random(4)
    for _ in range(200):
        stored = [s for s in SPANS if rng.random() < 0.7]
        cost, ratio = rng.choice([1.0, 1.3, 2.0, 4.0]), rng.choice([0.0, 0.05, 0.15, 0.3])
        hit = rng.choice([0, 16, 112])
        plan = plan_reuse(PROMPT, SPANS, hit, 16, holder(*stored), ratio=ratio, recompute_cost=cost)
        ends = [e for s, e in stored if e > hit]
        options = [plan_reuse(PROMPT, [s for s in SPANS if s[1] <= end], hit, 16, holder(*stored), ratio=ratio)
                   for end in ends]
        options = [o for o in options if not o.empty]
        best = max((_saved(o, cost) for o in options), default=0.0)
        if plan.empty:  # no end saves time, or the best one reuses too little to be made
            assert best <= 0 or any(o.reused < MIN_SAVED_TOKENS for o in options if _saved(o, cost) == best)
        else:
            assert _saved(plan, cost) == pytest.approx(best)


def test_ratio_one_claims_nothing_when_recompute_costs_more_than_the_engine():
    plan = plan_reuse(PROMPT, SPANS, 0, 16, holder(*SPANS), ratio=1.0, recompute_cost=2.0)
    assert plan.empty and "recompute cost 2" in plan.reason
    with pytest.raises(ValueError, match="recompute_cost"):
        plan_reuse(PROMPT, SPANS, 0, 16, holder(*SPANS), ratio=0.0, recompute_cost=-1.0)
