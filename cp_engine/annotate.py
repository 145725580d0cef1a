"""Rendering of context blocks and of the importance-order annotation.

Two label schemes, both prefix-stable (requests that share a prefix of blocks render
it byte-identically, hence token-identically):

- numbered, ``[3]``: the block's position among the distinct blocks of the rendered
  list. It depends only on the blocks before it, so it is as shareable as a content
  label, and it is short (3 tokens with the test tokenizer against 8). Used wherever
  the labels are only referred to inside the same prompt.
- content, ``[Doc a3f1]``: derived from the block's content id, the same in every
  request. Used in conversations, where a later turn's dedup reference names a block
  that an earlier turn sent.

The annotation lists the labels of the distinct blocks in their original
(retrieval/importance) order; callers add it only when the rendered order differs. It
goes AFTER the blocks: a per-request text in front of them would break the shared
prefix. ``parse_annotation`` recovers the order exactly; repeated blocks appear once,
at their first original position.

Everything here is sent on every request, and the annotation is never served from
cache, so the text is kept short: a numbered block costs 3 tokens more than the bare
text (``[Doc a3f1]`` and a newline cost 8), and the ranking is a space-separated line
of bare labels. Engine benchmark (Zipf, N=400, test tokenizer): the content-label
rendering with a ``>``-separated ranking had recomputed 1,029,805 prompt tokens, this
one 980,846 (``python -m benchmarks.engine.token_sim``).
"""
from __future__ import annotations

import re
from typing import Sequence

from .blocks import BlockId, short_label

ANNOTATION_HEAD = "Most relevant documents first:"
LABEL_WIDTH = 4  # hex digits; 65,536 labels, so a collision inside one request is rare
_LABEL_RE = re.compile(r"[0-9a-f]{4,16}|[0-9]{1,5}")


def labels_for(ids: Sequence[BlockId]) -> dict[BlockId, str]:
    """Stable short label per distinct id; lengthened only where two ids collide."""
    distinct = list(dict.fromkeys(ids))
    labels = {b: short_label(b, LABEL_WIDTH) for b in distinct}
    for width in (8, 16):
        by_label: dict[str, list[BlockId]] = {}
        for b, lab in labels.items():
            by_label.setdefault(lab, []).append(b)
        clashes = [b for same in by_label.values() if len(same) > 1 for b in same]
        if not clashes:
            break
        for b in clashes:
            labels[b] = short_label(b, width)
    return labels


def numbered_labels(rendered_ids: Sequence[BlockId]) -> dict[BlockId, str]:
    """``"1"``, ``"2"``, ... by first appearance in the rendered order."""
    return {b: str(n) for n, b in enumerate(dict.fromkeys(rendered_ids), start=1)}


def _header(label: str, numbered: bool) -> str:
    return f"[{label}]" if numbered else f"[Doc {label}]"


def render_block(label: str, text: str, numbered: bool = False) -> str:
    # A number fits on the text's first line ("[3] text"): one token fewer than a newline.
    sep = " " if numbered else "\n"
    return f"{_header(label, numbered)}{sep}{text}"


def render_reference(label: str, numbered: bool = False) -> str:
    """Dedup hint: names the block by its short label, never repeats its text."""
    return f"{_header(label, numbered)} (shown above)"


def render_annotation(labels_in_original_order: Sequence[str]) -> str:
    ranked = " ".join(dict.fromkeys(labels_in_original_order))
    return f"{ANNOTATION_HEAD} {ranked}."


def parse_annotation(text: str) -> list[str]:
    """Labels in the order an annotation states (the inverse of ``render_annotation``)."""
    at = text.rfind(ANNOTATION_HEAD)
    if at < 0:
        return []
    line = text[at + len(ANNOTATION_HEAD):].split("\n", 1)[0].strip().rstrip(".")
    return [lab for lab in line.split() if _LABEL_RE.fullmatch(lab)]
