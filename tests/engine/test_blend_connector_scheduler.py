"""Blend connector, scheduler side, on real vLLM request and scheduler-output objects.

No engine runs: ``BlendScheduler`` gets a real ``CacheConfig``, real ``Request``s hashed
by vLLM's own block hasher, ``KVCacheBlocks`` and ``SchedulerOutput``; the worker's
reports are ``BlendWorkerMeta`` objects as the worker builds them.
"""
from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest

from vllm_server import vllm_available

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not vllm_available(), reason="vllm not installed")]

BS = 16


@pytest.fixture(scope="module")
def vllm_bits():
    from vllm import SamplingParams
    from vllm.config import CacheConfig
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.kv_cache_utils import KVCacheBlock, get_request_block_hasher, init_none_hash
    from vllm.v1.core.sched.output import NewRequestData, SchedulerOutput
    from vllm.v1.request import Request

    cache = CacheConfig(block_size=BS)
    fn = get_hash_fn_by_name(cache.prefix_caching_hash_algo)
    init_none_hash(fn)
    return SimpleNamespace(SamplingParams=SamplingParams, cache=cache, hasher=get_request_block_hasher(BS, fn),
                           KVCacheBlocks=KVCacheBlocks, KVCacheBlock=KVCacheBlock, NewRequestData=NewRequestData,
                           SchedulerOutput=SchedulerOutput, Request=Request)


@pytest.fixture
def config():
    from cp_engine.config import load_config

    # Depth 0 (exact entries only) so a test sees one store rule at a time; the depth
    # bound has tests of its own below.
    return load_config({"CP_ENGINE_BLEND": "1", "CP_ENGINE_BLEND_RATIO": "1.0", "CP_ENGINE_BLEND_STORE_DEPTH": "0"})


def _layout():
    from cp_engine.blend.keys import KVLayout

    return KVLayout.make(model="tiny", fingerprint="f", dtype="float32", num_layers=4, num_kv_heads=2,
                         head_dim=8, block_size=BS, rope="neox/test")


def _make(vllm_bits, config, layout=True):
    from cp_engine.hooks.vllm.blend_scheduler import BlendScheduler

    sched = BlendScheduler(SimpleNamespace(cache_config=vllm_bits.cache), config)
    if layout:
        sched.layout = _layout()
    return sched


def _request(vllm_bits, rid, prompt, xargs=None, salt=None, **kw):
    params = vllm_bits.SamplingParams(max_tokens=4, extra_args=xargs)
    return vllm_bits.Request(rid, list(prompt), params, None, cache_salt=salt, block_hasher=vllm_bits.hasher, **kw)


def _store(sched, prompt, spans, tenant="", salt="", depth=0, leads=None):
    """Tell the scheduler (as the worker would) that these blocks are stored at ``depth``
    behind ``leads`` (one digest per span; default: none known)."""
    from cp_engine.blend.keys import Scope, block_key
    from cp_engine.hooks.vllm.blend_meta import BlendWorkerMeta

    scope = Scope(tenant, salt)
    leads = leads or [None] * len(spans)
    stored = [(block_key(sched.layout, scope, prompt[s:e]).lookup, depth, lead) for (s, e), lead in zip(spans, leads)]
    sched.on_worker_output(SimpleNamespace(kv_connector_worker_meta=BlendWorkerMeta(stored=stored),
                                           kv_connector_stats=None))


def _ids(n, seed):
    rng = random.Random(seed)
    return [rng.randrange(10, 8000) for _ in range(n)]


def _swapped():
    """A prompt that stored blocks A, B behind S, and one with them swapped behind S + x."""
    s, a, b = _ids(32, 1), _ids(40, 2), _ids(40, 3)
    first = s + a + b + _ids(10, 4)
    second = s + _ids(5, 5) + b + _ids(3, 6) + a + _ids(12, 7)
    spans1 = [[32, 72], [72, 112]]
    spans2 = [[37, 77], [80, 120]]
    return first, spans1, second, spans2


