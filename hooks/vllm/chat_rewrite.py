"""Prompt rewrite for ``/v1/chat/completions`` inside vLLM's API server.

Patched symbol: ``OpenAIServingChat.create_chat_completion(request, raw_request)``
(row ``chat_rewrite`` of ``hooks/vllm/table.py``). It is the one method every chat
request of the supported releases passes through that sees both
the parsed request (``model_extra`` keeps our fields) and the HTTP headers, before any
templating; the render path below it moved between releases (``OnlineRenderer`` in
0.32), this method did not.

Contract for each request (see ``cp_engine.marking`` for how blocks are marked):
- unmarked: not touched at all (byte-identical prompt);
- malformed marks: an HTTP 400 ``ErrorResponse`` naming the field, engine untouched;
- marked: messages rewritten by ``ContextPipeline.rewrite_messages`` (blocks in the
  last user turn, before the question, annotation after the blocks), hints for
  EngineCore merged into ``request.vllm_xargs`` (``cp_engine.request_hints``), the
  rendered order indexed under the request id; the conversation's dedup history and
  the counters are committed only once vLLM accepts the request, and the index path
  is dropped again if it does not (``hooks.acceptance``). Dedup is scoped by tenant
  (``hooks.tenant``: Authorization header, ``cache_salt``, ``user``);
- any failure of ours: counted as ``hook_failures{hook="chat_rewrite"}``, the blocks
  are rendered plainly in their given order (nothing lost), else the request is left
  as it came.
"""
from __future__ import annotations

from typing import Any

from cp_engine.marking import InvalidBlocks, Marks, fallback_messages, find_marks, prefix_tokens
from .. import faults, metrics, runtime
from ..acceptance import PendingCommit
from ..tenant import tenant_of_request
from .serving_patch import make_wrapper
from .staging import stage

HOOK = "chat_rewrite"


def _headers(raw_request: Any) -> Any:
    return getattr(raw_request, "headers", None) if raw_request is not None else None


@faults.stall_watched(HOOK)
def rewrite(request: Any, raw_request: Any = None, serving: Any = None) -> str | PendingCommit | None:
    """Rewrite ``request`` in place; an error message for a 400, the pending commit of
    a rewritten request (settled by ``serving_patch`` from the engine's answer), else None."""
    marks: Marks | None = None
    try:
        faults.check_fault(HOOK)
        marks = find_marks(getattr(request, "model_extra", None), request.messages, _headers(raw_request))
        if marks is None:
            return None
        tenant = tenant_of_request(_headers(raw_request), request)
        messages, prep = runtime.pipeline().rewrite_messages(
            marks.messages, marks.blocks, conversation_id=marks.conversation_id, tenant=tenant)
        hints, pending = stage(HOOK, request, raw_request, serving, prep, "chatcmpl-",
                               prefix_tokens(messages), len(marks.blocks))
        # Assign last, together: a failure above leaves the request as it came.
        request.messages = messages
        request.vllm_xargs = hints
        return pending
    except InvalidBlocks as exc:
        metrics.inc("requests_rejected")
        return f"cp_engine: {exc}"
    except Exception as exc:
        faults.record_failure(HOOK, exc)
        if marks is None:  # failed before the marks were read: read them for the fallback
            try:
                marks = find_marks(getattr(request, "model_extra", None), request.messages, _headers(raw_request))
            except Exception:
                marks = None
        if marks is not None:
            try:
                plain = fallback_messages(marks)
                if plain is not None:
                    request.messages = plain
            except Exception:
                pass
        return None


# The patch table's chat_rewrite row wraps OpenAIServingChat.create_chat_completion with this.
wrapper = make_wrapper(HOOK, rewrite)
