"""EngineCore side on vLLM's real Scheduler / KVCacheManager / BlockPool (CPU, no model run):
the patched waiting queue decides admission order, real prefix-cache evictions reach
the context index through the channel, and every patched symbol is still where we
patch it (drift guard)."""
from __future__ import annotations

import inspect
import itertools
import shutil
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

import vllm_core as vc  # noqa: E402
from vllm.v1.core import block_pool as bp  # noqa: E402
from vllm.v1.core.sched import request_queue as rq  # noqa: E402
from vllm.v1.core.sched import scheduler as sched_mod  # noqa: E402

from cp_engine.hooks import channel, metrics, runtime  # noqa: E402
from cp_engine.hooks.installer import Installer  # noqa: E402
from cp_engine.hooks.vllm import eviction as vev  # noqa: E402
from cp_engine.hooks.vllm import patch as vpatch  # noqa: E402
from cp_engine.hooks.vllm import queue as vq  # noqa: E402
from cp_engine import request_hints  # noqa: E402
from cp_engine.hooks.vllm.table import TABLE  # noqa: E402
from cp_engine.hooks.wrapping import is_wrapped  # noqa: E402
from cp_engine.pipeline import ContextPipeline  # noqa: E402

QUEUE_ROWS = ("queue_factory", "queue_factory_in_scheduler")
EVICTION_ROWS = ("block_evicted", "prefix_cache_reset", "eviction_batch")
vpatch.unpatch()  # this process's .pth may have patched at import: start from vLLM as shipped


def rows_installer(names, wanted=None) -> Installer:
    """An installer of the vLLM table applying only ``names`` (EngineCore rows)."""
    inst = Installer(TABLE, wanted or (lambda row: row.name in names))
    assert inst.patch(vpatch.vllm_version())  # the trigger module is imported: applied now
    return inst


def queue_installed() -> bool:
    return is_wrapped(rq, "create_request_queue")


@pytest.fixture
def patched():
    queue, eviction = rows_installer(QUEUE_ROWS), rows_installer(EVICTION_ROWS)
    yield queue
    eviction.unpatch()
    queue.unpatch()


@pytest.fixture
def runtime_dir(monkeypatch):
    # A sender or receiver left by an earlier test of this process may belong to another
    # instance id or socket directory: start from none, as a fresh engine process does.
    channel.stop_all()
    base = tempfile.mkdtemp(prefix="cpv", dir="/tmp")
    monkeypatch.setenv("XDG_RUNTIME_DIR", base)
    yield base
    channel.stop_all()
    shutil.rmtree(base, ignore_errors=True)


def tokens(group: int, n_blocks: int, tail: int) -> list[int]:
    """A prompt of ``n_blocks`` full blocks shared by ``group`` plus a private tail."""
    return [10 + group] * (n_blocks * vc.BLOCK) + [200 + tail] * 4


# ---------------------------------------------------------------------------- queue
def test_factory_gives_our_queue_for_fcfs_only(patched):
    s = vc.make_scheduler(64)
    assert isinstance(s.waiting, vq.CacheAwareRequestQueue)
    p = vc.make_scheduler(64, policy="priority")
    assert isinstance(p.waiting, rq.PriorityRequestQueue)  # vLLM's order, observed for tracking
    hinted = vc.make_request("pri", tokens(0, 2, 0), {request_hints.NAMESPACE: "n", request_hints.PATH: ["00" * 8],
                                                      request_hints.ENDS: [2 * vc.BLOCK]})
    size = len(vev.state().mapper)
    p.add_request(hinted)
    assert len(vev.state().mapper) == size + 2  # both prompt blocks lie inside the context block


