"""vLLM's chat and completion rewrites reject malformed marks with the same message.

Real vLLM request models (what the OpenAI server parses, extras kept in
``model_extra``) and a real Starlette request for the headers; the rewrite functions
are called as the patched serving methods call them. A 400 is decided before anything
is staged, so no serving object is needed.
"""
from __future__ import annotations

import pytest

from vllm_server import vllm_available

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not vllm_available(), reason="vllm not installed")]

USER = [{"role": "user", "content": "Which city?"}]


def _raw(headers: dict[str, str] | None = None):
    from starlette.requests import Request

    hdrs = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": hdrs, "query_string": b""})


def _chat(extra: dict, headers: dict[str, str] | None = None, messages=USER):
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    from cp_engine.hooks.vllm import chat_rewrite

    request = ChatCompletionRequest.model_validate({"model": "m", "messages": messages, **extra})
    before = request.model_dump()
    answer = chat_rewrite.rewrite(request, _raw(headers))
    assert request.model_dump() == before  # a rejected request is left as it came
    return answer


def _completion(extra: dict, headers: dict[str, str] | None = None):
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    from cp_engine.hooks.vllm import completion_rewrite

    request = CompletionRequest.model_validate({"model": "m", "prompt": "Which city?", **extra})
    before = request.model_dump()
    answer = completion_rewrite.rewrite(request, _raw(headers))
    assert request.model_dump() == before
    return answer


BAD = [
    ({"context_blocks": ["doc"], "conversation_id": 42}, None, "conversation_id must be a string, got int"),
    ({"context_blocks": ["doc"], "conversation_id": True}, None, "conversation_id must be a string, got bool"),
    ({"context_blocks": ["doc"], "conversation_id": 2.5}, None, "conversation_id must be a string, got float"),
    ({"context_blocks": ["doc"], "conversation_id": ["c"]}, None, "conversation_id must be a string, got list"),
    ({"context_blocks": ["doc"], "conversation_id": {"c": 1}}, None, "conversation_id must be a string, got dict"),
    ({"context_blocks": ["doc"], "conversation_id": ""}, None, "conversation_id must be 1..256 characters"),
    ({"conversation_id": 42}, None, "conversation_id must be a string"),  # no blocks: still checked
    ({"context_blocks": ["doc"]}, {"X-CP-Conversation-Id": ""}, "X-CP-Conversation-Id"),
    ({"context_blocks": ["a", "b", "c", ""]}, None, "context_blocks[3] is empty"),
    ({"context_blocks": ["a", " \n "]}, None, "context_blocks[1] is empty (whitespace only)"),
    ({"context_blocks": [""] * 10}, None, "context_blocks[0] is empty"),
]


@pytest.mark.parametrize("extra, headers, needle", BAD)
@pytest.mark.parametrize("path", [_chat, _completion], ids=["chat", "completion"])
def test_malformed_marks_get_the_same_400_message_on_both_paths(path, extra, headers, needle):
    answer = path(extra, headers)
    assert isinstance(answer, str) and answer.startswith("cp_engine: ") and needle in answer, answer


def test_empty_marked_part_is_named_on_the_chat_path():
    parts = [{"role": "user", "content": [{"type": "text", "text": "", "cp_block": True},
                                          {"type": "text", "text": "Which city?"}]}]
    assert _chat({}, messages=parts) == "cp_engine: messages[0].content[0] (marked 'cp_block') is empty"


def test_an_empty_block_list_passes_through_untouched():
    assert _chat({"context_blocks": []}) is None
    assert _completion({"context_blocks": []}) is None
