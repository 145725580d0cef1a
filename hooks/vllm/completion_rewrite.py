"""Prompt rewrite for ``/v1/completions`` (single text prompt only).

Patched symbol: ``OpenAIServingCompletion.create_completion(request, raw_request)``.
A string ``prompt`` with ``context_blocks`` becomes ``context_text + "\\n\\n" + prompt``
(reordered and annotated; no per-conversation dedup: a completion prompt carries no
history the reference hints could point to). Lists of prompts or token ids pass through
unchanged (counted in ``requests_passed_through``). Same 400 / fail-open rules as chat
(a failed rewrite still puts the blocks, in given order, before the prompt).
"""
from __future__ import annotations

from typing import Any

from cp_engine.marking import BLOCKS_FIELD, InvalidBlocks
from .. import faults, ledger, metrics, runtime
from ..acceptance import PendingCommit
from ..tenant import tenant_of_request
from .serving_patch import MethodPatch
from .staging import stage

HOOK = "completion_rewrite"
MODULES = ("vllm.entrypoints.openai.completion.serving", "vllm.entrypoints.openai.serving_completion")
CLASS, METHOD = "OpenAIServingCompletion", "create_completion"

PATCH = ledger.register(ledger.Patch(
    engine="vllm",
    target=f"{MODULES[0]}.{CLASS}.{METHOD}",
    why="render marked context blocks in front of a text completion prompt",
    how="wrapt FunctionWrapper on the class attribute; edits request.prompt and request.vllm_xargs",
    min_version="0.27.0",
    max_version="0.33",
    upstream="vllm/entrypoints/openai/completion/serving.py (serving_completion.py in older layouts)",
    remove_when="vLLM exposes a request pre-processing plugin hook for the OpenAI server",
))


@faults.stall_watched(HOOK)
def rewrite(request: Any, raw_request: Any = None, serving: Any = None) -> str | PendingCommit | None:
    """Same return contract as ``chat_rewrite.rewrite``."""
    original_prompt = getattr(request, "prompt", None)
    try:
        faults.check_fault(HOOK)
        extra = getattr(request, "model_extra", None) or {}
        if extra.get(BLOCKS_FIELD) is None:
            return None
        from cp_engine.pipeline import validate_blocks

        blocks = validate_blocks(extra[BLOCKS_FIELD])
        prompt = getattr(request, "prompt", None)
        if not blocks:
            return None
        if not isinstance(prompt, str):
            metrics.inc("requests_passed_through")
            return None
        headers = getattr(raw_request, "headers", None) if raw_request is not None else None
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


_PATCH = MethodPatch(HOOK, MODULES, CLASS, METHOD, rewrite)
install = _PATCH.install
uninstall = _PATCH.uninstall
