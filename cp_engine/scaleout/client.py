"""What a client adds to a block-marked request so a router in front of several
plugin-on replicas can route it by its blocks (see docs/scale-out.md).

- ``routing_headers(blocks)``: the block-set key (``key.routing_key``) under the
  header names routers read as a sticky key (vllm-router's ``consistent_hash`` policy
  hashes ``X-Session-Id``; SGLang's router's ``manual`` policy reads
  ``X-SMG-Routing-Key``), plus ``X-CP-Route-Key`` for routers configured by header
  name. Requests retrieving mostly the same documents get the same key in any
  retrieval order, so they land on the same replica. A turn of a conversation passes
  its ``conversation_id`` and gets the conversation's key instead: every turn then
  reaches the replica that holds the conversation's history (its cached prefix and the
  plugin's record of the blocks already sent, which turn repeats into references).
- ``template_marks(blocks, conversation_id)``: the body fields that mark the blocks
  inside ``chat_template_kwargs``, for routers that rebuild each request from their own
  schema (SGLang's router drops ``context_blocks``, ``conversation_id`` and the
  ``cp_block`` flag of content parts, and keeps ``chat_template_kwargs`` whole).
- ``canonical_messages(messages, blocks)``: the blocks as ``cp_block`` content parts
  of the last user turn, in canonical order (``key.canonical_order`` of their ids),
  then that turn's own text. A prefix-matching router (``cache_aware``) reads the
  prompt text and now sees the blocks, in an order that does not depend on retrieval
  order; the plugin on the replica still reorders them against its own cache. Without
  the plugin the parts are plain text parts, so the request still works.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..blocks import block_id
from ..marking import KWARG_BLOCKS, KWARG_CONVERSATION, PART_FLAG, TEMPLATE_KWARGS_FIELD, check_conversation_id
from ..pipeline import InvalidBlocks, validate_blocks
from .key import ROUTING_HEADER, conversation_key, routing_key

SESSION_HEADER = "X-Session-Id"  # vllm-router's consistent_hash reads it as the hash key
SMG_HEADER = "X-SMG-Routing-Key"  # SGLang's router (model gateway): the manual policy's sticky key


def routing_headers(blocks: Sequence[str], lead: int = 1, conversation_id: str | None = None) -> dict[str, str]:
    """Headers carrying the block-set key, or the conversation's key when
    ``conversation_id`` is given; empty when there is neither. Raises ``InvalidBlocks``
    for malformed blocks or an id the plugin would refuse."""
    texts = validate_blocks(blocks)
    if conversation_id is not None:
        key = conversation_key(check_conversation_id(conversation_id))
    else:
        key = routing_key(texts, lead)
    return {SESSION_HEADER: key, SMG_HEADER: key, ROUTING_HEADER: key} if key else {}


def template_marks(blocks: Sequence[str], conversation_id: str | None = None,
                   template_kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``{"chat_template_kwargs": {...}}`` marking ``blocks`` (and the conversation), to
    merge into a chat request's body (``extra_body``) in place of ``context_blocks``.
    ``template_kwargs``: the request's own kwargs (``enable_thinking``, ...), kept
    beside the marks; a body has one ``chat_template_kwargs``, so pass them here rather
    than merging two dicts. Raises ``InvalidBlocks`` for malformed blocks or an id the
    plugin would refuse."""
    kwargs: dict[str, Any] = {**(template_kwargs or {}), KWARG_BLOCKS: validate_blocks(blocks)}
    if conversation_id is not None:
        kwargs[KWARG_CONVERSATION] = check_conversation_id(conversation_id)
    return {TEMPLATE_KWARGS_FIELD: kwargs}


def canonical_messages(messages: Sequence[dict], blocks: Sequence[str]) -> list[dict]:
    """``messages`` with ``blocks`` as canonical-order ``cp_block`` parts of the last
    user turn (before its text); the input is not mutated. Raises ``InvalidBlocks``
    for malformed blocks or when there is no user turn with text content."""
    texts = validate_blocks(blocks)
    out = [dict(m) for m in messages]
    last = max((i for i, m in enumerate(out) if m.get("role") == "user"), default=None)
    if last is None:
        raise InvalidBlocks("canonical_messages needs a user message to attach the blocks to")
    question = out[last].get("content")
    if isinstance(question, str):
        tail: list[Any] = [{"type": "text", "text": question}]
    elif isinstance(question, list):
        tail = list(question)
    else:
        raise InvalidBlocks("the last user message has no text content")
    first: dict[int, str] = {}
    for t in texts:
        first.setdefault(block_id(t), t)
    parts = [{"type": "text", "text": first[b], PART_FLAG: True} for b in sorted(first)]
    out[last]["content"] = parts + tail
    return out
