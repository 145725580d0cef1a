"""Context-block rewrite in SGLang's OpenAI chat path (``OpenAIServingChat``).

Client interface (same as the vLLM adapter, see ``cp_engine.marking``): top-level
``context_blocks`` (list of str) and optional ``conversation_id`` sent through the
openai client's ``extra_body``, or text content parts flagged ``"cp_block": true``.

SGLang's ``ChatCompletionRequest`` silently drops unknown fields when FastAPI parses the
body, and drops the unknown ``cp_block`` key of content parts, so both are read from
the raw JSON body that Starlette keeps on the request:

- ``around_handle_request`` (async, event loop; the method lives on
  ``OpenAIServingBase``, other endpoints pass straight through): reads the cached body, validates the
  marks (malformed ones → HTTP 400 through SGLang's own error response) and stashes
  them on ``raw_request.state``; unmarked requests are not touched at all;
- ``around_convert`` (``_convert_to_internal_request``, a worker thread since 0.5.22):
  renders the blocks into the last user turn with ``ContextPipeline.rewrite_messages``
  (blocks after any system prompt and before the question, annotation after the
  blocks), attaches the scheduler hints to ``custom_params``, calls through, then
  indexes the rendered order and leaves a ``hooks.acceptance.PendingCommit`` on
  ``raw_request.state``. The pipeline is shared: every call holds one lock;
- back in ``around_handle_request``, SGLang's answer settles it: an error response
  (status >= 400) or an exception rejects (index path dropped, dedup untouched), a
  stream accepts at its first normal event, any other answer accepts (the
  conversation's dedup history and the counters are committed then).
Dedup is scoped by tenant (``hooks.tenant``: Authorization header, ``cache_salt``,
``user`` of the JSON body). A failure inside the rewrite sends the blocks plainly
joined in their given order (nothing lost) and is counted; a failure before that
leaves the request unchanged.
"""
from __future__ import annotations

import sys
import threading
import uuid
from typing import Any, Callable

from cp_engine import marking
from .. import faults, metrics
from ..acceptance import PendingCommit, accept_on_first_chunk
from ..tenant import tenant_of_request
from . import hints as _hints

__all__ = ["around_handle_request", "around_convert", "after_init", "STATE_ATTR"]

STATE_ATTR = "cp_engine_marks"
TENANT_ATTR = "cp_engine_tenant"
PENDING_ATTR = "cp_engine_pending"
_pipe_lock = threading.Lock()
_adapters: dict[type, Any] = {}


def _bind(args: tuple, kwargs: dict) -> tuple[Any, Any]:
    request = kwargs.get("request", args[0] if args else None)
    raw = kwargs.get("raw_request", args[1] if len(args) > 1 else None)
    return request, raw


async def _read_marks(request: Any, raw: Any) -> tuple[Any, str]:
    """(marks or None when unmarked, tenant key); raises InvalidBlocks (→ 400)."""
    body = await raw.json()  # Starlette caches the body FastAPI already read
    if not isinstance(body, dict):
        return None, ""
    headers = getattr(raw, "headers", None)
    marks = marking.find_marks(body, body.get("messages"), headers=headers)
    return marks, tenant_of_request(headers, body)


def _is_chat(instance: Any) -> bool:
    mod = sys.modules.get("sglang.srt.entrypoints.openai.serving_chat")
    cls = getattr(mod, "OpenAIServingChat", None)
    return cls is not None and isinstance(instance, cls)


