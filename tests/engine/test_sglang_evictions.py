"""Eviction capture on SGLang's real caches: RadixCache and UnifiedRadixCache (Python and
Rust tree cores), real CPU memory pools, real KV events → channel → context index."""
from __future__ import annotations

import time

import pytest

from sglang_support import build_cache, block_tokens, evict, insert, make_req, match_len, require_sglang, scheduler_ctx  # noqa: F401

require_sglang()

from cp_engine.hooks import channel, metrics, runtime  # noqa: E402
from cp_engine.hooks.sglang import eviction, hints, patch  # noqa: E402
from cp_engine.request_hints import build_xargs  # noqa: E402

pytestmark = pytest.mark.sglang
KINDS = ["radix", "unified-python", "unified-rust"]


@pytest.fixture
def plugged(monkeypatch, scheduler_ctx):
    """Adapter installed, a fresh pipeline, and its receiver in this process."""
    monkeypatch.delenv(runtime.INSTANCE_ENV, raising=False)
    monkeypatch.delenv("CP_ENGINE_FAULT", raising=False)
    channel.stop_all()
    runtime.reset_for_tests()
    eviction.reset_for_tests()
    metrics.reset()
    assert patch.patch()
    channel.start_receiver(runtime.pipeline())
    yield runtime.pipeline()
    channel.stop_all()
    patch.unpatch()
    runtime.reset_for_tests()


