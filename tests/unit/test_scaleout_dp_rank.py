"""Data-parallel rank choice in the API server (hooks/vllm/dp_rank.py): one index view
per rank, the request sent to the rank that aligns most of its blocks."""
from __future__ import annotations

import random
from types import SimpleNamespace

from starlette.requests import Request

from cp_engine.hooks.vllm.dp_rank import (RankChoice, asked_rank, choose_rank, dp_size, ranked_namespace,
                                          route)
from cp_engine.index import ContextIndex
from cp_engine.pipeline import ContextPipeline
from cp_engine.blocks import block_id


def _request(headers: dict | None = None) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return Request({"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": raw})


def _serving(size) -> SimpleNamespace:
    parallel = SimpleNamespace(data_parallel_size=size)
    return SimpleNamespace(engine_client=SimpleNamespace(vllm_config=SimpleNamespace(parallel_config=parallel)))


def test_aligned_length_counts_the_deepest_path_made_of_the_query_blocks():
    index = ContextIndex()
    index.record("r1", [1, 2, 3], namespace="ns")
    assert index.aligned_length([3, 9, 1, 2], namespace="ns") == 3
    assert index.aligned_length([1, 3], namespace="ns") == 1
    assert index.aligned_length([2, 3], namespace="ns") == 0  # the path starts at block 1
    assert index.aligned_length([1, 2, 3], namespace="other") == 0


def test_the_rank_holding_the_blocks_wins():
    index = ContextIndex()
    index.record("a", [1, 2, 3], namespace=ranked_namespace("ns", 1))
    index.record("b", [1, 7], namespace=ranked_namespace("ns", 0))
    assert choose_rank(index, [3, 2, 1], "ns", 2) == 1
    assert choose_rank(index, [7, 1], "ns", 2) == 0
    assert choose_rank(index, [3, 2, 1], "other", 2) == choose_rank(index, [1, 2, 3], "other", 2)


def test_an_asked_rank_is_kept_when_it_exists():
    index = ContextIndex()
    index.record("a", [1, 2, 3], namespace=ranked_namespace("ns", 1))
    assert choose_rank(index, [1, 2, 3], "ns", 2, asked=0) == 0
    assert choose_rank(index, [1, 2, 3], "ns", 2, asked=5) == 1  # no rank 5: chosen as usual
    assert asked_rank(_request({"X-data-parallel-rank": "1"}).headers) == 1
    assert asked_rank(_request({"X-data-parallel-rank": "one"}).headers) is None
    assert asked_rank(_request().headers) is None


def test_block_sets_no_rank_holds_spread_over_the_ranks_and_stay_together():
    index, rng = ContextIndex(), random.Random(0)
    picks = []
    for _ in range(400):
        ids = rng.sample(range(10_000), 8)
        rank = choose_rank(index, ids, "", 4)
        assert choose_rank(index, list(reversed(ids)), "", 4) == rank
        picks.append(rank)
    assert all(60 <= picks.count(r) <= 140 for r in range(4)), [picks.count(r) for r in range(4)]


def test_route_sets_the_header_vllm_reads_and_replaces_a_stale_one():
    req = _request({"X-data-parallel-rank": "0", "Authorization": "Bearer t"})
    assert req.headers["x-data-parallel-rank"] == "0"  # cached view, rebuilt after route
    route(req, 1)
    assert req.headers.getlist("x-data-parallel-rank") == ["1"]
    assert req.headers["authorization"] == "Bearer t"


def test_dp_size_reads_the_engine_config_and_defaults_to_one():
    assert dp_size(_serving(4)) == 4
    assert dp_size(_serving(1)) == 1
    assert dp_size(SimpleNamespace()) == 1
    assert RankChoice.for_request(_serving(1), _request(), ContextIndex()) is None
    assert RankChoice.for_request(_serving(2), None, ContextIndex()) is None


def test_rank_choice_names_the_namespace_and_pins_the_request():
    pipe = ContextPipeline()
    docs = ["alpha " * 30, "beta " * 30, "gamma " * 30]
    ids = [block_id(d) for d in docs]
    pipe.index.record("seen", ids, namespace=ranked_namespace("completion", 1))
    req = _request()
    choice = RankChoice.for_request(_serving(2), req, pipe.index)
    assert choice.namespace("completion", list(reversed(ids))) == ranked_namespace("completion", 1)
    choice.pin()
    assert req.headers["x-data-parallel-rank"] == "1"


def test_rewrite_messages_takes_the_namespace_from_namespace_for():
    pipe = ContextPipeline()
    seen = []

    def namespace_for(ns, ids):
        seen.append((ns, ids))
        return ns + "|dp3"

    docs = ["one " * 20, "two " * 20]
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "q?"}]
    _, prep = pipe.rewrite_messages(messages, docs, namespace_for=namespace_for)
    assert prep.namespace.endswith("|dp3")
    assert seen[0][1] == [block_id(d) for d in docs]
    _, plain = pipe.rewrite_messages(messages, docs)
    assert plain.namespace == seen[0][0]


def test_the_rank_path_renders_what_the_plain_path_renders():
    """The ids hashed for the rank choice are the ones prepare orders and renders by."""
    docs = ["alpha " * 30, "beta " * 30, "gamma " * 30, "alpha " * 30]
    messages = [{"role": "user", "content": "which?"}]
    ranked, plain = ContextPipeline(), ContextPipeline()
    for pipe in (ranked, plain):  # a recorded path, so the order is the index's doing
        pipe.record("r0", pipe.prepare(docs[2:3] + docs[:2], namespace=""))
    out_r, prep_r = ranked.rewrite_messages(messages, docs, namespace_for=lambda ns, ids: ns)
    out_p, prep_p = plain.rewrite_messages(messages, docs)
    assert (prep_r.block_ids, prep_r.order, prep_r.full, prep_r.context_text) == \
        (prep_p.block_ids, prep_p.order, prep_p.full, prep_p.context_text)
    assert out_r == out_p
