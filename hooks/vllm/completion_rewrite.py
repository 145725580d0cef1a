"""Prompt rewrite for ``/v1/completions`` (single text prompt only).

Patched symbol: ``OpenAIServingCompletion.create_completion(request, raw_request)``
(row ``completion_rewrite`` of ``hooks/vllm/table.py``).
A string ``prompt`` with ``context_blocks`` becomes ``context_text + "\\n\\n" + prompt``
(reordered and annotated; no per-conversation dedup: a completion prompt carries no
history the reference hints could point to). Lists of prompts or token ids pass through
unchanged (counted in ``requests_passed_through``). Same 400 / fail-open rules as chat
(a failed rewrite still puts the blocks, in given order, before the prompt).
"""
from __future__ import annotations

from typing import Any

from cp_engine.marking import BLOCKS_FIELD, InvalidBlocks, find_marks
from .. import faults, metrics, runtime
from ..acceptance import PendingCommit
from ..tenant import tenant_of_request
from .serving_patch import make_wrapper
from .staging import stage

HOOK = "completion_rewrite"


@faults.stall_watched(HOOK)
def rewrite(request: Any, raw_request: Any = None, serving: Any = None) -> str | PendingCommit | None:
    """Same return contract as ``chat_rewrite.rewrite``."""
    original_prompt = getattr(request, "prompt", None)
    try:
        faults.check_fault(HOOK)
        headers = getattr(raw_request, "headers", None) if raw_request is not None else None
        # The chat paths' checks (conversation id included, though unused here).
        marks = find_marks(getattr(request, "model_extra", None), None, headers)
        if marks is None:
            return None
        blocks = marks.blocks
        prompt = getattr(request, "prompt", None)
        if not isinstance(prompt, str):
            metrics.inc("requests_passed_through")
            return None
        prep = runtime.pipeline().prepare(blocks, conversation_id=None, namespace="completion",
                                          tenant=tenant_of_request(headers, request))
        new_prompt = f"{prep.context_text}\n\n{prompt}" if prompt else prep.context_text
        hints, pending = stage(HOOK, request, raw_request, serving, prep, "cmpl-", 0, len(blocks))
        request.prompt = new_prompt
        request.vllm_xargs = hints
        return pending
    except InvalidBlocks as exc:
        metrics.inc("requests_rejected")
        return f"cp_engine: {exc}"
    except Exception as exc:
        faults.record_failure(HOOK, exc)
        _fallback(request, original_prompt)
        return None


def _fallback(request: Any, prompt: Any) -> None:
    """After a failure: the blocks plainly, in given order, before the prompt (as chat
    does, and as the flags-off pipeline renders them), so no context is lost."""
    try:
        blocks = (getattr(request, "model_extra", None) or {}).get(BLOCKS_FIELD)
        if isinstance(blocks, list) and blocks and all(isinstance(b, str) for b in blocks) \
                and isinstance(prompt, str):
            text = "\n\n".join(blocks)
            request.prompt = f"{text}\n\n{prompt}" if prompt else text
    except Exception:
        pass


# The patch table's completion_rewrite row wraps OpenAIServingCompletion.create_completion with this.
wrapper = make_wrapper(HOOK, rewrite)
