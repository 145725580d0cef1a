"""Prompt rewrite for ``/v1/completions`` (single text prompt only).

Patched symbol: ``OpenAIServingCompletion.create_completion(request, raw_request)``
(row ``completion_rewrite`` of ``hooks/vllm/table.py``).
A string ``prompt`` with ``context_blocks`` becomes ``context_text + "\\n\\n" + prompt``
(reordered and annotated; no per-conversation dedup: a completion prompt carries no
history the reference hints could point to). Lists of prompts or token ids pass through
unchanged (counted in ``requests_passed_through``). ``context_suffix`` goes after the
prompt (``prompt + "\n\n" + suffix``), ``context_keep_order``, blend's plan and the
data-parallel rank choice (``hooks/vllm/dp_rank.py``) work as in ``chat_rewrite``. Same
400 / fail-open rules as chat (a failed rewrite still puts the blocks, in given order,
before the prompt and the suffix after it).
"""
from __future__ import annotations

from typing import Any

from cp_engine.blend.marks import context_anchor, read_blend_marks, suffix_anchor, with_suffix
from cp_engine.blocks import block_id
from cp_engine.marking import BLOCKS_FIELD, InvalidBlocks, find_marks, may_carry_marks
from cp_engine.pipeline import validate_blocks
from .. import faults, metrics, runtime
from ..acceptance import PendingCommit
from ..tenant import tenant_of_request
from .blend_spans import activate, attach, make_plan
from .dp_rank import RankChoice
from .serving_patch import make_wrapper, request_headers
from .staging import keep_order, stage

HOOK = "completion_rewrite"


def passes_through(request: Any, raw_request: Any = None) -> bool:
    """True where ``rewrite`` would return None with ``request`` as it came: it carries
    nothing of ours and no fault is injected into this hook (``serving_patch``)."""
    return not (may_carry_marks(getattr(request, "model_extra", None), None, request_headers(raw_request))
                or faults.injecting(HOOK))


@faults.stall_watched(HOOK, cpu=True)
def rewrite(request: Any, raw_request: Any = None, serving: Any = None) -> str | PendingCommit | None:
    """Same return contract as ``chat_rewrite.rewrite``."""
    original_prompt = getattr(request, "prompt", None)
    try:
        faults.check_fault(HOOK)
        headers = request_headers(raw_request)
        extra = getattr(request, "model_extra", None)
        # The chat paths' checks (conversation id included, though unused here).
        marks = find_marks(extra, None, headers)
        suffix = suffix_anchor(read_blend_marks(extra).suffix)
        if marks is None and not suffix.text:
            return None
        prompt = getattr(request, "prompt", None)
        if not isinstance(prompt, str):
            metrics.inc("requests_passed_through")
            return None
        tenant = tenant_of_request(headers, request)
        pending: PendingCommit | None = None
        hints = getattr(request, "vllm_xargs", None)
        anchors = [suffix]
        ranks: RankChoice | None = None
        new_prompt = prompt
        if marks is not None:
            blocks = marks.blocks
            namespace = "completion"
            ranks = RankChoice.for_request(serving, raw_request, runtime.pipeline().index)
            if ranks is not None:
                namespace = ranks.namespace(namespace, [block_id(t) for t in validate_blocks(blocks)])
            prep = runtime.pipeline().prepare(blocks, conversation_id=None, namespace=namespace,
                                              tenant=tenant, keep_order=keep_order(extra))
            new_prompt = f"{prep.context_text}\n\n{prompt}" if prompt else prep.context_text
            anchors.insert(0, context_anchor(prep.context_text, prep.order, prep.full, blocks))
            hints, pending = stage(HOOK, request, raw_request, serving, prep, "cmpl-", 0, len(blocks))
        plan = make_plan(anchors, tenant)
        request.prompt = with_suffix(new_prompt, suffix)
        request.vllm_xargs = attach(plan, hints)
        if ranks is not None:
            ranks.pin()
        activate(plan)
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
    does, and as the flags-off pipeline renders them), and the suffix after it, so no
    context is lost."""
    try:
        extra = getattr(request, "model_extra", None) or {}
        if not isinstance(prompt, str):
            return
        blocks = extra.get(BLOCKS_FIELD)
        new = prompt
        if isinstance(blocks, list) and blocks and all(isinstance(b, str) for b in blocks):
            text = "\n\n".join(blocks)
            new = f"{text}\n\n{prompt}" if prompt else text
        try:
            new = with_suffix(new, suffix_anchor(read_blend_marks(extra).suffix))
        except InvalidBlocks:
            pass
        if new != prompt:
            request.prompt = new
    except Exception:
        pass


# The patch table's completion_rewrite row wraps OpenAIServingCompletion.create_completion with this.
wrapper = make_wrapper(HOOK, rewrite, passes_through)
