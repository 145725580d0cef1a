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
- ``context_suffix`` (``cp_engine.blend.marks``): appended verbatim after the last
  user turn's content, with or without ``context_blocks``; ``context_keep_order``
  keeps the blocks' retrieval order;
- blend on (``CP_ENGINE_BLEND=1``): a plan of the rendered blocks is attached for the
  tokenizer and the engine-request gate (``hooks/vllm/blend_spans.py``), which turn
  it into exact spans and the tenant scope; a client's ``cp_scope`` never passes;
- data parallel (``--data-parallel-size`` > 1): one index view per engine rank; the
  request goes to the rank whose view aligns most of its blocks among the ranks within
  the load bound on requests in flight (``hooks/vllm/dp_rank.py``), unless the client or
  a router named one;
- any failure of ours: counted as ``hook_failures{hook="chat_rewrite"}``, the blocks
  are rendered plainly in their given order, the suffix after the question (nothing
  lost), else the request is left as it came.
"""
from __future__ import annotations

from typing import Any

from cp_engine.blend.marks import (Anchor, context_anchor, last_user_index, read_blend_marks,
                                   suffix_anchor, with_suffix)
from cp_engine.marking import (InvalidBlocks, Marks, drop_template_marks, fallback_messages, find_marks,
                               lift_template_marks, may_carry_marks, named_as_sent, prefix_tokens)
from .. import faults, metrics, runtime
from ..acceptance import PendingCommit
from ..tenant import tenant_of_request
from .blend_spans import activate, attach, make_plan
from .dp_rank import RankChoice
from .serving_patch import make_wrapper, request_headers
from .staging import keep_order, stage

HOOK = "chat_rewrite"


def _marks(request: Any, extra: Any, raw_request: Any) -> Marks | None:
    # chat_template_kwargs is a declared field, so model_extra does not hold it.
    return find_marks(extra, request.messages, request_headers(raw_request),
                      getattr(request, "chat_template_kwargs", None))


def _blend_fields(request: Any, extra: Any) -> Any:
    """``extra`` with blend's fields sent in chat_template_kwargs lifted beside it."""
    return lift_template_marks(extra or {}, getattr(request, "chat_template_kwargs", None))[0]


def passes_through(request: Any, raw_request: Any = None) -> bool:
    """True where ``rewrite`` would return None with ``request`` as it came: it carries
    nothing of ours and no fault is injected into this hook (``serving_patch``)."""
    return not (may_carry_marks(getattr(request, "model_extra", None), request.messages, request_headers(raw_request),
                                getattr(request, "chat_template_kwargs", None))
                or faults.injecting(HOOK))


@faults.stall_watched(HOOK, cpu=True)
def rewrite(request: Any, raw_request: Any = None, serving: Any = None) -> str | PendingCommit | None:
    """Rewrite ``request`` in place; an error message for a 400, the pending commit of
    a rewritten request (settled by ``serving_patch`` from the engine's answer), else None."""
    marks: Marks | None = None
    suffix: Anchor | None = None
    try:
        faults.check_fault(HOOK)
        extra = getattr(request, "model_extra", None)
        marks = _marks(request, extra, raw_request)
        blend = _blend_fields(request, extra)
        suffix = suffix_anchor(read_blend_marks(blend).suffix)
        if marks is None and not suffix.text:
            return None
        tenant = tenant_of_request(request_headers(raw_request), request)
        pending: PendingCommit | None = None
        hints = getattr(request, "vllm_xargs", None)
        anchors = [suffix]
        ranks: RankChoice | None = None
        if marks is None:
            messages = list(request.messages)
        else:
            ranks = RankChoice.for_request(serving, raw_request, runtime.pipeline().index)
            messages, prep = runtime.pipeline().rewrite_messages(
                marks.messages, marks.blocks, conversation_id=marks.conversation_id, tenant=tenant,
                keep_order=keep_order(blend), namespace_for=ranks.namespace if ranks is not None else None)
            anchors.insert(0, context_anchor(prep.context_text, prep.order, prep.full, marks.blocks))
        messages = _with_suffix(messages, suffix)
        if marks is not None:
            hints, pending = stage(HOOK, request, raw_request, serving, prep, "chatcmpl-",
                                   prefix_tokens(messages), len(marks.blocks))
        plan = make_plan(anchors, tenant)
        # Assign last, together: a failure above leaves the request as it came.
        request.messages = messages
        request.vllm_xargs = attach(plan, hints)
        drop_template_marks(request, marks)
        if ranks is not None:
            ranks.pin()
        activate(plan)
        return pending
    except InvalidBlocks as exc:
        metrics.inc("requests_rejected")
        return f"cp_engine: {named_as_sent(str(exc), getattr(request, 'chat_template_kwargs', None))}"
    except Exception as exc:
        faults.record_failure(HOOK, exc)
        _fallback(request, raw_request, marks, suffix)
        return None


def _with_suffix(messages: list, suffix: Anchor) -> list:
    if not suffix.text:
        return messages
    i = last_user_index(messages)
    out = list(messages)
    out[i] = dict(out[i])
    out[i]["content"] = with_suffix(out[i].get("content"), suffix)
    return out


def _fallback(request: Any, raw_request: Any, marks: Marks | None, suffix: Anchor | None) -> None:
    """After a failure: the blocks plainly, in given order, and the suffix after the
    question, so no context is lost."""
    try:
        extra = getattr(request, "model_extra", None)
        if marks is None:  # failed before the marks were read: read them for the fallback
            marks = _marks(request, extra, raw_request)
        if suffix is None:
            suffix = suffix_anchor(read_blend_marks(_blend_fields(request, extra)).suffix)
        if marks is None and not suffix.text:
            return
        messages = fallback_messages(marks) if marks is not None else list(request.messages)
        if messages is not None:
            request.messages = _with_suffix(messages, suffix)
            drop_template_marks(request, marks)
    except Exception:
        pass


# The patch table's chat_rewrite row wraps OpenAIServingChat.create_chat_completion with this.
wrapper = make_wrapper(HOOK, rewrite, passes_through)
