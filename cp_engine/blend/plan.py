"""The scheduler-side reuse decision for one request, and which blocks to store after it.

``plan_reuse`` takes the prompt ids, the located block spans (``spans.locate_spans``),
the engine's prefix-cache hit in tokens, the engine's KV block size, the store's
``contains`` and the selection settings, and returns a ``ReusePlan``:

- **claim**: ``[hit, end)``, where ``hit`` is the engine's prefix-cache hit and ``end``
  the end of the last stored block after it, capped at ``len(prompt) - 1`` (the engine
  always computes the last prompt token). Anything after the last stored block (the
  question, later unstored blocks) is left to the engine. The start is block-aligned
  because the engine's hit is; the end is not rounded: the engine allocates whole KV
  blocks for the claim anyway, the connector writes exactly the claimed token slots, and
  the engine computes the rest of a partly claimed last block itself. Rounding the end
  down would drop up to ``block_size - 1`` reused tokens per request; rounding it up
  would claim tokens no stored block covers.
- **reused**: per stored block in the claim, its store key, the destination span in the
  prompt and the offset into the stored entry (non-zero only for a block that starts
  inside the engine's hit: its tokens after the hit are reused).
- **recompute**: ``select_recompute`` over the claim. Claimed tokens no stored block
  covers (labels, separators, blocks not stored) are always recomputed; of the reused
  ones, ``ceil(ratio * reused)`` by the mode. With ``lead_of`` (the lead digest each
  entry was stored with, ``leads``), a block whose lead is the same as its entry's is
  *carried*: kept whole, outside the ratio's base, below ratio 1. Their count does not depend on the K
  deviation, so the scheduler knows it; the positions of modes that rank by deviation
  are picked by the worker with ``ReusePlan.selection(deviation)``.
- **counts**: claimed, reused (claimed tokens taken from the store, not recomputed),
  recomputed (claimed tokens computed by the connector through every layer). Where the
  worker must measure the K deviation to pick positions (``needs_deviation``), it runs
  every claimed token through the check layers first; ``full_depth_tokens`` adds that
  work in whole-model tokens.

The plan is empty (nothing claimed) when no stored block ends after the hit, or when it
would save fewer than ``MIN_SAVED_TOKENS`` tokens.

**Cost-aware end.** A token blend recomputes runs outside the engine's batch, layer by
layer, and may cost more than one the engine computes (``recompute_cost``, in engine
tokens). Ending the claim at the end of stored block ``j`` then saves, in engine tokens,
``covered_j * (1 - cost * ratio) - uncovered_j * (cost - 1)`` (covered: claimed tokens
stored blocks cover, a carried block's counted at ratio 0; uncovered: the others, which
blend must recompute). The claim ends
where that is largest (the latest such block on ties), and nothing is claimed when it
is not positive. At cost 1 it is ``covered_j * (1 - ratio)``, largest at the last
stored block: the plain rule above.

``blocks_to_store`` is the store side: the located blocks of a finished request that
the store does not hold yet, each once, whose KV the request computed exactly: every
token before its first stitched token (a plan's first reused block). Blocks after it
attend to approximate KV; ``after_stitched=True`` stores them too (not reused ones).

Pure functions of their inputs; NumPy only. ``key_of`` maps a block's token ids to its
store key (e.g. ``lambda ids: keys.block_key(layout, scope, ids)``); ``contains`` answers
for such a key (``BlockKVStore.contains`` fits).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

import numpy as np

from .leads import lead_digests
from .selection import MODES, Selection, select_recompute

__all__ = ["MIN_SAVED_TOKENS", "ReusedBlock", "ReusePlan", "plan_reuse", "blocks_to_store", "plan_from_config"]

# A plan that saves fewer tokens than this is not made. Every reuse is approximate and
# costs a store lookup, a copy into the paged cache and a pass of the recomputed tokens
# through every layer outside the engine's batch; 32 tokens is a quarter of one
# 128-token CPU KV block (two 16-token GPU blocks) and well under what one reused
# paragraph saves at any ratio below 0.7 (~100+ tokens), so only plans that reuse
# scraps (a few tokens of a block cut by the hit) are dropped.
MIN_SAVED_TOKENS = 32

Span = "tuple[int, int] | None"


def _identity_key(ids: Sequence[int]) -> Hashable:
    return tuple(int(t) for t in ids)


@dataclass(frozen=True)
class ReusedBlock:
    """A stored block's KV put at ``[start, end)`` of the prompt, taken from entry
    ``key`` at ``[offset, offset + end - start)`` (its positions normalised to 0);
    ``carried``: the entry was computed behind the same lead (module docstring)."""

    key: Any
    start: int
    end: int
    offset: int = 0
    carried: bool = False


@dataclass(frozen=True)
class ReusePlan:
    """What the connector claims for one request (see module docstring).

    ``claim_start``/``claim_end`` are absolute prompt positions; an empty plan has
    ``claim_end == claim_start`` and no blocks. ``reason`` says why a plan is empty.
    """

    claim_start: int
    claim_end: int
    blocks: tuple[ReusedBlock, ...] = ()
    ratio: float = 0.0
    mode: str = "both"
    first_tokens: int = 16
    recomputed: int = 0
    needs_deviation: bool = False
    reason: str = ""
    _spans: tuple[tuple[int, int], ...] = field(default=(), repr=False)

    @property
    def claimed(self) -> int:
        return self.claim_end - self.claim_start

    @property
    def reused(self) -> int:
        """Claimed tokens whose stored KV is kept (not recomputed)."""
        return self.claimed - self.recomputed

    @property
    def empty(self) -> bool:
        return self.claimed == 0

    @property
    def first_stitched(self) -> int | None:
        """Prompt position of the first token whose KV comes from the store (None: none)."""
        return self.blocks[0].start if self.blocks else None

    def full_depth_tokens(self, num_layers: int, full_layers: int) -> float:
        """The connector's compute in whole-model tokens: the recomputed tokens, plus the
        kept tokens' pass through the ``full_layers`` layers every claimed token outside
        a carried block runs through when the deviation is measured."""
        if num_layers <= 0 or full_layers < 0:
            raise ValueError("num_layers must be positive and full_layers non-negative")
        checked = self.reused - self.carried_tokens  # carried tokens are never ranked, so never checked
        extra = checked * min(full_layers, num_layers) / num_layers if self.needs_deviation else 0.0
        return self.recomputed + extra

    def checked_positions(self) -> np.ndarray:
        """Prompt positions that pass the check layers when the deviation is measured:
        every claimed token outside a carried block (sorted)."""
        keep = np.ones(self.claimed, dtype=bool)
        if self.ratio < 1.0:
            for b in self.blocks:
                if b.carried:
                    keep[b.start - self.claim_start:b.end - self.claim_start] = False
        return np.flatnonzero(keep) + self.claim_start

    def selection(self, deviation: Sequence[float] | None = None) -> Selection:
        """The recompute choice with positions absolute in the prompt. ``deviation``
        (one value per claimed token) is needed where the mode ranks by it."""
        sel = select_recompute(self.claimed, self._spans, self.ratio, self.mode, self.first_tokens, deviation,
                               [b.carried for b in self.blocks])
        return Selection(sel.positions + self.claim_start, sel.uncovered, sel.first_tokens, sel.deviation,
                         sel.carried)

    @property
    def carried_tokens(self) -> int:
        """Claimed tokens kept whole because their block is carried (0 at ratio 1)."""
        return 0 if self.ratio >= 1.0 else sum(b.end - b.start for b in self.blocks if b.carried)


def plan_reuse(prompt_ids: Sequence[int], spans: Sequence[Span], prefix_hit: int, block_size: int,
               contains: Callable[[Any], bool], *, ratio: float, mode: str = "both", first_tokens: int = 16,
               key_of: Callable[[Sequence[int]], Any] = _identity_key, recompute_cost: float = 1.0,
               lead_of: Callable[[Any], str | None] | None = None,
               leads: Sequence[str | None] | None = None) -> ReusePlan:
    """See module docstring. ``spans`` are the blocks' ``(start, end)`` in ``prompt_ids``
    in order, ``None`` for a block not found; ``prefix_hit`` must be a multiple of
    ``block_size`` within the prompt; ``lead_of(key)`` is the lead digest the entry was
    stored with (None: unknown, never carried); ``leads`` are this prompt's
    ``lead_digests`` when the caller has them already (computed here otherwise)."""
    n = len(prompt_ids)
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size!r}")
    if prefix_hit < 0 or prefix_hit % block_size or prefix_hit > n:
        raise ValueError(f"prefix_hit {prefix_hit!r} must be a multiple of block_size {block_size} within [0, {n}]")
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} unknown; one of {', '.join(MODES)}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be within [0, 1], got {ratio!r}")
    if not recompute_cost >= 0.0:
        raise ValueError(f"recompute_cost must be a non-negative number, got {recompute_cost!r}")
    limit = n - 1  # the engine computes the last prompt token itself
    settings = dict(ratio=float(ratio), mode=mode, first_tokens=int(first_tokens))
    blocks: list[ReusedBlock] = []
    last_end = 0
    if lead_of is None:
        leads = None
    elif leads is None:
        leads = lead_digests(prompt_ids, spans)
    elif len(leads) != len(spans):
        raise ValueError(f"leads has {len(leads)} entries for {len(spans)} spans")
    for i, span in enumerate(spans):
        if span is None:
            continue
        start, end = int(span[0]), int(span[1])
        if not (last_end <= start < end <= n):
            raise ValueError(f"spans must be sorted, non-empty, disjoint and inside the prompt: {span!r}")
        last_end = end
        lo, hi = max(start, prefix_hit), min(end, limit)
        if lo >= hi:
            continue  # inside the engine's hit, or only the last prompt token
        key = key_of(prompt_ids[start:end])
        if contains(key):
            carried = leads is not None and leads[i] is not None and lead_of(key) == leads[i]
            blocks.append(ReusedBlock(key, lo, hi, lo - start, carried))
    if not blocks:
        return ReusePlan(prefix_hit, prefix_hit, reason="no stored block after the prefix hit", **settings)
    if recompute_cost != 1.0:
        blocks = _worth_claiming(blocks, prefix_hit, ratio, recompute_cost)
        if not blocks:
            return ReusePlan(prefix_hit, prefix_hit, reason=f"saves no time at recompute cost {recompute_cost:g}",
                             **settings)
    claim_end = blocks[-1].end
    rel = tuple((b.start - prefix_hit, b.end - prefix_hit) for b in blocks)
    lengths = np.array([e - s for s, e in rel])
    covered = int(lengths.sum())
    # The counts follow select_recompute's budget; they do not depend on the ranking.
    if ratio < 1.0:
        lengths = lengths[[not b.carried for b in blocks]]  # carried blocks are outside the budget
    ranked = int(lengths.sum())
    budget = min(ranked, math.ceil(ratio * ranked - 1e-9))
    leading = int(np.minimum(lengths, first_tokens).sum()) if mode == "both" else 0
    needs_dev = mode != "first_tokens" and leading < budget < ranked
    recomputed = (claim_end - prefix_hit - covered) + budget
    plan = ReusePlan(prefix_hit, claim_end, tuple(blocks), recomputed=recomputed, needs_deviation=needs_dev,
                     _spans=rel, **settings)
    if plan.reused < MIN_SAVED_TOKENS:
        return ReusePlan(prefix_hit, prefix_hit, reason=f"saves {plan.reused} < {MIN_SAVED_TOKENS} tokens",
                         **settings)
    return plan


def _worth_claiming(blocks: list[ReusedBlock], prefix_hit: int, ratio: float, cost: float) -> list[ReusedBlock]:
    """The leading stored blocks whose claim saves the most engine-token time (module
    docstring); empty when no end saves any."""
    best, best_j, covered, saved_covered = 0.0, -1, 0, 0.0
    for j, b in enumerate(blocks):
        covered += b.end - b.start
        saved_covered += (b.end - b.start) * (1.0 if b.carried and ratio < 1.0 else 1.0 - cost * ratio)
        uncovered = b.end - prefix_hit - covered
        saved = saved_covered - uncovered * (cost - 1.0)
        if saved > 0 and saved >= best:
            best, best_j = saved, j
    return blocks[:best_j + 1]


def blocks_to_store(prompt_ids: Sequence[int], spans: Sequence[Span], contains: Callable[[Any], bool],
                    plan: ReusePlan | None = None, key_of: Callable[[Sequence[int]], Any] = _identity_key,
                    after_stitched: bool = False) -> list[tuple[Any, tuple[int, int]]]:
    """``(key, (start, end))`` of each located block worth storing after the request ran:
    not held by the store, not reused from it by ``plan``, ending at or before ``plan``'s
    first stitched token unless ``after_stitched``, each key once, in prompt order."""
    reused = {b.key for b in plan.blocks} if plan is not None else set()
    exact_end = len(prompt_ids) if plan is None or plan.first_stitched is None or after_stitched \
        else plan.first_stitched
    seen: set = set()
    out = []
    for span in spans:
        if span is None:
            continue
        start, end = int(span[0]), int(span[1])
        if not 0 <= start < end <= len(prompt_ids):
            raise ValueError(f"span {span!r} is outside the prompt of {len(prompt_ids)} tokens")
        if end > exact_end:
            break  # this block and every later one attend to stitched KV
        key = key_of(prompt_ids[start:end])
        if key in reused or key in seen or contains(key):
            continue
        seen.add(key)
        out.append((key, (start, end)))
    return out


def plan_from_config(config: Any, prompt_ids: Sequence[int], spans: Sequence[Span], prefix_hit: int,
                     block_size: int, contains: Callable[[Any], bool],
                     key_of: Callable[[Sequence[int]], Any] = _identity_key) -> ReusePlan:
    """``plan_reuse`` with ``CP_ENGINE_BLEND_RATIO``/``_MODE``/``_FIRST_TOKENS``/``_RECOMPUTE_COST`` from ``config``."""
    return plan_reuse(prompt_ids, spans, prefix_hit, block_size, contains, ratio=config.blend_ratio,
                      mode=config.blend_mode, first_tokens=config.blend_first_tokens, key_of=key_of,
                      recompute_cost=config.blend_recompute_cost)
