"""API-server side of blend: exact block spans and the tenant scope for EngineCore.

Two patch-table rows run this module's wrappers:
- ``blend_tokenize`` (``BaseRenderer._tokenize_singleton_prompt_async``, flag
  ``CP_ENGINE_BLEND``): when the request being rendered carries a ``Plan`` (set by the
  chat or completion rewrite for this task, ``activate``), the rendered prompt text is
  cut at its blocks and tokenized piece by piece (``cp_engine.blend.spans.encode_cut``):
  every block gets its standalone ids wherever it sits, and no token merges across a
  block's boundary. The ids go to vLLM as ``prompt_token_ids``, so vLLM's own length
  checks and truncation still apply; only the tokenization is ours. Block ids come from
  a bounded LRU per tokenizer, so a popular block is tokenized once; the chat template
  is rendered once, by vLLM. Skipped (vLLM tokenizes as usual) for a tokenizer whose
  pieces do not join cleanly (``concatenates_cleanly``), for truncation, lower-casing,
  offsets, multimodal or already tokenized prompts, and when no block is found in the text.
- ``request_gate`` (``InputProcessor.process_inputs``, always on): the one place every
  API-server request becomes an ``EngineCoreRequest``. It drops a client's reserved hint
  keys (``cp_scope``, ``strip_reserved``) from every request. For a request the rewrite
  planned (found by the unguessable ``REF_KEY`` it put in ``vllm_xargs``, which never
  reaches EngineCore), it sets ``cp_spans`` from the final prompt ids, each span checked
  to hold the block's exact ids (else located with ``locate_spans``; a block not found
  gets no span), and ``cp_scope`` to the request's tenant key. With blend on it also
  refuses a request whose ``cp_blend_ratio`` / ``cp_blend_mode`` is out of bounds
  (``cp_engine.blend.settings.check_settings``) with vLLM's ``VLLMValidationError``
  (also a ``ValueError``), which its API server answers with HTTP 400, before anything
  is queued.
With ``CP_ENGINE_BLEND=0`` no plan is made and the tokenize row is not applied, so the
prompt ids are vLLM's own; the gate then only drops a client's ``cp_scope``.
"""
from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
from collections import OrderedDict
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

from cp_engine.blend.marks import Anchor, locate_anchors
from cp_engine.blend.settings import InvalidBlendSetting, check_settings
from cp_engine.blend.spans import Rendered, TokenCache, concatenates_cleanly, encode_cut, locate_spans
from cp_engine.request_hints import MAX_SPANS, SCOPE, SERVER_ONLY_KEYS, SPANS, strip_reserved
from .. import faults, runtime
from ..wrapping import bind_args

__all__ = ["REF_KEY", "Plan", "make_plan", "attach", "activate", "plan_active", "request_scope",
           "tokenize_wrapper", "process_inputs_wrapper", "spans_for"]

REF_KEY = "cp_blend_ref"
TOKENIZE_HOOK = "blend_tokenize"
GATE_HOOK = "request_gate"
MAX_PENDING = 1024  # plans made but not yet turned into an engine request
CACHE_TOKENS = 1 << 21  # block ids kept per tokenizer (int32: 8 MiB)


@dataclass
class Plan:
    """What the rewrite knows about one request's blocks; ``cut`` is set once its prompt
    was tokenized piece by piece."""

    anchors: tuple[Anchor, ...]
    scope: str
    cut: Rendered | None = None
    block_ids: list[Sequence[int]] = field(default_factory=list)

    def block_texts(self) -> list[str]:
        return [a.text[s:e] for a in self.anchors for s, e in a.ranges]


_current: ContextVar[Plan | None] = ContextVar("cp_engine_blend_plan", default=None)
_pending: OrderedDict[str, Plan] = OrderedDict()
_pending_lock = threading.Lock()


def make_plan(anchors: Sequence[Anchor], scope: str) -> Plan | None:
    """A plan for a rewritten request, or None when blend is off or it has no block."""
    if not runtime.config().blend:
        return None
    kept = tuple(a for a in anchors if a.text and a.ranges)
    return Plan(kept, scope) if kept else None