def _wait(pred, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def _policy(cache):
    from sglang.srt.managers.schedule_policy import SchedulePolicy

    return SchedulePolicy("fcfs", cache, False, False, False)


def _marked(pipe, blocks, rid, namespace="ns"):
    prep = pipe.prepare(blocks, namespace=namespace)
    pipe.commit(rid, prep)
    tokens = block_tokens(prep, lambda b: 10 + b % 60) + [4] * 8  # question after the blocks
    return prep, tokens, make_req(rid, tokens, custom_params=build_xargs(prep, rid))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("page_size", [1, 4])
def test_event_hashes_match_the_recorder(kind, page_size, scheduler_ctx):
    """Drift guard: our page hashes are exactly the BlockStored hashes SGLang publishes."""
    cache, alloc = build_cache(kind, page_size=page_size, events=True)
    tokens = [7 + (i * 13) % 50 for i in range(64)]
    insert(cache, alloc, tokens)
    stored = [h for ev in cache.take_events() if type(ev).__name__ == "BlockStored" for h in ev.block_hashes]
    assert stored == eviction.event_hashes(tokens, page_size)


def test_default_unified_core_is_rust_in_this_install(scheduler_ctx):
    cache, _ = build_cache("unified-rust")
    assert cache._tree_core_backend == "rust"  # the no-deps CPU wheel ships the Rust core


@pytest.mark.parametrize("kind", KINDS)
def test_recorder_switched_on_without_user_config(kind, plugged):
    cache, alloc = build_cache(kind, events=False)
    insert(cache, alloc, list(range(10, 30)))
    assert any(type(e).__name__ == "BlockStored" for e in cache.take_events())


@pytest.mark.parametrize("kind", KINDS)
def test_recorder_stays_off_when_unpatched(kind, scheduler_ctx):
    patch.unpatch()
    cache, alloc = build_cache(kind, events=False)
    insert(cache, alloc, list(range(10, 30)))
    assert cache.take_events() == []


@pytest.mark.parametrize("kind", KINDS)
def test_partial_eviction_reaches_the_index(kind, plugged):
    """Two requests share blocks b1,b2; the LRU leaf (A's b3) is evicted: the index drops
    exactly A's b3 and keeps B's full path."""
    pipe = plugged
    cache, alloc = build_cache(kind, events=False)
    b1, b2, b3, b4 = ("alpha " * 30, "beta " * 30, "gamma " * 30, "delta " * 30)
    prep_a, tok_a, req_a = _marked(pipe, [b1, b2, b3], "A")
    # B reuses A's order for the shared blocks (the index puts them first).
    prep_b, tok_b, req_b = _marked(pipe, [b1, b2, b4], "B")
    assert prep_b.block_ids[:2] == prep_a.block_ids[:2]
    _policy(cache).calc_priority([req_a, req_b])  # patched: tracks both requests
    insert(cache, alloc, tok_a)
    assert match_len(cache, tok_a) == len(tok_a)
    insert(cache, alloc, tok_b)  # B is now the most recently used leaf
    ns = prep_a.namespace
    path_a, path_b = prep_a.index_path(), prep_b.index_path()
    assert pipe.index.match_length(path_a, ns) == 3 and pipe.index.match_length(path_b, ns) == 3
    evicted = evict(cache, 1)  # LRU: A's leaf (its b3 tokens and question)
    assert evicted > 0 and match_len(cache, tok_b) == len(tok_b)
    cache.take_events()  # what SGLang's publisher does each step
    assert _wait(lambda: pipe.index.match_length(path_a, ns) == 2)
    assert pipe.index.match_length(path_b, ns) == 3
    assert metrics.value("evictions_applied") >= 1


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("page_size", [1, 4])
def test_full_eviction_and_reset(kind, page_size, plugged):
    pipe = plugged
    cache, alloc = build_cache(kind, page_size=page_size, events=False)
    prep, tokens, req = _marked(pipe, ["one " * 40, "two " * 40], "R")
    _policy(cache).calc_priority([req])
    insert(cache, alloc, tokens)
    ns, path = prep.namespace, prep.index_path()
    assert pipe.index.match_length(path, ns) == 2
    evict(cache, len(tokens))
    cache.take_events()
    assert _wait(lambda: pipe.index.match_length(path, ns) == 0)
    # A cache reset reaches the index as a reset.
    prep2, tokens2, req2 = _marked(pipe, ["three " * 40], "S")
    assert pipe.index.match_length(prep2.index_path(), prep2.namespace) == 1
    cache.reset()
    cache.take_events()
    assert _wait(lambda: pipe.index.match_length(prep2.index_path(), prep2.namespace) == 0)


@pytest.mark.parametrize("kind", KINDS)
def test_new_cache_of_same_page_size_does_not_reset_the_index(kind, plugged):
    """Every cache records a clear at construction. A second cache in the process, built
    while the first holds stored blocks, is empty: its clear sends nothing (checked at the
    send, no receiver timing involved) and leaves the first one dirty, so a real clear of
    the first still resets the index."""
    pipe = plugged
    first, alloc = build_cache(kind, events=False)
    first.take_events()  # its own construction clear: nothing stored yet
    prep, tokens, req = _marked(pipe, ["north " * 40, "south " * 40], "N")
    _policy(first).calc_priority([req])
    insert(first, alloc, tokens)
    first.take_events()  # BlockStored: the first cache is dirty
    path, ns = prep.index_path(), prep.namespace
    sent = metrics.value("channel_sent")
    second, _ = build_cache(kind, events=False)
    second.take_events()
    assert metrics.value("channel_sent") == sent  # no reset for an empty cache's clear
    assert pipe.index.match_length(path, ns) == 2
    first.reset()
    first.take_events()
    assert metrics.value("channel_sent") == sent + 1  # the first cache's clear is a real one
    assert _wait(lambda: pipe.index.match_length(path, ns) == 0)
    assert metrics.value("cache_resets_applied") == 1


@pytest.mark.parametrize("kind", KINDS)
def test_user_publisher_sees_unchanged_events(kind, plugged):
    """With --kv-events-config set by the user, take_events hands SGLang the same events."""
    cache, alloc = build_cache(kind, events=True)
    insert(cache, alloc, list(range(10, 40)))
    evict(cache, 30)
    names = [type(e).__name__ for e in cache.take_events()]
    assert "BlockStored" in names and "BlockRemoved" in names


@pytest.mark.parametrize("kind", KINDS)
def test_real_publisher_drains_when_user_events_off(kind, plugged):
    from sglang.srt.managers.scheduler_components.kv_events_publisher import SchedulerKvEventsPublisher

    pipe = plugged
    cache, alloc = build_cache(kind, events=False)
    pub = SchedulerKvEventsPublisher(kv_events_config=None, tree_cache=cache, send_metrics_from_scheduler=None,
                                     max_running_requests=8, max_total_num_tokens=4096, get_stats=lambda: None)
    assert not pub.enable_kv_cache_events
    prep, tokens, req = _marked(pipe, ["red " * 40, "green " * 40], "P")
    _policy(cache).calc_priority([req])
    insert(cache, alloc, tokens)
    evict(cache, len(tokens))
    pub.publish_kv_events()  # the scheduler calls this after every batch
    assert cache.take_events() == []  # drained
    assert _wait(lambda: pipe.index.match_length(prep.index_path(), prep.namespace) == 0)


def test_salted_requests_are_not_tracked(plugged):
    cache, _ = build_cache("radix")
    prep, tokens, req = _marked(plugged, ["x " * 40], "Q")
    req.cache_salt = "tenant-a"
    assert eviction.track_req(req, 1) == 0
    assert metrics.value("evictions_untracked", engine="sglang") == 1



@pytest.mark.parametrize("hook", ["sglang_evictions", "sglang_cache_init"])
def test_fault_injection_leaves_sglang_behaviour(hook, plugged, monkeypatch):
    monkeypatch.setenv("CP_ENGINE_FAULT", hook)
    cache, alloc = build_cache("unified-rust", events=True)
    insert(cache, alloc, list(range(10, 40)))
    assert evict(cache, 30) == 30
    names = [type(e).__name__ for e in cache.take_events()]
    assert names.count("BlockRemoved") == 1  # SGLang's own events, untouched
    assert metrics.value("hook_failures", hook=hook) >= 1
