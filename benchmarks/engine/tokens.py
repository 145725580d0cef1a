"""Tokenizer plumbing: the served model's token counts for the batch planner's block
weights, and the model id a running server reports."""
from __future__ import annotations

import sys
from typing import Callable

from benchmarks.common.live import Remote


def block_token_counter(tokenizer: str | None) -> Callable[[str], int] | None:
    """Token count of a block's text by the served model's tokenizer (a folder or a
    name transformers can load offline), for the batch planner's weights; None when it
    cannot be loaded here (the planner then estimates characters/4)."""
    if not tokenizer:
        return None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
    except Exception as exc:  # a GPU user's model may live only on the server
        print(f"[engine] tokenizer {tokenizer!r} not loadable here ({exc!r:.200}): block tokens estimated",
              file=sys.stderr, flush=True)
        return None
    return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])


def served_model_name(url: str | None) -> str | None:
    """The model id a running server reports (its path when served from a folder), or None."""
    if not url:
        return None
    try:
        return Remote(url).model
    except Exception as exc:  # the arms report an unreachable server themselves
        print(f"[engine] no model id from {url} ({exc!r:.200})", file=sys.stderr, flush=True)
        return None

