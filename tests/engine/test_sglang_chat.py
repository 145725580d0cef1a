"""Context-block rewrite on SGLang's real ``OpenAIServingChat`` (real request model, real
chat-template rendering and conversion to ``GenerateReqInput``, real thread pool).

The tokenizer manager is a small recording collaborator: it holds SGLang's real
``ModelConfig`` and a real HF tokenizer, and captures the ``GenerateReqInput`` that the
serving class would send to the scheduler. No model runs here: by default it then
answers like an engine that accepted the request (one output token, SGLang's output
dict shape), with ``reject = True`` like one that refused it (ValueError → 400)."""
from __future__ import annotations

import asyncio
import json

import pytest

from sglang_support import build_tiny_model, require_sglang

require_sglang()

from cp_engine.hooks import channel, metrics, runtime  # noqa: E402
from cp_engine.hooks.sglang import patch  # noqa: E402

pytestmark = pytest.mark.sglang

SYSTEM = "You answer from the documents."
QUESTION = "Which city hosts the museum?"
BLOCKS = ["Doc about Paris and its museum. " * 3, "Doc about Rome and its forum. " * 3,
          "Doc about Oslo and its fjord. " * 3]


class _RequestLogger:
    log_requests = False
    log_requests_level = 0


class RecordingTokenizerManager:
    """The collaborator ``OpenAIServingChat`` reads; records what it would schedule."""

    def __init__(self, server_args, model_config, tokenizer):
        self.server_args = server_args
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.model_path = server_args.model_path
        self.served_model_name = "tiny"
        self.request_logger = _RequestLogger()
        self.captured: list = []
        self.reject = False

    def config_value(self, name):
        return getattr(self.server_args, name, None)

    async def generate_request(self, obj, request=None):
        self.captured.append(obj)
        if self.reject:
            raise ValueError("captured (the engine refused it)")
        n = len(obj.input_ids or [])
        yield {"text": "ok", "output_ids": [1], "prompt_token_ids": list(obj.input_ids or []),
               "meta_info": {"id": "x", "finish_reason": {"type": "stop", "matched": None},
                             "prompt_tokens": n, "completion_tokens": 1, "cached_tokens": 0,
                             "weight_version": "default"}}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.runtime_context import publish
    from sglang.srt.server_args import ServerArgs
    from transformers import AutoTokenizer

    model = build_tiny_model(str(tmp_path_factory.mktemp("chatmodel")))
    args = ServerArgs(model_path=model, device="cpu")
    publish(args, role="tokenizer")
    return args, ModelConfig.from_server_args(args), AutoTokenizer.from_pretrained(model)


@pytest.fixture
def chat(env, monkeypatch):
    from sglang.srt.entrypoints.openai.serving_chat import OpenAIServingChat
    from sglang.srt.parser.template_manager import TemplateManager

    monkeypatch.delenv("CP_ENGINE_FAULT", raising=False)
    monkeypatch.delenv(runtime.INSTANCE_ENV, raising=False)
    channel.stop_all()
    runtime.reset_for_tests()
    metrics.reset()
    assert patch.patch()
    serving = OpenAIServingChat(RecordingTokenizerManager(*env), TemplateManager())
    yield serving
    patch.unpatch()
    channel.stop_all()
    runtime.reset_for_tests()


def _raw(body: dict, headers: dict | None = None):
    from starlette.requests import Request

    data = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json")] + [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": hdrs,
             "query_string": b"", "http_version": "1.1", "scheme": "http", "server": ("t", 80)}
    sent = []

    async def receive():
        if sent:
            return {"type": "http.disconnect"}
        sent.append(1)
        return {"type": "http.request", "body": data, "more_body": False}

    return Request(scope, receive)


async def _post_async(serving, body, headers=None):
    from sglang.srt.entrypoints.openai.protocol import ChatCompletionRequest

    request = ChatCompletionRequest.model_validate(body)  # what FastAPI does: extras dropped
    raw = _raw(body, headers)
    return await serving.handle_request(request, raw)


def post(serving, body, headers=None):
    """Returns (status, error message, captured GenerateReqInput or None)."""
    before = len(serving.tokenizer_manager.captured)
    resp = asyncio.run(_post_async(serving, body, headers))
    captured = serving.tokenizer_manager.captured[before:]
    if not hasattr(resp, "body"):  # SGLang returns the response model itself on success
        return 200, "", (captured[0] if captured else None)
    payload = json.loads(resp.body)
    return resp.status_code, payload.get("message", ""), (captured[0] if captured else None)


def prompt_of(serving, gen) -> str:
    return serving.tokenizer_manager.tokenizer.decode(gen.input_ids)


