"""Rendering of context blocks and of the importance-order annotation.

Every block is rendered with a label derived from its content id, never from its
position, so the same block renders to the same text in every request and shared
blocks form byte-identical (hence token-identical) prompt prefixes.

The annotation lists the labels of the distinct blocks in their original
(retrieval/importance) order; callers add it only when the rendered order differs. It goes AFTER the blocks: a per-request text in front
of them would break the shared prefix. ``parse_annotation`` recovers the order
exactly; repeated blocks appear once, at their first original position.

Everything here is sent on every request, and the annotation is never served from
cache, so the text is kept short: 4-hex labels (lengthened only where two blocks of
one request collide) and a one-line ranking by bare label. Measured on the served
tokenizer, 8-hex labels and bracketed rankings had added ~10% prompt tokens.
"""
from __future__ import annotations

import re
from typing import Sequence

from .blocks import BlockId, short_label

ANNOTATION_HEAD = "Documents ranked by relevance, most relevant first:"
ANNOTATION_TAIL = "Rely most on higher-ranked documents."
LABEL_WIDTH = 4  # hex digits; 65,536 labels, so a collision inside one request is rare
_LABEL_RE = re.compile(r"[0-9a-f]{4,16}")


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


def render_block(label: str, text: str) -> str:
    return f"[Doc {label}]\n{text}"


def render_reference(label: str) -> str:
    """Dedup hint: names the block by its short label, never repeats its text."""
    return f"[Doc {label}] (shown above)"


def render_annotation(labels_in_original_order: Sequence[str]) -> str:
    ranked = " > ".join(dict.fromkeys(labels_in_original_order))
    return f"{ANNOTATION_HEAD} {ranked}. {ANNOTATION_TAIL}"


def parse_annotation(text: str) -> list[str]:
    """Labels in the order an annotation states (the inverse of ``render_annotation``)."""
    at = text.rfind(ANNOTATION_HEAD)
    if at < 0:
        return []
    line = text[at + len(ANNOTATION_HEAD):].split("\n", 1)[0]
    ranking = line.split(". ", 1)[0]
    return [lab for lab in (part.strip(" .") for part in ranking.split(">")) if _LABEL_RE.fullmatch(lab)]
