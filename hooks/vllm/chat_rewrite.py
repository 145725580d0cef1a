"""Prompt rewrite for ``/v1/chat/completions`` inside vLLM's API server.

Patched symbol: ``OpenAIServingChat.create_chat_completion(request, raw_request)``.
It is the one method every vLLM 0.27–0.33 chat request passes through that sees both
the parsed request (``model_extra`` keeps our fields) and the HTTP headers, before any
templating; the render path below it moved between releases (``OnlineRenderer`` in
0.32), this method did not.

Contract for each request (see ``hooks.marking`` for how blocks are marked):
- unmarked: not touched at all (byte-identical prompt);
- malformed marks: an HTTP 400 ``ErrorResponse`` naming the field, engine untouched;
- marked: messages rewritten by ``ContextPipeline.rewrite_messages`` (blocks in the
  last user turn, before the question, annotation after the blocks), hints for
  EngineCore merged into ``request.vllm_xargs`` (keys in ``xargs``), the rendered order
  committed to the index under the request id;
- any failure of ours: counted as ``hook_failures{hook="chat_rewrite"}``, the blocks
  are rendered plainly in their given order (nothing lost), else the request is left
  as it came.
"""
from __future__ import annotations

from typing import Any

from .. import faults, ledger, metrics, runtime
from ..marking import InvalidBlocks, Marks, fallback_messages, find_marks, prefix_tokens
from ..tokenratio import TokenRatio
from . import xargs
from .serving_patch import MethodPatch

HOOK = "chat_rewrite"
MODULES = ("vllm.entrypoints.openai.chat_completion.serving",  # 0.31+
           "vllm.entrypoints.openai.serving_chat")  # 0.27–0.30
CLASS, METHOD = "OpenAIServingChat", "create_chat_completion"

PATCH = ledger.register(ledger.Patch(
    engine="vllm",
    target=f"{MODULES[0]}.{CLASS}.{METHOD}",
    why="render marked context blocks (reordered, de-duplicated, annotated) into the prompt before templating",
    how="wrapt FunctionWrapper on the class attribute; request/raw_request bound by name; "
        "edits request.messages and request.vllm_xargs, then calls through",
    min_version="0.27.0",
    max_version="0.33",
    upstream="vllm/entrypoints/openai/chat_completion/serving.py (serving_chat.py before 0.31)",
    remove_when="vLLM exposes a request pre-processing plugin hook for the OpenAI server",
))


def _headers(raw_request: Any) -> Any:
    return getattr(raw_request, "headers", None) if raw_request is not None else None


def request_id_for(prefix: str, request: Any, raw_request: Any) -> str:
    """The id vLLM will give the request (X-Request-Id header, else request.request_id)."""
    headers = _headers(raw_request)
    rid = None
    if headers is not None:
        try:
            rid = headers.get("X-Request-Id")
        except Exception:
            rid = None
    if rid is None:
        rid = getattr(request, "request_id", None) or ""
    return f"{prefix}{rid}"


token_ratio = TokenRatio()


def tokenizer_of(serving: Any) -> Any:
    """The serving object's tokenizer (0.31+: ``renderer.tokenizer``; older: ``tokenizer``)."""
    renderer = getattr(serving, "renderer", None)
    tok = getattr(renderer, "tokenizer", None) if renderer is not None else None
    return tok if tok is not None else getattr(serving, "tokenizer", None)


def _count(prep: Any, n_blocks: int) -> None:
    metrics.inc("requests_rewritten")
    moved = sum(1 for pos, i in enumerate(prep.order) if pos != i)
    if moved:
        metrics.inc("blocks_reordered", moved)
    if prep.tokens_saved:
        metrics.inc("dedup_tokens_saved", prep.tokens_saved)
    if n_blocks > runtime.config().max_blocks_per_request:
        metrics.inc("requests_passed_through")


def rewrite(request: Any, raw_request: Any = None, serving: Any = None) -> str | None:
    """Rewrite ``request`` in place; return an error message for a 400, else None."""
    marks: Marks | None = None
    try:
        faults.check_fault(HOOK)
        marks = find_marks(getattr(request, "model_extra", None), request.messages, _headers(raw_request))
        if marks is None:
            return None
        pipe = runtime.pipeline()
        tenant = getattr(request, "cache_salt", None) or ""
        messages, prep = pipe.rewrite_messages(marks.messages, marks.blocks,
                                               conversation_id=marks.conversation_id, tenant=tenant)
        rid = request_id_for("chatcmpl-", request, raw_request)
        base = prefix_tokens(messages)
        hints = dict(getattr(request, "vllm_xargs", None) or {})
        token_ratio.observe(tokenizer_of(serving), prep.context_text)
        hints.update(xargs.build_xargs(prep, rid, base, scale=token_ratio.scale()))
        pipe.commit(rid, prep, base_offset=base)
        # Assign last, together: a failure above leaves the request as it came.
        request.messages = messages
        request.vllm_xargs = hints
        _count(prep, len(marks.blocks))
        return None
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


_PATCH = MethodPatch(HOOK, MODULES, CLASS, METHOD, rewrite)
install = _PATCH.install
uninstall = _PATCH.uninstall