def body(**extra):
    b = {"model": "tiny", "max_tokens": 4,
         "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]}
    b.update(extra)
    return b


def test_unmarked_request_is_untouched(chat):
    status, _, gen = post(chat, body())
    patch.unpatch()
    status2, _, plain = post(chat, body())
    assert status == status2 == 200  # the recording collaborator's answer
    assert gen.input_ids == plain.input_ids
    assert gen.sampling_params.get("custom_params") is None
    assert metrics.value("requests_rewritten") == 0


def test_context_blocks_rendered_between_system_and_question(chat):
    status, _, gen = post(chat, body(context_blocks=BLOCKS, conversation_id="c1"))
    text = prompt_of(chat, gen)
    assert text.index(SYSTEM) < min(text.index(b.strip()) for b in BLOCKS)
    assert max(text.index(b.strip()) for b in BLOCKS) < text.index(QUESTION)
    pipe = runtime.pipeline()
    hints = gen.sampling_params["custom_params"]
    assert len(hints["cp_path"]) == 3 and hints["cp_ns"] and hints["cp_rid"].startswith("cp-")
    assert pipe.index.requests == 1
    assert metrics.value("requests_rewritten") == 1


def test_rendering_matches_the_pipeline(chat):
    """The user turn is exactly ``prep.context_text`` then the question."""
    status, _, gen = post(chat, body(context_blocks=BLOCKS))
    expected, _ = runtime.pipeline().rewrite_messages(body()["messages"], BLOCKS)
    assert expected[-1]["content"] in prompt_of(chat, gen)


def test_content_parts_marking_renders_like_the_field(chat):
    parts = [{"type": "text", "text": b, "cp_block": True} for b in BLOCKS] + [{"type": "text", "text": QUESTION}]
    b = body()
    b["messages"][-1]["content"] = parts
    _, _, by_parts = post(chat, b)
    _, _, by_field = post(chat, body(context_blocks=BLOCKS))
    assert by_parts.input_ids == by_field.input_ids


def test_marks_in_chat_template_kwargs_render_like_the_field_and_leave_the_template(chat):
    # What SGLang's router forwards (it drops context_blocks, keeps chat_template_kwargs).
    _, _, by_field = post(chat, body(context_blocks=BLOCKS))
    _, _, by_kwargs = post(chat, body(chat_template_kwargs={"cp_context_blocks": BLOCKS, "flag": 1}))
    assert by_kwargs.input_ids == by_field.input_ids
    status, message, gen = post(chat, body(chat_template_kwargs={"cp_context_blocks": ["ok", ""]}))
    assert status == 400 and "chat_template_kwargs.cp_context_blocks[1] is empty" in message and gen is None


def test_conversation_dedup_second_turn_is_shorter(chat):
    _, _, first = post(chat, body(context_blocks=BLOCKS, conversation_id="conv-9"))
    second_msgs = body()["messages"] + [{"role": "assistant", "content": "Paris."},
                                        {"role": "user", "content": "And the fjord?"}]
    _, _, second = post(chat, {**body(), "messages": second_msgs, "context_blocks": BLOCKS,
                               "conversation_id": "conv-9"})
    text = prompt_of(chat, second)
    assert text.count(BLOCKS[2].strip()) == 1  # sent once, referenced on the second turn
    assert metrics.value("dedup_tokens_saved") > 0


@pytest.mark.parametrize("bad, needle", [
    ({"context_blocks": "not a list"}, "context_blocks"),
    ({"context_blocks": ["ok", 7]}, "context_blocks[1]"),
    ({"context_blocks": ["ok"], "conversation_id": {"x": 1}}, "conversation_id"),
    ({"context_blocks": ["ok"], "conversation_id": 42}, "conversation_id must be a string"),
    ({"context_blocks": ["ok", "ok too", " "]}, "context_blocks[2] is empty"),
])
def test_bad_fields_get_a_clear_400(chat, bad, needle):
    status, message, gen = post(chat, body(**bad))
    assert status == 400 and needle in message and gen is None
    assert metrics.value("requests_rejected") == 1


def test_blocks_without_a_user_turn_get_400(chat):
    b = {"model": "tiny", "messages": [{"role": "system", "content": SYSTEM}], "context_blocks": BLOCKS}
    status, message, gen = post(chat, b)
    assert status == 400 and "user" in message and gen is None
    assert metrics.value("requests_rejected") == 1


def test_fault_in_rewrite_sends_blocks_plainly(chat, monkeypatch):
    monkeypatch.setenv("CP_ENGINE_FAULT", "sglang_rewrite")
    _, _, gen = post(chat, body(context_blocks=BLOCKS))
    text = prompt_of(chat, gen)
    assert "\n\n".join(BLOCKS) in text and text.index(BLOCKS[0]) < text.index(QUESTION)
    assert gen.sampling_params.get("custom_params") is None
    assert metrics.value("hook_failures", hook="sglang_rewrite") == 1


def test_fault_before_rewrite_leaves_sglang_behaviour(chat, monkeypatch):
    monkeypatch.setenv("CP_ENGINE_FAULT", "sglang_chat")
    _, _, gen = post(chat, body(context_blocks=BLOCKS))
    patch.unpatch()
    _, _, plain = post(chat, body(context_blocks=BLOCKS))  # SGLang alone drops the field
    assert gen.input_ids == plain.input_ids


def test_concurrent_requests_in_the_thread_pool(chat):
    async def many():
        bodies = [body(context_blocks=[f"Block {i} unique text. " * 4] + BLOCKS[:2], conversation_id=f"u{i}")
                  for i in range(24)]
        return await asyncio.gather(*(_post_async(chat, b) for b in bodies))

    asyncio.run(many())
    captured = chat.tokenizer_manager.captured
    assert len(captured) == 24
    assert all(gen.sampling_params["custom_params"]["cp_rid"] for gen in captured)
    texts = [prompt_of(chat, g) for g in captured]
    for i in range(24):
        assert sum(f"Block {i} unique" in t for t in texts) == 1
    assert runtime.pipeline().index.requests == 24


def test_chat_to_scheduler_to_cache_eviction_roundtrip(chat):
    """The whole chain on real classes: the chat rewrite's GenerateReqInput becomes a
    scheduler Req, the patched policy tracks it, the real cache stores and evicts its
    tokens, and the eviction reaches this process's index over the channel."""
    import os
    import time

    from sglang.srt.managers.schedule_policy import SchedulePolicy

    from sglang_support import build_cache, evict, insert, make_req

    channel.start_receiver(runtime.pipeline())
    # Blocks of this test alone: an eviction another test sent for the shared BLOCKS can
    # still be queued for this instance's socket and would remove the same path.
    blocks = [f"{b} (roundtrip {os.getpid()}-{time.monotonic_ns()})" for b in BLOCKS]
    _, _, gen = post(chat, body(context_blocks=blocks))
    hints = gen.sampling_params["custom_params"]
    req = make_req("r1", gen.input_ids, custom_params=hints)
    cache, alloc = build_cache("unified-rust")
    cache.take_events()  # the scheduler drains once per idle loop before any request
    SchedulePolicy("fcfs", cache, False, False, False).calc_priority([req])
    insert(cache, alloc, gen.input_ids)
    pipe = runtime.pipeline()
    path = [int(h, 16) for h in hints["cp_path"]]
    assert pipe.index.match_length(path, hints["cp_ns"]) == 3
    evict(cache, len(gen.input_ids))
    cache.take_events()
    end = time.monotonic() + 5
    while pipe.index.match_length(path, hints["cp_ns"]) and time.monotonic() < end:
        time.sleep(0.02)
    assert pipe.index.match_length(path, hints["cp_ns"]) == 0


def _second_turn(conv: str, blocks: list | None = None) -> dict:
    msgs = body()["messages"] + [{"role": "assistant", "content": "Paris."},
                                 {"role": "user", "content": "And the fjord?"}]
    return {**body(), "messages": msgs, "context_blocks": blocks or BLOCKS, "conversation_id": conv}


def test_engine_rejection_records_nothing(chat):
    """Commit after acceptance: a request SGLang refuses leaves no index path and no
    dedup history, so the conversation's next turn still sends every block in full."""
    chat.tokenizer_manager.reject = True
    status, _, gen = post(chat, body(context_blocks=BLOCKS, conversation_id="rej-1"))
    assert status == 400 and gen.sampling_params["custom_params"]["cp_path"]  # it was rewritten
    pipe = runtime.pipeline()
    assert pipe.index.requests == 0 and len(pipe.index) == 0
    assert metrics.value("requests_rewritten") == 0
    chat.tokenizer_manager.reject = False
    status, _, second = post(chat, _second_turn("rej-1"))
    text = prompt_of(chat, second)
    assert status == 200 and all(text.count(b.strip()) == 1 for b in BLOCKS)
    assert metrics.value("dedup_tokens_saved") == 0 and pipe.index.requests == 1


def test_conversation_ids_are_scoped_by_api_key(chat):
    """Another API key with the same conversation id reaches an empty conversation: the
    first tenant's rendered turn (its documents) is not replayed into its prompt."""
    secret = ["Tenant A private memo: the vault code is 7741. " * 3]
    post(chat, body(context_blocks=secret + BLOCKS[:1], conversation_id="shared"),
         headers={"Authorization": "Bearer key-a"})
    _, _, other = post(chat, _second_turn("shared", BLOCKS[1:]), headers={"Authorization": "Bearer key-b"})
    _, _, owner = post(chat, _second_turn("shared", BLOCKS[1:]), headers={"Authorization": "Bearer key-a"})
    assert "vault code" not in prompt_of(chat, other)
    assert "vault code" in prompt_of(chat, owner)  # same key: the turn is replayed as sent
    _, _, salted = post(chat, {**_second_turn("shared", BLOCKS[1:]), "user": "someone-else"},
                        headers={"Authorization": "Bearer key-a"})
    assert "vault code" not in prompt_of(chat, salted)  # the `user` field narrows the scope too