def attach(plan: Plan | None, xargs: Mapping[str, Any] | None) -> dict | None:
    """``xargs`` without reserved keys (and without a client's spans, which describe the
    prompt before the rewrite when a plan exists), plus the plan's reference. The caller
    assigns the result to ``request.vllm_xargs`` and calls ``activate(plan)``."""
    out = strip_reserved(xargs)
    if plan is None:
        return out
    out = dict(out or {})
    out.pop(SPANS, None)
    ref = secrets.token_hex(16)
    with _pending_lock:
        _pending[ref] = plan
        while len(_pending) > MAX_PENDING:
            _pending.popitem(last=False)
    out[REF_KEY] = ref
    return out


def _take(ref: Any) -> Plan | None:
    if not isinstance(ref, str):
        return None
    with _pending_lock:
        return _pending.pop(ref, None)


def activate(plan: Plan | None) -> None:
    """Make ``plan`` the current request's plan for the tokenizer wrapper (this task and
    the tasks it starts); ``request_scope`` around the request undoes it."""
    if plan is not None:
        _current.set(plan)


def plan_active() -> bool:
    """Whether this task holds a plan (``activate``), which ``request_scope`` would hide."""
    return _current.get() is not None


@contextlib.contextmanager
def request_scope() -> Iterator[None]:
    token = _current.set(None)
    try:
        yield
    finally:
        _current.reset(token)


# -- tokenizers --------------------------------------------------------------------

@dataclass
class _Tokenizer:
    cache: TokenCache
    clean: bool  # pieces tokenized apart join to the text's own reading
    lead: tuple[int, ...] | None  # ids add_special_tokens puts in front (None: also behind)


_tokenizers: dict[int, tuple[Any, _Tokenizer]] = {}
_tokenizers_lock = threading.Lock()


def _encoder(tokenizer: Any):
    return lambda text: tokenizer.encode(text, add_special_tokens=False)


def _state(tokenizer: Any) -> _Tokenizer:
    with _tokenizers_lock:
        held = _tokenizers.get(id(tokenizer))
        if held is not None and held[0] is tokenizer:
            return held[1]
    encode = _encoder(tokenizer)
    clean = concatenates_cleanly(encode, lambda ids: tokenizer.decode(ids, skip_special_tokens=False))
    lead = None
    try:
        bare = [int(t) for t in encode("x")]
        full = [int(t) for t in tokenizer.encode("x", add_special_tokens=True)]
        if full[len(full) - len(bare):] == bare:
            lead = tuple(full[:len(full) - len(bare)])
    except Exception:
        lead = None
    state = _Tokenizer(TokenCache(encode, CACHE_TOKENS), clean, lead)
    with _tokenizers_lock:
        _tokenizers[id(tokenizer)] = (tokenizer, state)
    return state


def _cuttable(prompt: Any, params: Any) -> bool:
    return (isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str)
            and "prompt_token_ids" not in prompt and "prompt_embeds" not in prompt
            and not prompt.get("multi_modal_data") and "encoder_prompt" not in prompt
            and getattr(params, "truncate_prompt_tokens", None) is None
            and not getattr(params, "do_lower_case", False)
            and not getattr(params, "return_token_offsets", False))


def _cut(tokenizer: Any, plan: Plan, text: str, add_special: bool) -> Rendered | None:
    state = _state(tokenizer)
    if not state.clean:
        return None
    lead: tuple[int, ...] = ()
    if add_special:
        if state.lead is None:
            return None
        lead = state.lead
    ranges = locate_anchors(text, plan.anchors)
    if not ranges:
        return None
    cut = encode_cut(_encoder(tokenizer), text, ranges, state.cache)
    plan.block_ids = [cut.ids[s:e] for s, e in cut.spans]
    if lead:
        n = len(lead)
        cut = Rendered(list(lead) + cut.ids, [(s + n, e + n) for s, e in cut.spans])
    return cut


