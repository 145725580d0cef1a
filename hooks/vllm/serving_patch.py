"""Shared mechanics of the API-server rewrites: the wrapt wrapper of a serving class's
``create_*`` method (applied by the patch table) that runs a synchronous rewrite of the
request first.

``rewrite(request, raw_request, serving)`` (``serving`` is the wrapped method's
instance) returns an error message (the wrapper answers it with the serving
object's own 400 ``create_error_response``), None (call through), or a
``hooks.acceptance.PendingCommit`` (call through, then settle it from vLLM's answer):

- an ``ErrorResponse`` (vLLM's own 400s: prompt or ``max_tokens`` beyond the model
  length, bad sampling parameters, ...) or an exception → ``reject()``;
- a full response → ``accept()``;
- a stream → ``accept()`` when its first chunk is a normal one, ``reject()`` when it
  is an error event or the stream ends or is closed before any chunk; chunks pass
  through unchanged and closing our stream closes vLLM's (so a client disconnect
  still aborts the request); a stream dropped before it was ever read is rejected by
  the next rewrite (``acceptance.reject_abandoned``).
Arguments are bound by name; a binding failure is counted and the request goes
through untouched.

A request that carries nothing of ours (``passes``, the rewrite module's test: no
field, kwarg, header or marked part, no fault injected into the hook, no blend plan
held) goes straight to vLLM: the wrapper returns vLLM's own call, with no frame of
ours around it and nothing counted (the test costs about as much as reading a CPU
clock, so it is not timed). The call's arguments are read once, for both paths;
where the test itself fails, the request takes the full path, whose rewrite parses
its fields and counts what fails.

A request the rewrite pinned to a data-parallel rank carries that rank's in-flight
count (``dp_rank.take_held``); it is released when the request finishes: at a full
or error response, an exception or a cancellation (a client that leaves a
non-streamed request), and for a stream when it ends, fails or is closed (a client
that leaves a stream). A stream dropped unread releases it when collected.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from .. import faults
from ..acceptance import PendingCommit, accept_on_first_chunk
from ..wrapping import read_args
from .blend_spans import plan_active, request_scope
from .dp_rank import Held, take_held

Rewrite = Callable[[Any, Any, Any], "str | PendingCommit | None"]
PassesThrough = Callable[[Any, Any], bool]
_ARGS = ("request", "raw_request")


def request_headers(raw_request: Any) -> Any:
    """The HTTP headers of the request (None without one)."""
    return getattr(raw_request, "headers", None) if raw_request is not None else None


def is_error_response(result: Any) -> bool:
    """vLLM's ``ErrorResponse`` (matched by class name: its module moved between releases)."""
    return any(c.__name__ == "ErrorResponse" for c in type(result).__mro__)


def is_stream(result: Any) -> bool:
    """An async iterator. Asked of the type: on a pydantic response an instance
    ``hasattr`` misses through ``BaseModel.__getattr__``, which builds and raises an
    ``AttributeError`` on every request."""
    return hasattr(type(result), "__aiter__")


def settle(pending: PendingCommit, result: Any) -> Any:
    """Accept/reject ``pending`` from ``result`` (see module docs); returns what to answer."""
    if is_error_response(result):
        pending.reject()
        return result
    if is_stream(result):  # a stream of SSE chunks
        return accept_on_first_chunk(result, pending)
    pending.accept()
    return result


async def _answer(wrapped: Any, instance: Any, args: tuple, kwargs: dict, outcome: Any) -> Any:
    """vLLM's answer to the request as the rewrite left it (``outcome``: see module docs)."""
    if isinstance(outcome, str):
        return instance.create_error_response(outcome)
    if outcome is None:
        return await wrapped(*args, **kwargs)
    try:
        result = await wrapped(*args, **kwargs)
    except BaseException:
        outcome.reject()  # raised inside vLLM: it never ran the request
        raise
    cpu_start = time.thread_time_ns()
    try:
        return settle(outcome, result)
    except Exception as exc:  # fail open: vLLM's answer goes out as it is
        faults.record_failure(outcome.hook, exc)
        return result
    finally:  # the settle is the rewrite's cost too (its calls are counted by the rewrite)
        faults.count_cpu(outcome.hook, time.thread_time_ns() - cpu_start)


def released_when_done(result: Any, held: Held | None) -> Any:
    """``result``, with ``held`` released now, or for a stream once it is done."""
    if held is None:
        return result
    if is_stream(result):
        return _releasing(result, held)
    held.release()
    return result


async def _releasing(stream: Any, held: Held) -> Any:
    # Closing this generator closes ``stream``: vLLM aborts the request then.
    try:
        async for chunk in stream:
            yield chunk
    finally:
        held.release()
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


def _passes(passes: PassesThrough, request: Any, raw_request: Any) -> bool:
    """Whether ``request`` may skip the rewrite (False where anything fails)."""
    try:
        return passes(request, raw_request) and not plan_active()
    except Exception:
        return False


def make_wrapper(hook: str, rewrite: Rewrite, passes: PassesThrough | None = None) -> Callable[..., Any]:
    """The wrapt wrapper for ``hook``: ``rewrite`` first, then vLLM (module docs);
    requests ``passes`` says carry nothing of ours go to vLLM directly."""
    async def call(wrapped: Any, instance: Any, args: tuple, kwargs: dict, request: Any, raw_request: Any) -> Any:
        # A rewrite may activate a blend plan for the tokenizer; it ends with this call.
        with request_scope():
            outcome = rewrite(request, raw_request, instance) if request is not None else None
            held = take_held(raw_request)
            try:
                result = await _answer(wrapped, instance, args, kwargs, outcome)
            except BaseException:
                if held is not None:
                    held.release()
                raise
            return released_when_done(result, held)

    def wrapper(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        request = raw_request = None
        try:
            request, raw_request = read_args(wrapped, args, kwargs, _ARGS).values()
        except Exception as exc:  # signature drifted: never block the request
            faults.record_failure(hook, exc)
        if passes is not None and request is not None and _passes(passes, request, raw_request):
            return wrapped(*args, **kwargs)
        return call(wrapped, instance, args, kwargs, request, raw_request)

    return wrapper
