"""Fuzzing: the request-parsing / rewrite layer with hypothesis, and a
short run of the live request fuzzer (``cp_engine/devtools/reliability/fuzz_live.py``).

Oracle of the pure layer (``cp_engine.marking.find_marks`` → ``ContextPipeline``):
every payload is either rejected with ``InvalidBlocks`` (the HTTP 400 path, with a
message naming the field), or passes through (unmarked: ``None``), or is rewritten;
nothing else is raised, inputs are never mutated, a rewrite keeps every block's text
(in full or as a reference to a block this conversation already received) and the
question, and after any sequence of requests the index is consistent
(``hooks.debugview.index_status`` invariants) and within ``max_nodes``.
"""
from __future__ import annotations

import copy
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cp_engine.devtools.reliability.payloads import payload
from cp_engine.config import Config
from cp_engine.hooks.debugview import index_status
from cp_engine.marking import InvalidBlocks, find_marks
from cp_engine.pipeline import ContextPipeline

INVARIANTS = ("refs_negative", "unowned", "child_over_parent", "unreachable")
FIELD_NAMES = ("context_blocks", "conversation_id", "cp_block", "messages", "user message")

# -- strategies -------------------------------------------------------------------
texts = st.one_of(
    st.text(max_size=40),  # any unicode, lone surrogates included
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=400),
    st.sampled_from(["", " ", "\x00", "😀" * 50, "e\u0301" * 30, "\u202e", "a" * 5000]),
)
junk = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | texts,
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
                    max_leaves=12)
block_lists = st.one_of(
    st.lists(texts, max_size=12),
    st.lists(st.sampled_from(["dup a", "dup b", ""]), max_size=40),  # duplicates
    st.lists(st.one_of(texts, junk), max_size=8),  # wrong item types
    junk,  # wrong container type
)
part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": texts}, optional={"cp_block": st.one_of(st.just(True), junk)}),
    st.fixed_dictionaries({"type": st.sampled_from(["image_url", "input_audio", "text", "video"])},
                          optional={"text": junk, "cp_block": st.just(True), "image_url": junk}),
    junk,
)
content = st.one_of(texts, st.lists(part, max_size=8), junk)
message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "User", ""]),
                           "content": content}),
    st.dictionaries(texts, junk, max_size=3),
    junk,
)
messages = st.one_of(st.lists(message, max_size=6), junk)
conversation = st.one_of(st.none(), st.sampled_from(["c1", "c2"]), texts, junk)
extras = st.fixed_dictionaries({}, optional={"context_blocks": block_lists, "conversation_id": conversation,
                                              "cache_salt": st.one_of(st.none(), texts)})
headers = st.one_of(st.none(), st.fixed_dictionaries({}, optional={"x-cp-conversation-id": texts}))


def _pipe(max_nodes: int = 300, max_blocks: int = 64) -> ContextPipeline:
    return ContextPipeline(Config(index_max_nodes=max_nodes, max_blocks_per_request=max_blocks))


def _assert_consistent(pipe: ContextPipeline) -> None:
    status = index_status(pipe, paths=False)
    assert all(status[k] == 0 for k in INVARIANTS), status
    assert status["nodes"] <= pipe.index.max_nodes, status


_counter = iter(range(10**9))