async def tokenize_wrapper(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """Row ``blend_tokenize``: tokenize a planned prompt piece by piece (module docs)."""
    plan = _current.get()
    if plan is not None and plan.cut is None:
        try:
            bound = bind_args(wrapped, args, kwargs)
            prompt, params = bound.arguments.get("prompt"), bound.arguments.get("params")
            if _cuttable(prompt, params):
                tokenizer = instance.get_tokenizer()
                work = lambda: _cut(tokenizer, plan, prompt["prompt"],  # noqa: E731
                                    bool(getattr(params, "add_special_tokens", False)))
                executor = getattr(instance, "_executor", None)
                cut = (await asyncio.get_running_loop().run_in_executor(executor, work)
                       if executor is not None else work())
                if cut is not None:
                    plan.cut = cut
                    bound.arguments["prompt"] = {**prompt, "prompt_token_ids": cut.ids}
                    args, kwargs = bound.args, bound.kwargs
        except Exception as exc:  # vLLM tokenizes the text itself
            faults.record_failure(TOKENIZE_HOOK, exc)
    return await wrapped(*args, **kwargs)


# -- the engine request ------------------------------------------------------------

def spans_for(plan: Plan, prompt_ids: Sequence[int] | None, tokenizer: Any = None) -> list[list[int]]:
    """Exact ``[start, end)`` of the plan's blocks in ``prompt_ids``: the cut's spans when
    they still hold the blocks' ids there, else each block located in order; blocks not
    found are left out."""
    if prompt_ids is None:
        return []
    ids = list(prompt_ids)
    blocks = plan.block_ids
    if not blocks and tokenizer is not None:
        cache = _state(tokenizer).cache
        blocks = [cache.ids(t) for t in plan.block_texts()]
    if not blocks:
        return []
    spans: list[tuple[int, int] | None]
    cut = plan.cut
    if cut is not None and len(cut.spans) == len(blocks) and all(
            ids[s:e] == cut.ids[s:e] for s, e in cut.spans):
        spans = list(cut.spans)
    else:
        spans = locate_spans(ids, [list(b) for b in blocks])
    return [[s, e] for s, e in (x for x in spans if x is not None)][:MAX_SPANS]


def _gate(instance: Any, request: Any) -> None:
    params = getattr(request, "sampling_params", None)
    extra = getattr(params, "extra_args", None) if params is not None else None
    if not extra or not any(k in extra for k in (REF_KEY, *SERVER_ONLY_KEYS)):
        return
    out = strip_reserved(extra) or {}
    plan = _take(out.pop(REF_KEY, None))
    try:
        if plan is not None:
            out[SCOPE] = plan.scope
            spans = spans_for(plan, getattr(request, "prompt_token_ids", None),
                              getattr(instance, "tokenizer", None))
            if spans:
                out[SPANS] = spans
    finally:
        params.extra_args = out or None


try:
    from vllm.exceptions import VLLMValidationError as _ClientError
except ImportError:  # a vLLM without it answers a ValueError with 400
    _ClientError = None


def _refusal(exc: InvalidBlendSetting) -> Exception:
    """The error the API server answers with 400. vLLM's ``AsyncLLM.generate`` lets only
    its client errors through from ``process_inputs`` (anything else becomes a 500), so
    where it has ``VLLMValidationError`` the refusal is one, and a ``ValueError`` too."""
    message = f"cp_engine: vllm_xargs.{exc}"
    if _ClientError is None:
        return InvalidBlendSetting(exc.field, message)
    out = _RefusedSetting(message, parameter=exc.field)
    out.field = exc.field
    return out


if _ClientError is not None:
    class _RefusedSetting(_ClientError, ValueError):  # type: ignore[misc,valid-type]
        field = ""


def _check_settings(request: Any) -> None:
    if not runtime.config().blend:
        return  # blend off: the hints mean nothing and the request is left as it came
    params = getattr(request, "sampling_params", None)
    try:
        check_settings(getattr(params, "extra_args", None))
    except InvalidBlendSetting as exc:
        raise _refusal(exc) from None


def process_inputs_wrapper(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """Row ``request_gate``: reserved keys out, a planned request's spans and scope in;
    refused blend settings raise a client error (HTTP 400, ``_refusal``)."""
    request = wrapped(*args, **kwargs)
    try:
        _gate(instance, request)
    except Exception as exc:
        faults.record_failure(GATE_HOOK, exc)
        params = getattr(request, "sampling_params", None)
        extra = getattr(params, "extra_args", None) if params is not None else None
        if extra:  # never let a client's scope through, whatever failed
            params.extra_args = {k: v for k, v in extra.items()
                                 if k not in SERVER_ONLY_KEYS and k not in (REF_KEY, SPANS)} or None
    _check_settings(request)  # after the gate, which has taken the request's plan out
    return request