def test_uninstall_restores_vllm_queue_and_block_pool(monkeypatch):
    original_factory = rq.create_request_queue
    original_evict = bp.BlockPool.__dict__["_maybe_evict_cached_block"]
    for _ in range(2):  # double install, double remove
        queue, eviction = rows_installer(QUEUE_ROWS), rows_installer(EVICTION_ROWS)
        assert queue.patch(vpatch.vllm_version()) and eviction.patch(vpatch.vllm_version())
        assert queue_installed() and is_wrapped(sched_mod, "create_request_queue")
        assert sched_mod.create_request_queue is not original_factory and rq.create_request_queue is not original_factory
        assert is_wrapped(bp.BlockPool, "_maybe_evict_cached_block")
        eviction.unpatch()
        eviction.unpatch()
        queue.unpatch()
        queue.unpatch()
    assert rq.create_request_queue is original_factory and sched_mod.create_request_queue is original_factory
    assert bp.BlockPool.__dict__["_maybe_evict_cached_block"] is original_evict
    assert type(vc.make_scheduler(64).waiting) is rq.FCFSRequestQueue
    # Eviction sync alone brings the queue (requests are tracked there) and takes it away.
    monkeypatch.setenv("CP_ENGINE_SCHEDULE", "0")
    runtime.reset_for_tests()
    try:
        engine_rows = QUEUE_ROWS + EVICTION_ROWS  # the flags decide among EngineCore's rows
        alone = rows_installer(None, wanted=lambda row: row.name in engine_rows and vpatch._wanted(row))
        assert queue_installed() and is_wrapped(bp.BlockPool, "_maybe_evict_cached_block")
        assert type(vc.make_scheduler(64).waiting) is vq.CacheAwareRequestQueue
        alone.unpatch()
    finally:
        monkeypatch.delenv("CP_ENGINE_SCHEDULE")
        runtime.reset_for_tests()
    assert not queue_installed() and rq.create_request_queue is original_factory


def _admission(s, reqs) -> list[str]:
    for r in reqs:
        s.add_request(r)
    out = s.schedule()
    return [r.req_id for r in out.scheduled_new_reqs], out


def test_admission_groups_shared_prefixes_and_hits_the_cache(patched):
    # Interleaved arrivals of two 4-block prefixes; vLLM's FCFS keeps them interleaved.
    order = [0, 1, 0, 1, 0, 1]
    reqs = [vc.make_request(f"r{i}", tokens(g, 4, i)) for i, g in enumerate(order)]
    ids, _ = _admission(vc.make_scheduler(64), reqs)
    assert ids == ["r0", "r2", "r4", "r1", "r3", "r5"]  # depth-first by prefix
    patched.unpatch()
    reqs = [vc.make_request(f"r{i}", tokens(g, 4, i)) for i, g in enumerate(order)]
    ids, _ = _admission(vc.make_scheduler(64), reqs)
    assert ids == ["r0", "r1", "r2", "r3", "r4", "r5"]


def test_grouping_saves_prefill_when_the_cache_is_small(patched):
    # 6 usable blocks; each prompt needs 5, so two prefixes never fit together.
    # Admitted one at a time (max_num_seqs=1): grouped order computes each prefix
    # once, interleaved order evicts most of it before its next use.
    def run(installed: bool) -> int:
        (patched.patch(vpatch.vllm_version()) if installed else patched.unpatch())
        s = vc.make_scheduler(7, max_num_seqs=1)
        for i, g in enumerate([0, 1, 0, 1, 0, 1]):
            s.add_request(vc.make_request(f"q{i}", tokens(g, 4, i)))
        computed = 0
        for _ in range(6):
            out = s.schedule()
            (rid,) = [r.req_id for r in out.scheduled_new_reqs]
            computed += out.num_scheduled_tokens[rid]
            vc.abort(s, [rid])
        return computed

    plain, grouped = run(False), run(True)
    tail = 4
    assert grouped == 2 * (4 * vc.BLOCK + tail) + 4 * tail  # each prefix computed once
    assert plain > grouped + 2 * vc.BLOCK


