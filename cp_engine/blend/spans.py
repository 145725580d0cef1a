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
  correctness;
- ``encode_cut(encode, text, ranges, cache)`` is ``encode_segments`` for a prompt that
  already exists as text: it cuts ``text`` at the blocks' character ranges, takes each
  block's ids from a ``TokenCache`` (a bounded LRU, so a block is tokenized once while
  it stays popular) and tokenizes only the text between them;
- ``concatenates_cleanly(encode, decode)`` tells whether a tokenizer's pieces, tokenized
  apart and joined, still read as the joined text (false for tokenizers that prefix
  every encoded text with a space); only then may a prompt be sent as cut ids.
``encode`` is any ``str -> list[int]`` without special-token additions, e.g.
``lambda s: tok.encode(s, add_special_tokens=False)``.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

__all__ = ["Segment", "Rendered", "TokenCache", "encode_segments", "encode_cut", "boundary_merges",
           "locate_spans", "concatenates_cleanly"]

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


class TokenCache:
    """Bounded LRU of block text -> ids (an int32 array), for one tokenizer.

    Bounded by the tokens it holds (``max_tokens``); a text longer than the bound is
    encoded but not kept. Thread-safe: the API server tokenizes on worker threads.
    """

    def __init__(self, encode: Encode, max_tokens: int = 1 << 21):
        self._encode = encode
        self.max_tokens = int(max_tokens)
        self._entries: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.tokens = 0
        self.hits = 0
        self.misses = 0

    def ids(self, text: str) -> np.ndarray:
        with self._lock:
            found = self._entries.get(text)
            if found is not None:
                self._entries.move_to_end(text)
                self.hits += 1
                return found
        ids = np.asarray([int(t) for t in self._encode(text)], dtype=np.int32)
        ids.flags.writeable = False
        with self._lock:
            self.misses += 1
            if ids.size > self.max_tokens or text in self._entries:
                return ids
            self._entries[text] = ids
            self.tokens += ids.size
            while self.tokens > self.max_tokens:
                _, old = self._entries.popitem(last=False)
                self.tokens -= old.size
        return ids

    def __len__(self) -> int:
        return len(self._entries)


def encode_cut(encode: Encode, text: str, ranges: Sequence[tuple[int, int]],
               cache: TokenCache) -> Rendered:
    """``text`` tokenized as segments cut at the block character ``ranges`` (sorted,
    disjoint, non-empty, inside ``text``): each block's ids come from ``cache``, the
    text around them from ``encode``. ``spans[i]`` is block ``i``'s place in ``ids``.
    Raises ``ValueError`` for ranges that are not so, or a block with no tokens."""
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    for start, end in ranges:
        if not pos <= start < end <= len(text):
            raise ValueError(f"block range {(start, end)} is not sorted, disjoint and inside the text")
        if start > pos:
            ids.extend(int(t) for t in encode(text[pos:start]))
        block = cache.ids(text[start:end])
        if not block.size:
            raise ValueError("a block segment tokenizes to no tokens")
        spans.append((len(ids), len(ids) + int(block.size)))
        ids.extend(block.tolist())
        pos = end
    if pos < len(text):
        ids.extend(int(t) for t in encode(text[pos:]))
    return Rendered(ids, spans)


# Cuts the prompts really have: a label or newline before a block, punctuation and a
# blank line after it, a space-led word, a multi-byte character.
_PROBES = (("<|im_start|>user\n", "Paris is"), ("[1] ", "text"), ("end.", "\n\nNext"),
           ("a\n\n", " spaced"), ("caf", "é au lait"), ("x = 1", "\n"))


def concatenates_cleanly(encode: Encode, decode: Callable[[Sequence[int]], str]) -> bool:
    """Whether ids of pieces tokenized apart decode to the joined text, as the joined
    text's own ids do, on a set of typical cuts. Never raises (False on error)."""
    try:
        for left, right in _PROBES:
            apart = [int(t) for t in encode(left)] + [int(t) for t in encode(right)]
            if decode(apart) != decode([int(t) for t in encode(left + right)]):
                return False
        return True
    except Exception:
        return False
