"""The request fields that shape a blended prompt, and where its blocks sit in the text.

Engine-neutral; read beside ``cp_engine.marking`` (which finds ``context_blocks``):
- ``context_suffix`` (list of non-empty strings): blocks that follow the part of the
  prompt that changes from turn to turn (CacheSlide's agent pattern: system prompt, a
  segment of a new length every turn, then memory and history in a fixed order). They
  are rendered verbatim after the last user turn's content (chat) or after the prompt
  (completions), in the given order, joined by a blank line: never reordered, labelled
  or de-duplicated. With blend on each gets a span, so its KV is reused at whatever
  position the changing segment pushes it to.
- ``context_keep_order`` (bool): render ``context_blocks`` in retrieval order, with no
  annotation (``CP_ENGINE_BLEND_KEEP_ORDER=1`` makes it the default).
``read_blend_marks`` raises ``InvalidBlocks`` (HTTP 400) naming the field.

``Anchor`` records a piece of text the rewrite put into the prompt and the character
ranges of the blocks inside it, so the ids can be cut at the blocks once the engine has
rendered the whole prompt (``locate_anchors``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence  # (isinstance on the request path: typing's aliases check slower)
from dataclasses import dataclass
from typing import Any

from cp_engine.pipeline import InvalidBlocks, validate_blocks

__all__ = ["SUFFIX_FIELD", "KEEP_ORDER_FIELD", "SEPARATOR", "BlendMarks", "Anchor",
           "read_blend_marks", "block_ranges", "suffix_anchor", "with_suffix", "last_user_index", "context_anchor", "locate_anchors"]

SUFFIX_FIELD = "context_suffix"
KEEP_ORDER_FIELD = "context_keep_order"
SEPARATOR = "\n\n"


@dataclass(frozen=True)
class BlendMarks:
    suffix: list[str]
    keep_order: bool | None  # None: the request did not say


@dataclass(frozen=True)
class Anchor:
    """``text`` as the rewrite placed it, and its blocks' ``(start, end)`` inside it."""

    text: str
    ranges: tuple[tuple[int, int], ...]


def read_blend_marks(extra: Mapping[str, Any] | None) -> BlendMarks:
    extra = extra or {}
    raw = extra.get(SUFFIX_FIELD)
    suffix: list[str] = []
    if raw is not None:
        try:
            suffix = validate_blocks(raw)
        except InvalidBlocks as exc:
            raise InvalidBlocks(str(exc).replace("context_blocks", SUFFIX_FIELD)) from None
    keep = extra.get(KEEP_ORDER_FIELD)
    if keep is not None and not isinstance(keep, bool):
        raise InvalidBlocks(f"{KEEP_ORDER_FIELD} must be true or false, got {type(keep).__name__}")
    return BlendMarks(suffix, keep)


def block_ranges(text: str, blocks: Sequence[str]) -> tuple[tuple[int, int], ...]:
    """Character ranges of ``blocks`` found in ``text`` in order, each searched after the
    previous one's end; a block not found is left out (it gets no span)."""
    out: list[tuple[int, int]] = []
    pos = 0
    for block in blocks:
        at = text.find(block, pos) if block else -1
        if at >= 0:
            out.append((at, at + len(block)))
            pos = at + len(block)
    return tuple(out)


def context_anchor(context_text: str, order: Sequence[int], full: Sequence[bool],
                   blocks: Sequence[str]) -> Anchor:
    """The rendered context (``Prepared.context_text``) with the ranges of the blocks it
    holds in full (``order``/``full`` as ``Prepared`` gives them; references hold none)."""
    shown = [blocks[i] for i, f in zip(order, full) if f]
    return Anchor(context_text, block_ranges(context_text, shown))


def suffix_anchor(suffix: Sequence[str]) -> Anchor:
    """The suffix blocks joined by ``SEPARATOR``, with their ranges."""
    text = SEPARATOR.join(suffix)
    return Anchor(text, block_ranges(text, suffix))


def with_suffix(content: Any, anchor: Anchor) -> Any:
    """A user turn's content (or a completion prompt) with the suffix after it, keeping
    its shape: a string gets ``SEPARATOR`` and the suffix, a list of parts one more text part."""
    if not anchor.text:
        return content
    if isinstance(content, list):
        return list(content) + [{"type": "text", "text": anchor.text}]
    if content is None or content == "":
        return anchor.text
    return f"{content}{SEPARATOR}{anchor.text}"


def last_user_index(messages: Sequence[Any]) -> int:
    """Index of the last user message; ``InvalidBlocks`` when there is none."""
    for i in range(len(messages) - 1, -1, -1):
        if isinstance(messages[i], Mapping) and messages[i].get("role") == "user":
            return i
    raise InvalidBlocks(f"{SUFFIX_FIELD} needs a user message to attach to")


def locate_anchors(prompt: str, anchors: Sequence[Anchor]) -> list[tuple[int, int]]:
    """The blocks' character ranges in the rendered ``prompt``, in order.

    Anchors are placed in prompt order, so each is searched backwards from the previous
    (later) one's start: a copy of the same text earlier in the prompt (history, the
    system prompt) is not mistaken for it. An anchor not found contributes nothing.
    """
    found: list[list[tuple[int, int]]] = []
    limit = len(prompt)
    for anchor in reversed(anchors):
        if not anchor.text or not anchor.ranges:
            continue
        at = prompt.rfind(anchor.text, 0, limit)
        if at < 0:
            continue
        found.append([(at + s, at + e) for s, e in anchor.ranges])
        limit = at
    return [r for group in reversed(found) for r in group]