def test_claims_stored_blocks_at_new_positions_and_rekeys_from_the_first_stitched_block(vllm_bits, config):
    sched = _make(vllm_bits, config)
    first, spans1, second, spans2 = _swapped()
    _store(sched, first, spans1)
    req = _request(vllm_bits, "r2", second, {"cp_spans": spans2})
    before = list(req.block_hashes)
    claimed, is_async = sched.matched_tokens(req, 32)
    assert not is_async
    assert claimed == spans2[1][1] - 32  # up to the end of the last stored block
    first_block = spans2[0][0] // BS
    assert req.block_hashes[:first_block] == before[:first_block]  # exact prefix stays shareable
    assert all(a != b for a, b in zip(req.block_hashes[first_block:], before[first_block:]))
    # asked again (e.g. no free blocks this step, or after a preemption): no second re-keying
    marked = list(req.block_hashes)
    sched.build_meta(vllm_bits.SchedulerOutput.make_empty())
    assert sched.matched_tokens(req, 32)[0] == claimed
    assert req.block_hashes == marked


def test_the_flat_span_form_a_client_can_send_claims_the_same(vllm_bits, config):
    sched = _make(vllm_bits, config)
    first, spans1, second, spans2 = _swapped()
    _store(sched, first, spans1)
    pairs = sched.matched_tokens(_request(vllm_bits, "p", second, {"cp_spans": spans2}), 32)[0]
    flat = [v for span in spans2 for v in span]
    assert pairs > 0 and sched.matched_tokens(_request(vllm_bits, "f", second, {"cp_spans": flat}), 32)[0] == pairs