def test_preempted_and_skipped_requests_keep_fcfs_prepend_semantics():
    # 0.27–0.30 build the skipped queue with the factory and prepend_request, then
    # prepend_requests(queue); 0.31+ pass a deque built with appendleft.
    a, b, c, d = object(), object(), object(), object()
    for build in ("queue", "deque"):
        waiting = vq.CacheAwareRequestQueue(max_wait_s=60.0, ordering=True)
        waiting.add_request(d)
        popped = [a, b, c]  # in the order the scheduler popped (and skipped) them
        if build == "queue":
            skipped = vq.CacheAwareRequestQueue(max_wait_s=60.0, ordering=True)
            for r in popped:
                skipped.prepend_request(r)
        else:
            from collections import deque

            skipped = deque()
            for r in popped:
                skipped.appendleft(r)
        waiting.prepend_requests(skipped)
        assert list(waiting) == [a, b, c, d]
        assert [waiting.pop_request() for _ in range(4)] == [a, b, c, d]


ops = st.lists(st.tuples(st.sampled_from(
    ["add", "pop", "peek", "prepend", "prepend_many", "remove", "remove_many", "iter"]),
    st.integers(0, 50)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_without_ordering_the_queue_is_exactly_vllm_fcfs(seq):
    ours = vq.CacheAwareRequestQueue(max_wait_s=0.0, ordering=False)
    ref = rq.FCFSRequestQueue()
    outside: list = []  # popped requests (candidates for prepend)
    fresh = itertools.count()
    for op, n in seq:
        if op == "add":
            r = ("req", next(fresh))
            ours.add_request(r)
            ref.add_request(r)
        elif op == "pop" and ref:
            r = ref.pop_request()
            assert ours.pop_request() is r
            outside.append(r)
        elif op == "peek" and ref:
            assert ours.peek_request() is ref.peek_request()
        elif op == "prepend" and outside:
            r = outside.pop(n % len(outside))
            ours.prepend_request(r)
            ref.prepend_request(r)
        elif op == "prepend_many" and outside:
            k = 1 + n % len(outside)
            batch, outside[:] = outside[:k], outside[k:]
            ours.prepend_requests(list(batch))
            ref.prepend_requests(list(batch))
        elif op == "remove" and ref:
            r = list(ref)[n % len(ref)]
            ours.remove_request(r)
            ref.remove_request(r)
        elif op == "remove_many" and ref:
            batch = list(ref)[:: 1 + n % 3]
            ours.remove_requests(batch)
            ref.remove_requests(batch)
        elif op == "iter":
            assert list(ours) == list(ref)
        assert len(ours) == len(ref) and bool(ours) == bool(ref)
    assert list(ours) == list(ref)
    with pytest.raises((IndexError, ValueError)):
        ours.remove_request(("never", -1))


def test_queue_fault_falls_back_to_fcfs(patched, monkeypatch):
    monkeypatch.setenv("CP_ENGINE_FAULT", "vllm_queue")
    before = metrics.value("hook_failures", hook="vllm_queue_key")
    order = [0, 1, 0, 1]
    reqs = [vc.make_request(f"f{i}", tokens(g, 4, i)) for i, g in enumerate(order)]
    ids, _ = _admission(vc.make_scheduler(64), reqs)
    assert ids == ["f0", "f1", "f2", "f3"]
    assert metrics.value("hook_failures", hook="vllm_queue_key") - before == 4


# ---------------------------------------------------------------------------- evictions
def _hinted(pipe, rid, texts, n_prompt_tokens_per_block):
    """Prepare + commit like the API server, and the xargs it would attach."""
    prep = pipe.prepare(texts, namespace="ns")
    pipe.commit(rid, prep)
    hints = request_hints.build_xargs(prep, rid)
    # The test prompt lays each context block over exactly this many tokens.
    hints[request_hints.ENDS] = [n_prompt_tokens_per_block * (i + 1) for i in range(len(texts))]
    return prep, hints


def _recording_receiver(pipe):
    """A started receiver applying to ``pipe``, and the list of what it applied."""
    recv = channel.Receiver(runtime.instance_id(), channel.apply_to_pipeline(pipe)).start()
    got: list = []
    recv.apply = lambda m, inner=recv.apply: (got.append(m), inner(m))
    return recv, got


def test_real_evictions_reach_the_index_shallowest_broken_block_first(patched, runtime_dir):
    pipe = ContextPipeline()
    recv, got = _recording_receiver(pipe)
    try:
        texts = [f"document {i} " * 40 for i in range(3)]
        prep, hints = _hinted(pipe, "a", texts, 2 * vc.BLOCK)  # 2 KV blocks per context block
        path = prep.index_path()
        assert pipe.index.match_length(path, namespace="ns") == 3
        s = vc.make_scheduler(12)  # 11 usable blocks
        a = vc.make_request("a", [7] * (6 * vc.BLOCK) + [8] * 4, hints)  # 6 full blocks + tail
        s.add_request(a)
        s.schedule()
        vc.abort(s, ["a"])  # blocks stay cached, tail-first in the free queue
        # Free queue now: a's uncached tail block, 4 never-used blocks, then a's cached
        # blocks 5..0. An unrelated 7-block request evicts blocks 5 and 4 (context block 2).
        s.add_request(vc.make_request("b", [9] * (7 * vc.BLOCK)))
        s.schedule()
        _wait(lambda: len(got) >= 1)
        assert got == [{"op": "evict_path", "ns": "ns", "path": path[:3]}]
        assert pipe.index.match_length(path, namespace="ns") == 2
        vc.abort(s, ["b"])
        # The next unrelated request reaches a's blocks 3..0: context blocks 1, then 0.
        s.add_request(vc.make_request("c", [5] * (11 * vc.BLOCK)))
        s.schedule()
        # Both leave in one message: the step's evictions travel together, in order.
        _wait(lambda: len(got) >= 2)
        assert got[1:] == [{"op": "evict_paths", "items": [("ns", path[:2]), ("ns", path[:1])]}]
        assert pipe.index.match_length(path, namespace="ns") == 0
        vc.abort(s, ["c"])
        # A fresh commit, then vLLM's reset: the index is emptied too.
        pipe.commit("again", prep)
        assert s.reset_prefix_cache()
        _wait(lambda: len(got) >= 3)
        assert got[2] == {"op": "reset"} and pipe.index.match_length(path, namespace="ns") == 0
    finally:
        recv.stop()


def test_evictions_outside_a_step_leave_at_once_and_a_failing_step_still_sends(patched, runtime_dir):
    """Held evictions belong to a running ``schedule()``: a pool eviction outside one is
    sent right away, and a step that raises still sends what it evicted."""
    pipe = ContextPipeline()
    recv, got = _recording_receiver(pipe)
    try:
        texts = [f"note {i} " * 40 for i in range(2)]
        prep, hints = _hinted(pipe, "a", texts, 2 * vc.BLOCK)
        path = prep.index_path()
        s = vc.make_scheduler(8)  # 7 usable blocks
        s.add_request(vc.make_request("a", [7] * (4 * vc.BLOCK) + [8] * 4, hints))
        s.schedule()
        vc.abort(s, ["a"])
        pool = s.kv_cache_manager.block_pool
        # Outside a step: vLLM's own evict_blocks (used by KV connectors) on a's last block.
        last = [b.block_id for b in pool.blocks if b.block_hash is not None][-1:]
        pool.evict_blocks(set(last))
        _wait(lambda: len(got) >= 1)
        assert got == [{"op": "evict_path", "ns": "ns", "path": path[:2]}]
        # A step that raises after evicting: what it evicted still reaches the index.
        original = pool.get_new_blocks

        def evict_then_fail(n, *args, **kwargs):
            original(n, *args, **kwargs)
            raise RuntimeError("allocation failed after evicting")

        pool.get_new_blocks = evict_then_fail
        s.add_request(vc.make_request("b", [9] * (7 * vc.BLOCK)))
        with pytest.raises(RuntimeError):
            s.schedule()
        _wait(lambda: len(got) >= 2)
        assert got[1] == {"op": "evict_path", "ns": "ns", "path": path[:1]}
        assert pipe.index.match_length(path, namespace="ns") == 0
    finally:
        recv.stop()


def test_eviction_fault_fails_open(patched, runtime_dir, monkeypatch):
    pipe = ContextPipeline()
    recv = channel.Receiver(runtime.instance_id(), channel.apply_to_pipeline(pipe)).start()
    try:
        prep, hints = _hinted(pipe, "x", ["only block " * 30], 4 * vc.BLOCK)
        s = vc.make_scheduler(8)
        s.add_request(vc.make_request("x", [3] * (4 * vc.BLOCK), hints))
        monkeypatch.setenv("CP_ENGINE_FAULT", "vllm_eviction")
        before = metrics.value("hook_failures", hook="vllm_eviction")
        s.schedule()
        vc.abort(s, ["x"])
        s.add_request(vc.make_request("y", [4] * (7 * vc.BLOCK)))
        out = s.schedule()
        assert out.num_scheduled_tokens == {"y": 7 * vc.BLOCK}  # the engine is unaffected
        assert metrics.value("hook_failures", hook="vllm_eviction") > before
        assert pipe.index.match_length(prep.index_path(), namespace="ns") == 1  # nothing applied
    finally:
        recv.stop()


def _wait(cond, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)


# ---------------------------------------------------------------------------- drift guard
def test_drift_request_queue_interface():
    abstract = set(rq.RequestQueue.__abstractmethods__)
    assert abstract == {"add_request", "pop_request", "peek_request", "prepend_request", "prepend_requests",
                        "remove_request", "remove_requests", "__bool__", "__len__", "__iter__"}, abstract
    assert not vq.CacheAwareRequestQueue.__abstractmethods__
    assert list(inspect.signature(rq.create_request_queue).parameters) == ["policy"]
    assert {p.value for p in rq.SchedulingPolicy} >= {"fcfs", "priority"}
    src = inspect.getsource(sched_mod.Scheduler.__init__)
    assert "create_request_queue(self.policy)" in src  # by-name import in scheduler.py
    assert "create_request_queue" in vars(sched_mod)


def test_drift_block_pool_eviction_path():
    cls = bp.BlockPool
    assert list(inspect.signature(cls._maybe_evict_cached_block).parameters) == ["self", "block"]
    assert list(inspect.signature(cls.reset_prefix_cache).parameters) == ["self"]
    assert "self._maybe_evict_cached_block(" in inspect.getsource(cls.get_new_blocks)
    assert "self._maybe_evict_cached_block(" in inspect.getsource(cls.evict_blocks)
    assert hasattr(bp.BlockHashToBlockMap, "get_one_block")
    pool = cls(num_gpu_blocks=4, enable_caching=True, hash_block_size=16)
    assert isinstance(pool.cached_block_hash_to_block, bp.BlockHashToBlockMap)
    assert pool.hash_block_size == 16 and pool.num_gpu_blocks == 4
    assert pool.blocks[1].block_hash is None and hasattr(pool.blocks[1], "block_id")
    from vllm.v1.core.kv_cache_utils import get_block_hash, make_block_hash_with_group_id

    assert get_block_hash(make_block_hash_with_group_id(b"x" * 32, 3)) == b"x" * 32


def test_drift_request_fields():
    r = vc.make_request("d", [1] * (2 * vc.BLOCK + 3), {request_hints.PATH: ["00" * 8]})
    assert len(r.block_hashes) == 2 and all(isinstance(h, bytes) for h in r.block_hashes)
    assert r.sampling_params.extra_args == {request_hints.PATH: ["00" * 8]}
    assert isinstance(r.arrival_time, float) and r.request_id == "d"


def test_queue_never_raises_into_the_scheduler_on_odd_input():
    q = vq.CacheAwareRequestQueue(max_wait_s=60.0, ordering=True)
    r = vc.make_request("dup", tokens(0, 2, 0))
    before = metrics.value("hook_failures", hook="vllm_queue_duplicate")
    q.add_request(r)
    q.add_request(r)  # vLLM never does this; the queue keeps one copy instead of raising
    assert len(q) == 1 and metrics.value("hook_failures", hook="vllm_queue_duplicate") == before + 1
    odd = vc.make_request("odd", [1, 2, 3], {request_hints.PATH: "not-a-list"})  # malformed hints
    q.add_request(odd)
    # Unkeyed (no full block, hints ignored) ends at the root: served before subtrees.
    assert [q.pop_request(), q.pop_request()] == [odd, r] and not q
    with pytest.raises(IndexError):
        q.peek_request()
