"""Routing keys and replica policies (cp_engine.scaleout): no engine."""
from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings, strategies as st

from cp_engine.blocks import block_id
from cp_engine.scaleout.key import canonical_order, key_hash, lead_ids, routing_key
from cp_engine.scaleout.routing import (BlockAffinity, LoadBound, PrefixAware, RoundRobin, RouteRequest,
                                        hottest_share, make_policy)

texts = st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=12)
ids64 = st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=30)


# ------------------------------------------------------------------------------- keys

@given(texts, st.randoms(use_true_random=False), st.integers(1, 4))
def test_the_routing_key_ignores_order_and_repeats(blocks, rnd, lead):
    shuffled = blocks + blocks[: len(blocks) // 2]
    rnd.shuffle(shuffled)
    assert routing_key(shuffled, lead) == routing_key(blocks, lead)
    assert key_hash([block_id(b) for b in shuffled], lead) == key_hash([block_id(b) for b in blocks], lead)


def test_the_routing_key_is_the_smallest_block_ids_in_hex():
    blocks = ["alpha", "beta", "gamma"]
    ids = sorted(block_id(b) for b in blocks)
    assert routing_key(blocks) == f"{ids[0]:016x}"
    assert routing_key(blocks, lead=2) == f"{ids[0]:016x}-{ids[1]:016x}"
    assert routing_key([]) == "" and key_hash([]) == 0
    assert key_hash(ids) == ids[0]  # one id is already a uniform 64-bit hash


@given(ids64, st.integers(1, 5))
def test_lead_ids_are_a_prefix_of_the_canonical_order(ids, lead):
    order = canonical_order(ids)
    assert order == sorted(set(ids))
    assert lead_ids(ids, lead) == order[:lead]


def test_a_lead_below_one_is_refused():
    with pytest.raises(ValueError):
        lead_ids([1, 2], 0)


def test_sets_sharing_most_blocks_usually_share_a_key():
    """Bottom-1 MinHash: P(same key) = Jaccard similarity."""
    rng = random.Random(7)
    same = 0
    for _ in range(400):
        common = [rng.getrandbits(64) for _ in range(9)]
        a, b = common + [rng.getrandbits(64)], common + [rng.getrandbits(64)]  # Jaccard 9/11
        same += key_hash(a) == key_hash(b)
    assert abs(same / 400 - 9 / 11) < 0.08


# ------------------------------------------------------------------------ load bound

@given(st.integers(1, 16), st.floats(1.0, 3.0), st.one_of(st.none(), st.integers(1, 50)),
       st.lists(st.integers(0, 10**6), min_size=1, max_size=300))
def test_the_load_bound_always_admits_someone_and_is_never_exceeded(replicas, factor, window, picks):
    bound = LoadBound(replicas, factor, window)
    for p in picks:
        allowed = bound.admissible()
        assert allowed, "a factor >= 1 leaves some replica admissible"
        cap = bound.limit()
        r = allowed[p % len(allowed)]
        bound.assign(r)
        assert max(bound.loads) <= cap
        assert sum(bound.loads) == bound.counted
        if window is not None:
            assert bound.counted <= window


@pytest.mark.parametrize("bad", [dict(replicas=0), dict(replicas=2, factor=0.9), dict(replicas=2, window=0)])
def test_load_bound_refuses_bad_settings(bad):
    with pytest.raises(ValueError):
        LoadBound(**bad)


# -------------------------------------------------------------------------- policies

def _requests(n, seed=0, corpus=60, k=6):
    rng = random.Random(seed)
    hot = list(range(corpus))
    out = []
    for i in range(n):
        blocks = rng.sample(hot[: corpus // 3], 2) + rng.sample(hot, k - 2)
        blocks = list(dict.fromkeys(b + 1 for b in blocks))  # ids >= 1
        units = (("system",), *blocks, ("q", i))
        out.append(RouteRequest(units, tuple([5] + [10] * len(blocks) + [3]), key_hash(blocks)))
    return out


def test_round_robin_cycles():
    rr = RoundRobin(3)
    assert [rr.route(RouteRequest()) for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(["prefix_aware", "block_affinity"]), st.integers(1, 9), st.floats(1.0, 2.0),
       st.integers(0, 5))
def test_every_policy_respects_its_load_bound(name, replicas, factor, seed):
    policy = make_policy(name, replicas, tree_tokens=400, factor=factor, threshold=0.2)
    chosen = [policy.route(r) for r in _requests(120, seed)]
    assert all(0 <= r < replicas for r in chosen)
    counts = [chosen.count(r) for r in range(replicas)]
    assert max(counts) <= math.ceil(factor * len(chosen) / replicas)
    assert hottest_share(chosen, replicas) == max(counts) / len(chosen)


@pytest.mark.parametrize("name", ["round_robin", "prefix_aware", "block_affinity"])
def test_policies_are_deterministic(name):
    a = [make_policy(name, 5).route(r) for r in _requests(80, 3)]
    b = [make_policy(name, 5).route(r) for r in _requests(80, 3)]
    assert a == b


def test_prefix_aware_follows_the_longest_cached_prefix():
    p = PrefixAware(4, tree_tokens=10_000, factor=4.0, threshold=0.5)
    shared = RouteRequest((("s",), 1, 2, 3, ("q", 0)), (5, 10, 10, 10, 2))
    first = p.route(shared)
    again = RouteRequest((("s",), 1, 2, 3, ("q", 1)), (5, 10, 10, 10, 2))
    assert p.route(again) == first  # 35 of 37 tokens match there
    other = RouteRequest((("s",), 9, 8, 7, ("q", 2)), (5, 10, 10, 10, 2))
    assert p.route(other) != first  # only the system prompt matches: the smallest tree takes it


def test_prefix_aware_gives_way_to_the_load_bound():
    p = PrefixAware(2, tree_tokens=10_000, factor=1.0, threshold=0.0)
    same = [RouteRequest((("s",), 1, 2, ("q", i)), (5, 10, 10, 2)) for i in range(6)]
    assert [p.route(r) for r in same] == [0, 1, 0, 1, 0, 1]  # factor 1: strictly even


def test_block_affinity_sends_one_key_home_until_the_bound_moves_it():
    aff = BlockAffinity(8, factor=1.0)
    key = block_id("a popular document")
    home = aff.home(key)
    assert aff.route(RouteRequest(key=key)) == home
    # with factor 1 the home replica cannot take a second request before everyone has one
    assert aff.route(RouteRequest(key=key)) != home


def test_block_affinity_spreads_distinct_keys_evenly():
    aff = BlockAffinity(8, factor=10.0)  # bound out of the way: the ring alone
    chosen = [aff.route(RouteRequest(key=block_id(f"doc {i}"))) for i in range(4000)]
    assert hottest_share(chosen, 8) < 1.5 / 8


def test_unknown_policy_and_bad_request_are_refused():
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("random", 2)
    with pytest.raises(ValueError):
        RouteRequest((1, 2), (3,))


# ---------------------------------------------------------------------------- client

from cp_engine.marking import find_marks  # noqa: E402
from cp_engine.pipeline import InvalidBlocks  # noqa: E402
from cp_engine.scaleout.client import canonical_messages, routing_headers, template_marks  # noqa: E402

DOCS = ["Paris is the capital of France.", "The Loire is a river.", "Lyon lies on the Rhone."]


def test_canonical_messages_are_the_same_for_any_retrieval_order_and_the_plugin_reads_them():
    msgs = [{"role": "system", "content": "Answer."}, {"role": "user", "content": "Which city?"}]
    a = canonical_messages(msgs, DOCS)
    b = canonical_messages(msgs, DOCS[::-1] + DOCS[:1])
    assert a == b and msgs[1]["content"] == "Which city?"  # input untouched
    marks = find_marks({}, a)
    assert marks.source == "parts"
    assert marks.blocks == sorted(DOCS, key=block_id)
    assert marks.messages[1]["content"] in ("Which city?", [{"type": "text", "text": "Which city?"}])


def test_routing_headers_carry_the_block_set_key():
    h = routing_headers(DOCS)
    assert h["X-Session-Id"] == h["X-CP-Route-Key"] == h["X-SMG-Routing-Key"] == routing_key(DOCS)
    assert routing_headers(DOCS[::-1]) == h and routing_headers([]) == {}


def test_client_helpers_refuse_malformed_input():
    with pytest.raises(InvalidBlocks):
        routing_headers(["ok", ""])
    with pytest.raises(InvalidBlocks):
        canonical_messages([{"role": "system", "content": "x"}], DOCS)


def test_template_marks_are_what_the_plugin_reads_from_chat_template_kwargs():
    body = {"messages": [{"role": "user", "content": "Which city?"}], **template_marks(DOCS, "conv-1")}
    marks = find_marks(body, body["messages"])
    assert (marks.blocks, marks.conversation_id, marks.source) == (DOCS, "conv-1", "template_kwargs")
    assert template_marks(DOCS) == {"chat_template_kwargs": {"cp_context_blocks": DOCS}}
    own = {"enable_thinking": False}
    body = {"messages": body["messages"], **template_marks(DOCS, template_kwargs=own)}
    assert find_marks(body, body["messages"]).template_kwargs == own and own == {"enable_thinking": False}
    with pytest.raises(InvalidBlocks):
        template_marks(["ok", ""])
    with pytest.raises(InvalidBlocks):
        template_marks(DOCS, conversation_id="")


def test_every_turn_of_a_conversation_gets_its_key_whatever_its_blocks():
    turn1 = routing_headers(DOCS[:2], conversation_id="chat-7")
    turn2 = routing_headers(DOCS[1:], conversation_id="chat-7")
    assert turn1 == turn2 and turn1["X-SMG-Routing-Key"].startswith("conv-")
    assert routing_headers([], conversation_id="chat-7") == turn1  # a turn without blocks too
    assert routing_headers(DOCS[:2], conversation_id="chat-8") != turn1
    assert turn1 != routing_headers(DOCS[:2])  # not the block-set key
    for bad in ("", 7, "x" * 257):
        with pytest.raises(InvalidBlocks):
            routing_headers(DOCS, conversation_id=bad)
