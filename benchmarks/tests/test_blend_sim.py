"""The blend simulation's parts: prefix cache, block marking, blend arm, store depth; no engine."""
from __future__ import annotations

import random

from benchmarks.blend.blend_sim import PrefixCache, blend_arm, prefix_arm
from benchmarks.blend.engine_model import BlendEngine
from benchmarks.blend.prompts import block_segments
from benchmarks.engine.token_sim import prefix_cache_served
from cp_engine.blend.keys import KVLayout, Scope, block_key
from cp_engine.blend.spans import Rendered, encode_segments

LAYOUT = KVLayout.make(model="m", fingerprint="f", dtype="float32", num_layers=4, num_kv_heads=1, head_dim=2,
                       block_size=4, rope="r")


def _prompts(seed=0, n=40):
    rng = random.Random(seed)
    heads = [[rng.randrange(50) for _ in range(rng.randrange(3, 20))] for _ in range(6)]
    return [rng.choice(heads) + [rng.randrange(50) for _ in range(rng.randrange(1, 30))] for _ in range(n)]


def test_an_unbounded_prefix_cache_serves_what_token_sim_serves():
    prompts = _prompts()
    cache = PrefixCache(4, None)
    mine = []
    for ids in prompts:
        mine.append((len(ids), cache.lookup(ids)))
        cache.commit(ids)
    assert mine == prefix_cache_served(prompts, 4)


def test_a_bounded_prefix_cache_evicts_the_least_recently_used():
    cache = PrefixCache(2, 2)
    a, b = [1, 2, 3, 4, 9], [5, 6, 7, 8, 9]
    cache.commit(a)
    assert cache.lookup(a) == 4
    cache.commit(b)  # two blocks of b push both of a's out
    assert cache.lookup(a) == 0 and cache.lookup(b) == 4
    # a smaller bound serves less on the same prompts
    prompts = _prompts(1)
    assert prefix_arm(prompts, 4, 3)["computed_tokens"] > prefix_arm(prompts, 4, None)["computed_tokens"]


def test_every_occurrence_of_a_block_is_marked():
    segs = block_segments("S doc1 X doc2 Y doc1 Q", ["doc1", "doc2"])
    assert [(s.text, s.block) for s in segs] == [("S ", False), ("doc1", True), (" X ", False), ("doc2", True),
                                                 (" Y ", False), ("doc1", True), (" Q", False)]


def _rendered(seed=2, n=30):
    rng = random.Random(seed)
    docs = [" ".join(f"w{rng.randrange(9)}" for _ in range(rng.randrange(8, 16))) for _ in range(8)]
    out = []
    for i in range(n):
        picked = rng.sample(docs, 3)
        text = "SYS " + " | ".join(picked) + f" Q{i}"
        out.append(encode_segments(lambda t: [hash(w) % 1000 for w in t.split()], block_segments(text, picked)))
    return out


def test_blend_saves_tokens_below_ratio_one_and_ratio_one_is_prefix_caching():
    prompts = _rendered()
    plain = prefix_arm([r.ids for r in prompts], 4, None)["computed_tokens"]
    full = blend_arm(prompts, 1.0, 4, None, 1 << 30, LAYOUT)
    assert full["computed_tokens"] == plain and full["requests_blended"] == 0
    zero = blend_arm(prompts, 0.0, 4, None, 1 << 30, LAYOUT, store_after_stitched=True)
    assert zero["requests_blended"] > 0 and zero["computed_tokens"] < plain
    assert zero["computed_tokens"] == zero["engine_computed_tokens"] + zero["recomputed_tokens"]
    exact = blend_arm(prompts, 0.0, 4, None, 1 << 30, LAYOUT)
    assert exact["store"]["blend_stored_tokens"] <= zero["store"]["blend_stored_tokens"]
    # a store too small for any block reuses nothing
    tiny = blend_arm(prompts, 0.0, 4, None, 8, LAYOUT, store_after_stitched=True)
    assert tiny["computed_tokens"] == plain and tiny["store"]["blend_store_refused"] > 0


def test_the_exact_only_store_never_keeps_a_block_first_seen_behind_a_reused_one():
    a, b = " ".join(f"a{i}" for i in range(40)), " ".join(f"b{i}" for i in range(40))
    texts = [f"S1 {a} Q1", f"S2 {a} | {b} Q2", f"S3 {b} Q3"]
    blocks = [[a], [a, b], [b]]
    prompts = [encode_segments(lambda t: [hash(w) % 1000 for w in t.split()], block_segments(t, bl))
               for t, bl in zip(texts, blocks)]
    exact = blend_arm(prompts, 0.0, 4, None, 1 << 30, LAYOUT)
    after = blend_arm(prompts, 0.0, 4, None, 1 << 30, LAYOUT, store_after_stitched=True)
    assert exact["requests_blended"] == 1 and after["requests_blended"] == 2  # b reused only with +after
    # exact-only stores b only at the third request, where nothing stitched precedes it
    assert exact["store"]["blend_stored_tokens"] == after["store"]["blend_stored_tokens"] == 80
    assert after["computed_tokens"] == exact["computed_tokens"] - 40  # the third request keeps b


def _sim(ids, spans):
    return Rendered(list(ids), list(spans))


def test_store_depth_bounds_how_far_behind_stitched_kv_a_stored_block_may_sit():
    a, b, c = list(range(100, 140)), list(range(200, 240)), list(range(300, 340))
    prompts = [_sim([1, 1, 1, 1] + a + [9], [(4, 44)]),
               _sim([2, 2, 2, 2] + a + b + [9], [(4, 44), (44, 84)]),  # b computed behind stitched a
               _sim([3, 3, 3, 3] + b + c + [9], [(4, 44), (44, 84)])]  # c behind b (depth 1 when stored)

    def held(depth, upto=3):
        eng = BlendEngine(0.0, 4, None, 1 << 30, LAYOUT, store_depth=depth)
        for p in prompts[:upto]:
            eng.serve(p)
        return [eng.store.contains(block_key(LAYOUT, Scope(), x)) for x in (a, b, c)]

    assert held(0, 2) == [True, False, False]
    assert held(1, 2) == [True, True, False]
    assert held(1) == [True, True, False]  # c would sit two generations deep
    assert held(2) == held(None) == [True, True, True]
