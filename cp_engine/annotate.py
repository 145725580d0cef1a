"""Rendering of context blocks and of the importance-order annotation.

Every block is rendered with a label derived from its content id, never from its
position, so the same block renders to the same text in every request and shared
blocks form byte-identical (hence token-identical) prompt prefixes.

The annotation lists the labels of the distinct blocks in their original
(retrieval/importance) order. It goes AFTER the blocks: a per-request text in front
of them would break the shared prefix. ``parse_annotation`` recovers the order
exactly; repeated blocks appear once, at their first original position.
"""
from __future__ import annotations

import re
from typing import Sequence

from .blocks import BlockId, short_label

ANNOTATION_HEAD = "Relevance ranking of the documents above, most relevant first:"
ANNOTATION_TAIL = "Rely most on higher-ranked documents."
_LABEL_RE = re.compile(r"\[Doc ([0-9a-f]{8,16})\]")


def labels_for(ids: Sequence[BlockId]) -> dict[BlockId, str]:
    """Stable short label per distinct id; lengthened only where two ids collide."""
    distinct = list(dict.fromkeys(ids))
    labels = {b: short_label(b, 8) for b in distinct}
    by_label: dict[str, list[BlockId]] = {}
    for b, lab in labels.items():
        by_label.setdefault(lab, []).append(b)
    for same in by_label.values():
        if len(same) > 1:
            for b in same:
                labels[b] = short_label(b, 16)
    return labels


def render_block(label: str, text: str) -> str:
    return f"[Doc {label}]\n{text}"


def render_reference(label: str) -> str:
    """Dedup hint: names the block by its short label, never repeats its text."""
    return f"[Doc {label}] (shown earlier above; not repeated)"


def render_annotation(labels_in_original_order: Sequence[str]) -> str:
    ranked = " > ".join(f"[Doc {lab}]" for lab in dict.fromkeys(labels_in_original_order))
    return f"{ANNOTATION_HEAD} {ranked}. {ANNOTATION_TAIL}"


def parse_annotation(text: str) -> list[str]:
    """Labels in the order an annotation states (the inverse of ``render_annotation``)."""
    at = text.rfind(ANNOTATION_HEAD)
    if at < 0:
        return []
    line = text[at + len(ANNOTATION_HEAD):].split("\n", 1)[0]
    return _LABEL_RE.findall(line)
