"""Where each context block's exact tokens sit in a prompt.

A stored block is reused only where its exact token ids appear, so a block must
tokenize to the same ids wherever it is placed. BPE tokenizers can merge across a
boundary (``"abc" + "def"`` is one word; ``"\\n\\n" + "Doc"`` splits its whitespace
differently), so a prompt built as text and tokenized whole may hold none of its
blocks' ids. Hence:
- ``encode_segments(encode, segments)`` tokenizes each segment (block, label,
  separator) on its own and concatenates the ids: blocks keep their ids by
  construction; the engine must then receive these ids, not the text;
- ``boundary_merges(encode, segments)`` names the boundaries where tokenizing the
  joined text would differ (for callers that must send text);
- ``locate_spans(prompt_ids, blocks)`` finds each block's ids in the prompt, in order;
  a block not found verbatim is ``None`` (never reused), so a merge costs reuse, never
  correctness.
``encode`` is any ``str -> list[int]`` without special-token additions, e.g.
``lambda s: tok.encode(s, add_special_tokens=False)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

__all__ = ["Segment", "Rendered", "encode_segments", "boundary_merges", "locate_spans"]

Encode = Callable[[str], Sequence[int]]


@dataclass(frozen=True)
class Segment:
    """A piece of the prompt text; ``block`` marks a context block (stored and reused)."""

    text: str
    block: bool = False


@dataclass(frozen=True)
class Rendered:
    """Prompt ids and, per block segment in order, its ``(start, end)`` in them."""

    ids: list[int]
    spans: list[tuple[int, int]]


def encode_segments(encode: Encode, segments: Sequence[Segment]) -> Rendered:
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    for seg in segments:
        part = [int(t) for t in encode(seg.text)]
        if seg.block:
            if not part:
                raise ValueError("a block segment tokenizes to no tokens")
            spans.append((len(ids), len(ids) + len(part)))
        ids.extend(part)
    return Rendered(ids, spans)


def boundary_merges(encode: Encode, segments: Sequence[Segment]) -> list[int]:
    """Indices ``i`` of boundaries (between segment ``i-1`` and ``i``) that tokenize
    differently joined than apart (every boundary when only the whole joined prompt
    differs); empty when the joined text keeps every boundary."""
    pieces = [[int(t) for t in encode(s.text)] for s in segments]
    merged = []
    for i in range(1, len(segments)):
        joined = [int(t) for t in encode(segments[i - 1].text + segments[i].text)]
        if joined != pieces[i - 1] + pieces[i]:
            merged.append(i)
    if not merged and segments:
        # pairs can agree while a longer stretch still differs; compare the whole prompt
        whole = [int(t) for t in encode("".join(s.text for s in segments))]
        if whole != [t for p in pieces for t in p]:
            merged = list(range(1, len(segments)))
    return merged


def locate_spans(prompt_ids: Sequence[int], blocks: Sequence[Sequence[int]]) -> list[tuple[int, int] | None]:
    """``(start, end)`` of each block's exact ids in ``prompt_ids``, searched in order
    from the end of the previous block found; ``None`` where a block does not appear."""
    prompt = np.asarray(prompt_ids, dtype=np.int64)
    out: list[tuple[int, int] | None] = []
    pos = 0
    for block in blocks:
        ids = np.asarray(block, dtype=np.int64)
        found = None
        if ids.size:
            for start in np.flatnonzero(prompt[pos:] == ids[0]) + pos:
                end = start + ids.size
                if end <= prompt.size and np.array_equal(prompt[start:end], ids):
                    found = (int(start), int(end))
                    break
        out.append(found)
        if found is not None:
            pos = found[1]
    return out
