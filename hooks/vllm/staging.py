"""What the chat and completion rewrites share once a request's blocks are prepared:
its request id, the EngineCore hints, and the pending commit.

Contract of ``stage(hook, request, raw_request, serving, prep, rid_prefix, base, n_blocks)``:
returns ``(hints, pending)`` where ``hints`` is the request's own ``vllm_xargs``
merged with ours (``hooks/vllm/hints.py``; the caller assigns it together with the new
prompt) and ``pending`` a ``hooks.acceptance.PendingCommit`` that has indexed the
rendered order; the wrapper (``serving_patch``) accepts or rejects it from the
engine's answer. Raises on failure, before anything is recorded, so the caller's
fail-open path sees an untouched pipeline.
"""
from __future__ import annotations

from typing import Any

from cp_engine.blend.marks import read_blend_marks

from .. import runtime
from ..acceptance import PendingCommit
from ..tokenratio import TokenRatio
from .hints import merged
from .serving_patch import request_headers

__all__ = ["request_id_for", "tokenizer_of", "token_ratio", "stage", "keep_order"]

# One sample in 512 after the first 16: the ratio of a model's tokenizer on its traffic
# settles within a few samples, and each sample tokenizes a whole rendered context.
token_ratio = TokenRatio(warmup=16, every=512)


def request_id_for(prefix: str, request: Any, raw_request: Any) -> str:
    """The id vLLM will give the request (X-Request-Id header, else request.request_id)."""
    headers = request_headers(raw_request)
    rid = None
    if headers is not None:
        try:
            rid = headers.get("X-Request-Id")
        except Exception:
            rid = None
    if rid is None:
        rid = getattr(request, "request_id", None) or ""
    return f"{prefix}{rid}"


def tokenizer_of(serving: Any) -> Any:
    """The serving object's tokenizer (``renderer.tokenizer`` in 0.27.1-0.32; ``tokenizer`` in older layouts)."""
    renderer = getattr(serving, "renderer", None)
    tok = getattr(renderer, "tokenizer", None) if renderer is not None else None
    return tok if tok is not None else getattr(serving, "tokenizer", None)


def stage(hook: str, request: Any, raw_request: Any, serving: Any, prep: Any, rid_prefix: str,
          base: int, n_blocks: int) -> tuple[dict, PendingCommit]:
    rid = request_id_for(rid_prefix, request, raw_request)
    token_ratio.observe(tokenizer_of(serving), prep.context_text)
    hints = merged(request, prep, rid, base, scale=token_ratio.scale())
    pending = PendingCommit(f"{hook}.commit", runtime.pipeline(), rid, prep, base, n_blocks,
                            runtime.config().max_blocks_per_request)
    return hints, pending


def keep_order(extra: Any) -> bool:
    """Retrieval order for this request's blocks: its ``context_keep_order`` when sent,
    else ``CP_ENGINE_BLEND_KEEP_ORDER`` with blend on."""
    asked = read_blend_marks(extra).keep_order
    if asked is not None:
        return asked
    cfg = runtime.config()
    return bool(cfg.blend and cfg.blend_keep_order)
