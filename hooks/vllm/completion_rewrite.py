"""Prompt rewrite for ``/v1/completions`` (single text prompt only).

Patched symbol: ``OpenAIServingCompletion.create_completion(request, raw_request)``.
A string ``prompt`` with ``context_blocks`` becomes ``context_text + "\\n\\n" + prompt``
(reordered and annotated; no per-conversation dedup: a completion prompt carries no
history the reference hints could point to). Lists of prompts or token ids pass through
unchanged (counted in ``requests_passed_through``). Same 400 / fail-open rules as chat.
"""
from __future__ import annotations

from typing import Any

from .. import faults, ledger, metrics, runtime
from ..marking import BLOCKS_FIELD, InvalidBlocks
from . import xargs
from .serving_patch import MethodPatch
from .chat_rewrite import _count, request_id_for, token_ratio, tokenizer_of

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
    upstream="vllm/entrypoints/openai/completion/serving.py (serving_completion.py before 0.31)",
    remove_when="vLLM exposes a request pre-processing plugin hook for the OpenAI server",
))


def rewrite(request: Any, raw_request: Any = None, serving: Any = None) -> str | None:
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
        pipe = runtime.pipeline()
        prep = pipe.prepare(blocks, conversation_id=None, tenant=getattr(request, "cache_salt", None) or "",
                            namespace="completion")
        rid = request_id_for("cmpl-", request, raw_request)
        hints = dict(getattr(request, "vllm_xargs", None) or {})
        token_ratio.observe(tokenizer_of(serving), prep.context_text)
        hints.update(xargs.build_xargs(prep, rid, 0, scale=token_ratio.scale()))
        new_prompt = f"{prep.context_text}\n\n{prompt}" if prompt else prep.context_text
        pipe.commit(rid, prep, base_offset=0)
        request.prompt = new_prompt
        request.vllm_xargs = hints
        _count(prep, len(blocks))
        return None
    except InvalidBlocks as exc:
        metrics.inc("requests_rejected")
        return f"cp_engine: {exc}"
    except Exception as exc:
        faults.record_failure(HOOK, exc)
        return None


_PATCH = MethodPatch(HOOK, MODULES, CLASS, METHOD, rewrite)
install = _PATCH.install
uninstall = _PATCH.uninstall
