"""The plugin's rewrite applied to a raw JSON request body (the proxy's glue).

Same contract as the in-server adapters (``hooks/vllm/chat_rewrite.py``,
``completion_rewrite.py``), on a body instead of an engine's request object:
``stage(route, raw, headers, pipe)`` returns

- None: forward ``raw`` unchanged (not a rewritten route, not a JSON object, no marks,
  or a completion whose prompt is not one string);
- ``Invalid(message)``: answer 400 with it (malformed marks; the plugin's message);
- ``Staged(body, pending)``: forward ``body``. The marks (``context_blocks``,
  ``conversation_id``, ``cp_block`` parts) are gone from it, since the upstream does
  not know them; a chat's blocks are rendered by ``ContextPipeline.rewrite_messages``
  into the last user turn, a completion's before its prompt. ``pending`` (a
  ``hooks.acceptance.PendingCommit``) has indexed the rendered order; the relay
  accepts or rejects it from the upstream's answer. After an unexpected failure the
  blocks go out plainly in their given order (nothing lost) with no pending commit.

Dedup is scoped by tenant (``hooks.tenant``: Authorization header, ``cache_salt``,
``user``), as in the plugin.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Mapping

from cp_engine.hooks import faults, metrics
from cp_engine.hooks.acceptance import PendingCommit
from cp_engine.hooks.tenant import tenant_of_request
from cp_engine.marking import (BLOCKS_FIELD, CONVERSATION_FIELD, TEMPLATE_KWARGS_FIELD, InvalidBlocks, Marks,
                               fallback_messages, find_marks, prefix_tokens)
from cp_engine.pipeline import ContextPipeline

__all__ = ["CHAT", "COMPLETION", "HOOK", "Invalid", "Staged", "route_of", "stage"]

CHAT = "chat"
COMPLETION = "completion"
HOOK = "proxy_rewrite"


@dataclass(frozen=True)
class Invalid:
    message: str


@dataclass(frozen=True)
class Staged:
    body: bytes
    pending: PendingCommit | None


def route_of(method: str, path: str) -> str | None:
    """Which rewrite a request gets by method and path (None: none)."""
    if method != "POST":
        return None
    path = path.rstrip("/")
    if path.endswith("/chat/completions"):
        return CHAT
    if path.endswith("/completions"):
        return COMPLETION
    return None


def _json_object(raw: bytes) -> dict | None:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


def _encode(body: dict) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode("utf-8")


def _without_marks(body: dict, marks: Marks) -> dict:
    out = {k: v for k, v in body.items() if k not in (BLOCKS_FIELD, CONVERSATION_FIELD)}
    if marks.template_kwargs is not None:  # marks sent in chat_template_kwargs: the upstream never sees them
        if marks.template_kwargs:
            out[TEMPLATE_KWARGS_FIELD] = marks.template_kwargs
        else:
            out.pop(TEMPLATE_KWARGS_FIELD, None)
    return out


def _with_prompt(context_text: str, prompt: str) -> str:
    return f"{context_text}\n\n{prompt}" if prompt else context_text


def stage(route: str, raw: bytes, headers: Mapping[str, str] | None,
          pipe: ContextPipeline) -> Staged | Invalid | None:
    body = _json_object(raw)
    if body is None:
        return None  # the upstream answers what it cannot parse
    messages = body.get("messages") if route == CHAT else None
    try:
        marks = find_marks(body, messages, headers)
    except InvalidBlocks as exc:
        metrics.inc("requests_rejected")
        return Invalid(f"cp_engine: {exc}")
    if marks is None:
        return None
    if route == COMPLETION and not isinstance(body.get("prompt"), str):
        metrics.inc("requests_passed_through")  # lists of prompts, token ids
        return None
    try:
        faults.check_fault(HOOK)
        return _rewritten(route, body, marks, tenant_of_request(headers, body), pipe)
    except InvalidBlocks as exc:  # e.g. no user turn to put the blocks in
        metrics.inc("requests_rejected")
        return Invalid(f"cp_engine: {exc}")
    except Exception as exc:
        faults.record_failure(HOOK, exc)
        return _plain(route, body, marks)


def _rewritten(route: str, body: dict, marks: Marks, tenant: str, pipe: ContextPipeline) -> Staged:
    out = _without_marks(body, marks)
    if route == CHAT:
        out["messages"], prep = pipe.rewrite_messages(
            marks.messages, marks.blocks, conversation_id=marks.conversation_id, tenant=tenant)
        base = prefix_tokens(out["messages"])
    else:  # a completion prompt carries no history for reference hints: no dedup
        prep = pipe.prepare(marks.blocks, conversation_id=None, namespace="completion", tenant=tenant)
        out["prompt"] = _with_prompt(prep.context_text, body["prompt"])
        base = 0
    encoded = _encode(out)
    pending = PendingCommit(f"{HOOK}.commit", pipe, f"proxy-{uuid.uuid4().hex}", prep, base,
                            len(marks.blocks), pipe.config.max_blocks_per_request)
    return Staged(encoded, pending)


def _plain(route: str, body: dict, marks: Marks) -> Staged | None:
    """After a failure: the blocks in their given order, plainly joined."""
    try:
        out = _without_marks(body, marks)
        if route == CHAT:
            plain = fallback_messages(marks)
            if plain is None:
                return None
            out["messages"] = plain
        else:
            out["prompt"] = _with_prompt("\n\n".join(marks.blocks), body["prompt"])
        return Staged(_encode(out), None)
    except Exception:
        return None
