"""Context-block rewrite in SGLang's OpenAI chat path (``OpenAIServingChat``).

Client interface (same as the vLLM adapter, see ``hooks.marking``): top-level
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
  records the request in the index. The pipeline is shared: every call holds one lock.
A failure inside the rewrite sends the blocks plainly joined in their given order
(nothing lost) and is counted; a failure before that leaves the request unchanged.
"""
from __future__ import annotations

import sys
import threading
import uuid
from typing import Any, Callable

from .. import faults, marking, metrics
from . import hints as _hints

__all__ = ["around_handle_request", "around_convert", "after_init", "STATE_ATTR"]

STATE_ATTR = "cp_engine_marks"
_pipe_lock = threading.Lock()
_adapters: dict[type, Any] = {}


def _bind(args: tuple, kwargs: dict) -> tuple[Any, Any]:
    request = kwargs.get("request", args[0] if args else None)
    raw = kwargs.get("raw_request", args[1] if len(args) > 1 else None)
    return request, raw


async def _read_marks(request: Any, raw: Any) -> Any:
    """Marks of this request, None when unmarked; raises InvalidBlocks (→ 400)."""
    body = await raw.json()  # Starlette caches the body FastAPI already read
    if not isinstance(body, dict):
        return None
    messages = body.get("messages")
    return marking.find_marks(body, messages, headers=getattr(raw, "headers", None))


def _is_chat(instance: Any) -> bool:
    mod = sys.modules.get("sglang.srt.entrypoints.openai.serving_chat")
    cls = getattr(mod, "OpenAIServingChat", None)
    return cls is not None and isinstance(instance, cls)


async def around_handle_request(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    """``OpenAIServingBase.handle_request`` (shared by every OpenAI endpoint): chat only."""
    request, raw = _bind(args, kwargs)
    if raw is not None and hasattr(raw, "json") and _is_chat(instance):
        try:
            faults.check_fault("sglang_chat")
            marks = await _read_marks(request, raw)
            if marks is not None:
                setattr(raw.state, STATE_ATTR, marks)
        except marking.InvalidBlocks as exc:
            metrics.inc("requests_rejected", 1)
            return instance.create_error_response(str(exc), err_type="BadRequestError", status_code=400)
        except Exception as exc:
            faults.record_failure("sglang_chat", exc)
    return await wrapped(*args, **kwargs)


def _messages_adapter(request_cls: type) -> Any:
    adapter = _adapters.get(request_cls)
    if adapter is None:
        from pydantic import TypeAdapter

        adapter = TypeAdapter(request_cls.model_fields["messages"].annotation)
        _adapters[request_cls] = adapter
    return adapter


def _set_messages(request: Any, messages: list) -> None:
    request.messages = _messages_adapter(type(request)).validate_python(messages)


def _rewrite(request: Any, marks: Any) -> tuple[Any, str, int] | None:
    """Rewrite ``request`` in place; returns (prep, request id, base offset) to commit."""
    from ..runtime import config, pipeline

    if getattr(request, "input_ids", None) is not None:
        metrics.inc("requests_passed_through", 1)  # pre-tokenized: messages are not rendered
        return None
    if len(marks.blocks) > config().max_blocks_per_request:
        metrics.inc("requests_passed_through", 1)
    try:
        faults.check_fault("sglang_rewrite")
        with _pipe_lock:
            messages, prep = pipeline().rewrite_messages(
                marks.messages, marks.blocks, conversation_id=marks.conversation_id)
    except marking.InvalidBlocks:
        raise  # a ValueError: SGLang answers 400 with our message
    except Exception as exc:
        faults.record_failure("sglang_rewrite", exc)
        fallback = marking.fallback_messages(marks)
        if fallback is not None:
            _set_messages(request, fallback)
        return None
    _set_messages(request, messages)
    rid = f"cp-{uuid.uuid4().hex}"
    base = marking.prefix_tokens(messages)
    _hints.attach(request, prep, rid, base_offset=base)
    return prep, rid, base


def around_convert(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    request, raw = _bind(args, kwargs)
    marks = None
    try:
        state = getattr(raw, "state", None) if raw is not None else None
        marks = getattr(state, STATE_ATTR, None) if state is not None else None
    except Exception as exc:
        faults.record_failure("sglang_rewrite", exc)
    if marks is None:
        return wrapped(*args, **kwargs)
    try:
        todo = _rewrite(request, marks)
    except marking.InvalidBlocks:
        metrics.inc("requests_rejected", 1)
        raise  # a ValueError: SGLang's handle_request answers 400 with our message
    result = wrapped(*args, **kwargs)
    if todo is not None:
        prep, rid, base = todo
        try:
            from ..runtime import pipeline

            with _pipe_lock:
                pipeline().commit(rid, prep, base_offset=base)
            metrics.inc("requests_rewritten", 1)
            metrics.inc("blocks_reordered", sum(1 for pos, i in enumerate(prep.order) if pos != i))
            if prep.tokens_saved:
                metrics.inc("dedup_tokens_saved", prep.tokens_saved)
        except Exception as exc:
            faults.record_failure("sglang_commit", exc)
    return result


def after_init(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    """``OpenAIServingChat.__init__``: this is the API server; start the eviction receiver
    and put cp_engine's counters on SGLang's ``/metrics``."""
    result = wrapped(*args, **kwargs)
    from ..channel import start_receiver
    from . import promexport

    faults.call_guarded("sglang_receiver", start_receiver)
    faults.call_guarded("sglang_metrics", promexport.attach_to_server)
    return result