def process(pipe: ContextPipeline, extra, msgs, hdrs) -> str:
    """One chat request through the pure layer; returns "400", "pass" or "rewritten"."""
    before = copy.deepcopy((extra, msgs, hdrs))
    try:
        marks = find_marks(extra, msgs, hdrs)
    except InvalidBlocks as exc:
        assert any(name in str(exc) for name in FIELD_NAMES), str(exc)
        return "400"
    finally:
        assert (extra, msgs, hdrs) == before  # never mutated (NaN: deepcopy keeps the object)
    if marks is None:
        return "pass"
    tenant = extra.get("cache_salt") if isinstance(extra, dict) and isinstance(extra.get("cache_salt"), str) else ""
    try:
        out, prep = pipe.rewrite_messages(marks.messages, marks.blocks, conversation_id=marks.conversation_id,
                                          tenant=tenant)
    except InvalidBlocks as exc:
        assert any(name in str(exc) for name in FIELD_NAMES), str(exc)
        return "400"
    assert sorted(prep.order) == list(range(len(marks.blocks)))
    last = max(i for i, m in enumerate(out) if m.get("role") == "user")
    rendered = out[last]["content"]
    text = rendered if isinstance(rendered, str) else "".join(
        p.get("text") for p in rendered if isinstance(p, dict) and isinstance(p.get("text"), str))
    for i, is_full in zip(prep.order, prep.full):
        if is_full and marks.blocks[i]:
            assert marks.blocks[i] in text or len(marks.blocks) > pipe.config.max_blocks_per_request
    pipe.commit(f"req-{next(_counter)}", prep, base_offset=0)
    return "rewritten"


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(st.tuples(extras, messages, headers), min_size=1, max_size=4))
def test_chat_payloads_are_400_pass_or_rewritten_and_index_stays_consistent(requests):
    pipe = _pipe()
    for extra, msgs, hdrs in requests:
        assert process(pipe, extra, msgs, hdrs) in ("400", "pass", "rewritten")
    _assert_consistent(pipe)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks=block_lists, prompt=st.one_of(texts, junk))
def test_completion_blocks_are_400_or_rendered(blocks, prompt):
    from cp_engine.pipeline import validate_blocks

    pipe = _pipe()
    try:
        valid = validate_blocks(blocks)
    except InvalidBlocks as exc:
        assert "context_blocks" in str(exc)
        return
    if not valid or not isinstance(prompt, str):
        return  # the completion hook passes these through unchanged
    prep = pipe.prepare(valid, namespace="completion")
    pipe.commit("c", prep)
    assert sorted(prep.order) == list(range(len(valid)))
    _assert_consistent(pipe)


def test_adversarial_generator_payloads_through_the_pure_layer():
    """The live fuzzer's own 3,000 payloads (incl. 10k-block requests) offline."""
    pipe = _pipe(max_nodes=2000, max_blocks=4096)
    rng = random.Random(7)
    outcomes: dict[str, int] = {}
    for _ in range(3000):
        p = payload(rng)
        if p.raw is not None or not isinstance(p.body, dict):
            continue
        body = p.body
        if p.endpoint == "chat":
            extra = {k: v for k, v in body.items() if k in ("context_blocks", "conversation_id", "cache_salt")}
            hdrs = {k.lower(): v for k, v in p.headers.items()}
            got = process(pipe, extra, body.get("messages"), hdrs)
        else:
            try:
                blocks = body.get("context_blocks")
                got = "pass"
                from cp_engine.pipeline import validate_blocks

                valid = validate_blocks(blocks) if blocks is not None else []
                if valid and isinstance(body.get("prompt"), str):
                    pipe.commit("c", pipe.prepare(valid, namespace="completion"))
                    got = "rewritten"
            except InvalidBlocks:
                got = "400"
        outcomes[got] = outcomes.get(got, 0) + 1
    _assert_consistent(pipe)
    # The mix really exercises all three paths.
    assert min(outcomes.get(k, 0) for k in ("400", "pass", "rewritten")) > 100, outcomes


# -- live -------------------------------------------------------------------------
@pytest.mark.vllm
def test_live_fuzzer_short_run(plugin_server):
    from cp_engine.devtools.reliability.fuzz_live import run

    summary = run(plugin_server.url, plugin_server.model, n=300, seed=1, workers=4, health_every=100)
    assert summary["verdicts"].get("crash", 0) == 0, summary["crashes"]
    assert summary["ok"], summary
    assert summary["verdicts"].get("ok", 0) > 50 and summary["verdicts"].get("error", 0) > 50, summary["verdicts"]
    assert summary["index"] is not None and summary["index_consistent"], summary["index"]


@pytest.mark.vllm
@pytest.mark.slow
def test_live_fuzzer_full_run(plugin_server):
    from cp_engine.devtools.reliability.fuzz_live import run

    summary = run(plugin_server.url, plugin_server.model, n=10000, seed=0, workers=4)
    assert summary["ok"], {k: summary[k] for k in ("verdicts", "crashes", "unhealthy_at", "index_consistent")}