def test_an_exact_request_never_hashes_like_a_stitched_one(vllm_bits, config):
    sched = _make(vllm_bits, config)
    first, spans1, second, spans2 = _swapped()
    _store(sched, first, spans1)
    blended = _request(vllm_bits, "b", second, {"cp_spans": spans2})
    assert sched.matched_tokens(blended, 32)[0] > 0
    plain = _request(vllm_bits, "p", second)
    assert not set(plain.block_hashes[spans2[0][0] // BS:]) & set(blended.block_hashes)


@pytest.mark.parametrize("spans", [
    [[37, 77], [70, 120]],  # overlapping
    [[80, 120], [37, 77]],  # unsorted
    [[37, 77], [80, 9999]],  # out of range
    [[37, 37]],  # empty
    [[37.0, 77.0]],  # not ints
    "37-77",
    [37, 77, 80],  # flat, odd length
    [37, 77, 70, 120],  # flat, overlapping
])
def test_forged_spans_make_a_plain_request(vllm_bits, config, spans):
    sched = _make(vllm_bits, config)
    first, spans1, second, _ = _swapped()
    _store(sched, first, spans1)
    req = _request(vllm_bits, "f", second, {"cp_spans": spans})
    before = list(req.block_hashes)
    assert sched.matched_tokens(req, 32) == (0, False)
    assert req.block_hashes == before and "f" not in sched.requests


def test_no_claim_without_spans_layout_or_for_embeds_and_multimodal(vllm_bits, config):
    import torch

    first, spans1, second, spans2 = _swapped()
    no_layout = _make(vllm_bits, config, layout=False)
    assert no_layout.matched_tokens(_request(vllm_bits, "a", second, {"cp_spans": spans2}), 32) == (0, False)
    sched = _make(vllm_bits, config)
    _store(sched, first, spans1)
    assert sched.matched_tokens(_request(vllm_bits, "n", second), 32) == (0, False)
    embeds = _request(vllm_bits, "e", second, {"cp_spans": spans2}, prompt_embeds=torch.zeros(len(second), 8))
    assert sched.matched_tokens(embeds, 32) == (0, False)
    other_salt = _request(vllm_bits, "s", second, {"cp_spans": spans2}, salt="other")
    assert sched.matched_tokens(other_salt, 32) == (0, False)  # stored under salt ""
    sched.disabled = "architecture"
    assert sched.matched_tokens(_request(vllm_bits, "d", second, {"cp_spans": spans2}), 32) == (0, False)


def _blocks(vllm_bits, ids):
    return vllm_bits.KVCacheBlocks(([vllm_bits.KVCacheBlock(i) for i in ids],))


def _stitched_step(vllm_bits, sched, xargs=None, stored_depth=0):
    """One step of a request that reuses two stored blocks (at ``stored_depth``) between
    an unstored block before them ([5, 20)) and one after them ([120, 160))."""
    first, spans1, second, spans2 = _swapped()
    second = second[:120] + _ids(40, 9) + second[120:]
    spans2 = [[5, 20], *spans2, [120, 160]]
    _store(sched, first, spans1, depth=stored_depth)
    req = _request(vllm_bits, "r", second, {"cp_spans": spans2, **(xargs or {})})
    claimed, _ = sched.matched_tokens(req, 32)
    req.num_computed_tokens = 32 + claimed
    sched.after_alloc(req, _blocks(vllm_bits, range(1, 12)), claimed)
    out = vllm_bits.SchedulerOutput.make_empty()
    out.scheduled_new_reqs = [vllm_bits.NewRequestData.from_request(req, ([*range(1, 12)],))]
    out.num_scheduled_tokens = {"r": len(second) - req.num_computed_tokens}
    return sched.build_meta(out), req, second, out


def test_meta_orders_the_load_and_only_exact_saves(vllm_bits, config):
    sched = _make(vllm_bits, config)
    meta, req, second, out = _stitched_step(vllm_bits, sched)
    (load,) = meta.loads
    assert load.block_ids == tuple(range(1, 12)) and load.plan.claim_start == 32
    assert load.token_ids == tuple(second[:load.plan.claim_end])
    # [5, 20) lies before the first stitched token: exact, stored; [120, 160) attends to
    # stitched KV (store depth 0 keeps it out); the reused blocks are stored already.
    assert [(s.start, s.end, s.depth) for s in meta.saves] == [(5, 20, 0)]
    assert meta.saves[0].token_ids == tuple(second[5:20])
    assert not sched.build_meta(out).loads  # ordered once
    sched.finished(req)
    assert "r" not in sched.requests


def _depth_config(depth):
    from cp_engine.config import load_config

    return load_config({"CP_ENGINE_BLEND": "1", "CP_ENGINE_BLEND_RATIO": "0",
                        "CP_ENGINE_BLEND_STORE_DEPTH": str(depth)})


@pytest.mark.parametrize("server, request_depth, stored_depth, expected", [
    (1, None, 0, [(5, 20, 0), (120, 160, 1)]),  # behind exact entries: depth 1, allowed
    (1, None, 1, [(5, 20, 0)]),                 # behind a depth-1 entry: depth 2 > 1
    (2, None, 1, [(5, 20, 0), (120, 160, 2)]),
    (2, 0, 0, [(5, 20, 0)]),                    # the request lowers the server's depth
    (0, 3, 0, [(5, 20, 0)]),                    # and cannot raise it
])
def test_blocks_behind_stitched_kv_are_stored_within_the_depth_bound(vllm_bits, server, request_depth,
                                                                      stored_depth, expected):
    sched = _make(vllm_bits, _depth_config(server))
    xargs = {} if request_depth is None else {"cp_blend_store_depth": request_depth}
    meta, *_ = _stitched_step(vllm_bits, sched, xargs, stored_depth)
    assert len(meta.loads) == 1
    assert [(s.start, s.end, s.depth) for s in meta.saves] == expected


def test_the_mirror_keeps_each_entrys_depth_until_it_is_dropped(vllm_bits):
    from cp_engine.blend.keys import Scope, block_key
    from cp_engine.hooks.vllm.blend_meta import BlendWorkerMeta

    sched = _make(vllm_bits, _depth_config(2))
    key = block_key(sched.layout, Scope("", ""), _ids(20, 3))
    sched.on_worker_output(SimpleNamespace(kv_connector_worker_meta=BlendWorkerMeta(stored=[(key.lookup, 2, None)]),
                                           kv_connector_stats=None))
    assert sched.mirror.contains(key) and sched.mirror.depth(key) == 2
    sched.on_worker_output(SimpleNamespace(kv_connector_worker_meta=BlendWorkerMeta(dropped=[key.lookup]),
                                           kv_connector_stats=None))
    assert not sched.mirror.contains(key)


def test_saves_wait_until_the_block_is_computed_and_the_first_request_stores_before_any_layout(vllm_bits, config):
    sched = _make(vllm_bits, config, layout=False)
    prompt = _ids(100, 11)
    req = _request(vllm_bits, "c", prompt, {"cp_spans": [[10, 40], [50, 90]]})
    assert sched.matched_tokens(req, 0) == (0, False)
    sched.after_alloc(req, _blocks(vllm_bits, [7, 8]), 0)
    out = vllm_bits.SchedulerOutput.make_empty()
    out.scheduled_new_reqs = [vllm_bits.NewRequestData.from_request(req, ([7, 8],))]
    out.num_scheduled_tokens = {"c": 48}  # chunked prefill: [0, 48) this step
    assert [(s.start, s.end) for s in sched.build_meta(out).saves] == [(10, 40)]
    req.num_computed_tokens = 48
    out = vllm_bits.SchedulerOutput.make_empty()
    out.scheduled_cached_reqs.req_ids = ["c"]
    out.scheduled_cached_reqs.new_block_ids = [([9, 10],)]
    out.scheduled_cached_reqs.num_computed_tokens = [48]
    out.num_scheduled_tokens = {"c": 52}
    (save,) = sched.build_meta(out).saves
    assert (save.start, save.end, save.block_ids) == (50, 90, (7, 8, 9, 10))


def test_step_cap_defers_a_second_claim_and_refuses_an_oversized_first(vllm_bits, config, monkeypatch):
    from cp_engine.hooks.vllm import blend_scheduler

    sched = _make(vllm_bits, config)
    first, spans1, second, spans2 = _swapped()
    _store(sched, first, spans1)
    one = sched.matched_tokens(_request(vllm_bits, "x", second, {"cp_spans": spans2}), 32)[0]
    monkeypatch.setattr(blend_scheduler, "MAX_CLAIMED_PER_STEP", one + 10)
    assert sched.matched_tokens(_request(vllm_bits, "y", second, {"cp_spans": spans2}), 32) == (None, False)
    sched.build_meta(vllm_bits.SchedulerOutput.make_empty())  # next step
    assert sched.matched_tokens(_request(vllm_bits, "y", second, {"cp_spans": spans2}), 32)[0] == one
    monkeypatch.setattr(blend_scheduler, "MAX_CLAIMED_PER_STEP", one - 1)
    sched.build_meta(vllm_bits.SchedulerOutput.make_empty())
    assert sched.matched_tokens(_request(vllm_bits, "z", second, {"cp_spans": spans2}), 32) == (0, False)


def test_worker_reports_feed_the_mirror_the_disabled_state_and_the_counters(vllm_bits, config):
    from cp_engine.blend.keys import Scope, block_key
    from cp_engine.hooks import metrics
    from cp_engine.hooks.vllm.blend_meta import BlendWorkerMeta
    from cp_engine.hooks.vllm.blend_stats import BlendStats

    sched = _make(vllm_bits, config, layout=False)
    layout = _layout()
    key = block_key(layout, Scope(), [1, 2, 3])
    before = {n: metrics.total(n) for n in ("blend_recomputed_tokens", "blend_store_bytes", "blend_disabled")}
    stats = BlendStats({"recomputed_tokens": 12.5, "store": {"blend_store_bytes": 4096}})
    sched.on_worker_output(SimpleNamespace(kv_connector_worker_meta=BlendWorkerMeta(layout, [(key.lookup, 0, None)]),
                                           kv_connector_stats=stats))
    assert sched.layout == layout and sched.mirror.contains(key)
    stats = BlendStats({"store": {"blend_store_bytes": 1024}})
    sched.on_worker_output(SimpleNamespace(kv_connector_worker_meta=BlendWorkerMeta(dropped=[key.lookup],
                                                                                    disabled="architecture"),
                                           kv_connector_stats=stats))
    assert not sched.mirror.contains(key) and sched.disabled == "architecture"
    assert metrics.total("blend_recomputed_tokens") - before["blend_recomputed_tokens"] == 12.5
    assert metrics.total("blend_store_bytes") - before["blend_store_bytes"] == 1024  # the gauge's value
    assert metrics.value("blend_disabled", reason="architecture") >= 1


def test_stats_aggregate_and_rebuild_from_their_data():
    from cp_engine.hooks.vllm.blend_connector import BlendConnector
    from cp_engine.hooks.vllm.blend_stats import BlendStats

    a = BlendStats({"loads": 1, "fallback:store_miss": 1, "store": {"blend_store_bytes": 1}})
    b = BlendStats({"loads": 2, "store": {"blend_store_bytes": 5}})
    both = a.aggregate(b)
    assert both.data == {"loads": 3, "fallback:store_miss": 1, "store": {"blend_store_bytes": 5}}
    assert both.reduce() == {"loads": 3, "fallback:store_miss": 1}
    assert BlendConnector.build_kv_connector_stats(both.data).data == both.data
    assert BlendStats().is_empty() and not both.is_empty()


def test_a_hinted_request_drops_its_rendered_path_from_the_first_stitched_block(vllm_bits, config, monkeypatch):
    from cp_engine.hooks import channel

    sent = []
    monkeypatch.setattr(channel, "engine_sender", lambda: SimpleNamespace(send=sent.append))
    sched = _make(vllm_bits, config)
    first, spans1, second, spans2 = _swapped()
    _store(sched, first, spans1)
    path = [format(i, "016x") for i in (11, 12, 13)]
    hints = {"cp_spans": spans2, "cp_ns": "ns", "cp_path": path, "cp_ends": [30, 77, 120], "cp_rid": "r"}
    req = _request(vllm_bits, "h", second, hints)
    assert sched.matched_tokens(req, 32)[0] > 0
    # first stitched token 37 lies in the second rendered block (ends 30 | 77)
    assert sent == [{"op": "evict_path", "ns": "ns", "path": path[:2]}]
    sched.matched_tokens(req, 32)  # asked again: already re-keyed, nothing sent twice
    assert len(sent) == 1


def _claim_plan(sched, vllm_bits, rid, prompt, xargs):
    req = _request(vllm_bits, rid, prompt, xargs)
    claimed, _ = sched.matched_tokens(req, 32)
    return claimed, sched.requests[rid].plan if rid in sched.requests else None


@pytest.mark.parametrize("xargs, ratio, mode", [
    ({}, 0.15, "both"),  # the flags'
    ({"cp_blend_ratio": 0.0}, 0.0, "both"),
    ({"cp_blend_ratio": 0.5, "cp_blend_mode": "first_tokens"}, 0.5, "first_tokens"),
    ({"cp_blend_mode": "deviation"}, 0.15, "deviation"),
    ({"cp_blend_ratio": 1.7, "cp_blend_mode": "bogus"}, 0.15, "both"),  # refused values: the flags'
])
def test_a_request_sets_its_own_ratio_and_mode(vllm_bits, xargs, ratio, mode):
    from cp_engine.config import load_config

    sched = _make(vllm_bits, load_config({"CP_ENGINE_BLEND": "1", "CP_ENGINE_BLEND_RATIO": "0.15"}))
    first, spans1, second, spans2 = _swapped()
    _store(sched, first, spans1)
    claimed, plan = _claim_plan(sched, vllm_bits, "r", second, {"cp_spans": spans2, **xargs})
    assert claimed == spans2[1][1] - 32 and plan.ratio == ratio and plan.mode == mode
    covered = sum(e - s for s, e in spans2)
    assert plan.recomputed == claimed - covered + math.ceil(ratio * covered - 1e-9)
    if mode == "first_tokens":
        assert not plan.needs_deviation


def test_a_request_at_ratio_one_claims_and_recomputes_everything_on_a_lower_default(vllm_bits):
    from cp_engine.config import load_config

    sched = _make(vllm_bits, load_config({"CP_ENGINE_BLEND": "1", "CP_ENGINE_BLEND_RATIO": "0"}))
    first, spans1, second, spans2 = _swapped()
    _store(sched, first, spans1)
    claimed, plan = _claim_plan(sched, vllm_bits, "one", second, {"cp_spans": spans2, "cp_blend_ratio": 1})
    assert claimed > 0 and plan.recomputed == claimed and plan.reused == 0
    claimed0, plan0 = _claim_plan(sched, vllm_bits, "zero", second, {"cp_spans": spans2})
    assert claimed0 == claimed and plan0.reused == sum(e - s for s, e in spans2)


def test_the_recompute_cost_flag_ends_the_claim_before_a_gap_worth_less_than_it_costs(vllm_bits):
    """B then A stored; the prompt puts 43 new tokens between them (A's three-token lead
    plus 40): at cost 3 A's reuse is not worth recomputing that gap in blend's pass."""
    from cp_engine.config import load_config

    first, spans1, second, spans2 = _swapped()  # second: B at [37, 77), A at [80, 120)
    gap_prompt = second[:77] + _ids(40, 8) + second[77:]  # 40 new tokens between B and A
    gap_spans = [[37, 77], [120, 160]]
    claims = {}
    for cost in ("1", "3"):
        sched = _make(vllm_bits, load_config({"CP_ENGINE_BLEND": "1", "CP_ENGINE_BLEND_RATIO": "0",
                                              "CP_ENGINE_BLEND_RECOMPUTE_COST": cost}))
        _store(sched, first, spans1)
        claims[cost] = _claim_plan(sched, vllm_bits, "r" + cost, gap_prompt, {"cp_spans": gap_spans})[0]
    # cost 1: through A; cost 3: A (40 reused) is not worth recomputing the 43-token gap
    # before it at 2 extra engine tokens each, so the claim stops after B
    assert claims["1"] == 160 - 32
    assert claims["3"] == 77 - 32


def _claim_and_alloc(vllm_bits, sched, req, hit, block_ids):
    claimed, _ = sched.matched_tokens(req, hit)
    assert claimed > 0
    req.num_computed_tokens = hit + claimed
    sched.after_alloc(req, _blocks(vllm_bits, block_ids), claimed)
    return claimed


def test_a_preempted_request_reloads_into_its_new_blocks(vllm_bits, config):
    """vLLM frees a preempted request's blocks and schedules it again from its prefix
    hit: the claim is made again (no second re-keying) and the load goes to the blocks
    the resumed request now holds, not the freed ones."""
    sched = _make(vllm_bits, config)
    first, spans1, second, spans2 = _swapped()
    _store(sched, first, spans1)
    req = _request(vllm_bits, "p", second, {"cp_spans": spans2})
    claimed = _claim_and_alloc(vllm_bits, sched, req, 32, range(1, 10))
    out = vllm_bits.SchedulerOutput.make_empty()
    out.scheduled_new_reqs = [vllm_bits.NewRequestData.from_request(req, ([*range(1, 10)],))]
    out.num_scheduled_tokens = {"p": len(second) - req.num_computed_tokens}
    (load,) = sched.build_meta(out).loads
    assert load.block_ids == tuple(range(1, 10))
    marked = list(req.block_hashes)
    # preempted: blocks freed, computed tokens back to 0, scheduled again with new blocks
    req.num_computed_tokens = 0
    assert _claim_and_alloc(vllm_bits, sched, req, 32, range(40, 49)) == claimed
    assert req.block_hashes == marked
    out = vllm_bits.SchedulerOutput.make_empty()
    out.scheduled_cached_reqs.req_ids = ["p"]
    out.scheduled_cached_reqs.resumed_req_ids = {"p"}
    out.scheduled_cached_reqs.new_block_ids = [([*range(40, 49)],)]
    out.scheduled_cached_reqs.num_computed_tokens = [32 + claimed]
    out.num_scheduled_tokens = {"p": len(second) - 32 - claimed}
    (again,) = sched.build_meta(out).loads
    assert again.block_ids == tuple(range(40, 49)) and again.plan == load.plan


def test_a_request_aborted_between_claim_and_load_orders_nothing(vllm_bits, config):
    sched = _make(vllm_bits, config)
    first, spans1, second, spans2 = _swapped()
    _store(sched, first, spans1)
    req = _request(vllm_bits, "a", second, {"cp_spans": spans2})
    _claim_and_alloc(vllm_bits, sched, req, 32, range(1, 10))
    sched.finished(req)  # aborted before the step that would load it
    out = vllm_bits.SchedulerOutput.make_empty()
    out.scheduled_new_reqs = [vllm_bits.NewRequestData.from_request(req, ([*range(1, 10)],))]
    out.num_scheduled_tokens = {"a": 5}
    meta = sched.build_meta(out)
    assert not meta.loads and not meta.saves and "a" not in sched.requests


def test_a_cache_reset_forgets_every_stored_key_and_orders_the_worker_to_empty_its_store(vllm_bits, config):
    sched = _make(vllm_bits, config)
    first, spans1, second, spans2 = _swapped()
    _store(sched, first, spans1)
    assert sched.reset() is True
    assert sched.matched_tokens(_request(vllm_bits, "r", second, {"cp_spans": spans2}), 32) == (0, False)
    assert sched.build_meta(vllm_bits.SchedulerOutput.make_empty()).reset is True
    assert sched.build_meta(vllm_bits.SchedulerOutput.make_empty()).reset is False  # once


def _run_step(vllm_bits, sched, rid, prompt, spans, xargs=None, hit=32):
    """Claim, allocate and schedule one request's prefill in one step; its step meta."""
    req = _request(vllm_bits, rid, prompt, {"cp_spans": spans, **(xargs or {})})
    claimed, _ = sched.matched_tokens(req, hit)
    req.num_computed_tokens = hit + claimed
    sched.after_alloc(req, _blocks(vllm_bits, range(1, 12)), claimed)
    out = vllm_bits.SchedulerOutput.make_empty()
    out.scheduled_new_reqs = [vllm_bits.NewRequestData.from_request(req, ([*range(1, 12)],))]
    out.num_scheduled_tokens = {rid: len(prompt) - req.num_computed_tokens}
    return sched.build_meta(out)


def test_saves_carry_each_blocks_lead_and_a_block_behind_the_same_lead_is_kept_whole(vllm_bits):
    from cp_engine.blend.leads import lead_digest
    from cp_engine.config import load_config

    sched = _make(vllm_bits, load_config({"CP_ENGINE_BLEND": "1", "CP_ENGINE_BLEND_RATIO": "0.2",
                                          "CP_ENGINE_BLEND_MODE": "first_tokens"}))
    s, a, b, c = _ids(32, 1), _ids(40, 2), _ids(40, 3), _ids(30, 4)
    sep = [11, 12]
    # an agent turn: system, a dynamic segment, then A, B, C in a fixed order
    first = s + _ids(8, 5) + a + sep + b + sep + c + _ids(6, 6)
    spans1 = [[40, 80], [82, 122], [124, 154]]
    meta = _run_step(vllm_bits, sched, "t1", first, spans1)
    leads = [save.lead for save in meta.saves]
    assert [(save.start, save.end) for save in meta.saves] == [tuple(x) for x in spans1]
    assert leads == [None, lead_digest(a + sep), lead_digest(b + sep)]
    _store(sched, first, spans1, leads=leads)
    # the next turn: a longer dynamic segment moves the whole suffix
    second = s + _ids(21, 7) + a + sep + b + sep + c + _ids(6, 8)
    spans2 = [[53, 93], [95, 135], [137, 167]]
    (load,) = _run_step(vllm_bits, sched, "t2", second, spans2).loads
    assert [blk.carried for blk in load.plan.blocks] == [False, True, True]
    uncovered = (53 - 32) + 2 + 2
    assert load.plan.recomputed == uncovered + 8  # ceil(0.2 x 40): A alone is in the ratio's base
    # the request can switch it off: the ratio then covers B and C too
    (load,) = _run_step(vllm_bits, sched, "t3", second, spans2, {"cp_blend_carry": False}).loads
    assert not any(blk.carried for blk in load.plan.blocks)
    assert load.plan.recomputed == uncovered + 22  # ceil(0.2 x 110)