async def around_handle_request(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    """``OpenAIServingBase.handle_request`` (shared by every OpenAI endpoint): chat only."""
    request, raw = _bind(args, kwargs)
    marked = False
    if raw is not None and hasattr(raw, "json") and _is_chat(instance):
        try:
            faults.check_fault("sglang_chat")
            marks, tenant = await _read_marks(request, raw)
            if marks is not None:
                setattr(raw.state, STATE_ATTR, marks)
                setattr(raw.state, TENANT_ATTR, tenant)
                marked = True
        except marking.InvalidBlocks as exc:
            metrics.inc("requests_rejected", 1)
            return instance.create_error_response(str(exc), err_type="BadRequestError", status_code=400)
        except Exception as exc:
            faults.record_failure("sglang_chat", exc)
    if not marked:
        return await wrapped(*args, **kwargs)
    try:
        result = await wrapped(*args, **kwargs)
    except BaseException:
        _settle(raw, None, error=True)
        raise
    return _settle(raw, result)


def _settle(raw: Any, result: Any, error: bool = False) -> Any:
    """Accept or reject the request's pending commit from SGLang's answer (module docs)."""
    try:
        pending = getattr(raw.state, PENDING_ATTR, None)
        if not isinstance(pending, PendingCommit):
            return result  # not rewritten (fail-open path or pre-tokenized input)
        status = getattr(result, "status_code", None)
        if error or (isinstance(status, int) and status >= 400):
            pending.reject()
        elif hasattr(getattr(result, "body_iterator", None), "__aiter__"):  # StreamingResponse
            result.body_iterator = accept_on_first_chunk(result.body_iterator, pending)
        else:
            pending.accept()
    except Exception as exc:
        faults.record_failure("sglang_commit", exc)
    return result


def _messages_adapter(request_cls: type) -> Any:
    adapter = _adapters.get(request_cls)
    if adapter is None:
        from pydantic import TypeAdapter

        adapter = TypeAdapter(request_cls.model_fields["messages"].annotation)
        _adapters[request_cls] = adapter
    return adapter


def _set_messages(request: Any, messages: list, marks: Any) -> None:
    request.messages = _messages_adapter(type(request)).validate_python(messages)
    marking.drop_template_marks(request, marks)


@faults.stall_watched("sglang_rewrite", cpu=True)
def _rewrite(request: Any, marks: Any, tenant: str) -> tuple[Any, str, int] | None:
    """Rewrite ``request`` in place; returns (prep, request id, base offset) to commit."""
    from ..runtime import pipeline

    if getattr(request, "input_ids", None) is not None:
        metrics.inc("requests_passed_through", 1)  # pre-tokenized: messages are not rendered
        return None
    try:
        faults.check_fault("sglang_rewrite")
        with _pipe_lock:
            messages, prep = pipeline().rewrite_messages(
                marks.messages, marks.blocks, conversation_id=marks.conversation_id, tenant=tenant)
    except marking.InvalidBlocks:
        raise  # a ValueError: SGLang answers 400 with our message
    except Exception as exc:
        faults.record_failure("sglang_rewrite", exc)
        fallback = marking.fallback_messages(marks)
        if fallback is not None:
            _set_messages(request, fallback, marks)
        return None
    _set_messages(request, messages, marks)
    rid = f"cp-{uuid.uuid4().hex}"
    base = marking.prefix_tokens(messages)
    _hints.attach(request, prep, rid, base_offset=base)
    return prep, rid, base


def around_convert(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    request, raw = _bind(args, kwargs)
    marks, tenant = None, ""
    try:
        state = getattr(raw, "state", None) if raw is not None else None
        marks = getattr(state, STATE_ATTR, None) if state is not None else None
        tenant = getattr(state, TENANT_ATTR, "") if state is not None else ""
    except Exception as exc:
        faults.record_failure("sglang_rewrite", exc)
    if marks is None:
        return wrapped(*args, **kwargs)
    try:
        todo = _rewrite(request, marks, tenant if isinstance(tenant, str) else "")
    except marking.InvalidBlocks:
        metrics.inc("requests_rejected", 1)
        raise  # a ValueError: SGLang's handle_request answers 400 with our message
    result = wrapped(*args, **kwargs)
    if todo is not None:
        prep, rid, base = todo
        try:
            from ..runtime import config, pipeline

            with _pipe_lock:
                pending = PendingCommit("sglang_commit", pipeline(), rid, prep, base,
                                        len(marks.blocks), config().max_blocks_per_request)
            setattr(raw.state, PENDING_ATTR, pending)
        except Exception as exc:
            faults.record_failure("sglang_commit", exc)
    return result


def after_init(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    """``OpenAIServingChat.__init__``: this is the API server; apply the table's rows that
    belong there (eviction receiver, cp_engine's counters on SGLang's ``/metrics``)."""
    result = wrapped(*args, **kwargs)
    from .patch import INSTALLER

    for name in ("receiver", "metrics_registry", "metrics_route"):
        faults.call_guarded("sglang_api_server", INSTALLER.apply, name)
    return result
