"""User-facing helpers: build chat messages from (blocks, query), online or per batch.

Online (one request at a time, e.g. a RAG service in front of any OpenAI-compatible
server)::

    from cp_engine import build_messages
    messages = build_messages(blocks, "Who wrote it?", system="Answer briefly.")

Batch (offline)::

    from cp_engine import build_batch_messages
    batch = build_batch_messages([(blocks_1, q_1), (blocks_2, q_2), ...])
    for i, messages in batch:          # already in the cache-friendly execution order
        client.chat.completions.create(model=..., messages=messages)

Inside vLLM/SGLang with the plugin installed, send ``context_blocks`` instead and the
server does the same rewrite (see README).

Blocks are non-empty strings: a block list that is not a list of strings, or holds an
empty or whitespace-only block, raises ``InvalidBlocks`` (a ``ValueError``) with the
message the server's 400 carries, e.g. ``context_blocks[3] is empty`` (prefixed with
``items[i]: `` in a batch). An empty list is valid: the question goes out alone.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterator, Sequence

from . import planner
from .annotate import numbered_labels, render_annotation, render_block
from .blocks import block_id, estimate_tokens, token_lengths
from .config import Config, load_config
from .kernels.planning import PARTNER_SEARCH
from .pipeline import ContextPipeline, InvalidBlocks, Prepared, validate_blocks
from .planner import BatchPlan

_default: ContextPipeline | None = None
_default_lock = threading.Lock()


def default_pipeline() -> ContextPipeline:
    """Process-wide pipeline (index + dedup memory) used when none is passed."""
    global _default
    with _default_lock:
        if _default is None:
            _default = ContextPipeline(load_config())
        return _default


def build_messages(blocks: Sequence[str], query: str, system: str | None = None,
                   conversation_id: str | None = None, history: Sequence[dict] = (),
                   pipeline: ContextPipeline | None = None, request_id: Hashable | None = None) -> list[dict]:
    """Chat messages for one request: blocks reordered against what was sent before,
    de-duplicated within ``conversation_id``, annotated, then the question.

    ``history`` holds the earlier turns as the caller sent them (their original user
    text); earlier turns are replayed exactly as they were rendered.
    """
    pipe = pipeline or default_pipeline()
    messages = ([{"role": "system", "content": system}] if system is not None else []) + list(history)
    messages.append({"role": "user", "content": query})
    out, prep = pipe.rewrite_messages(messages, blocks, conversation_id=conversation_id)
    pipe.commit(request_id if request_id is not None else object(), prep)
    return out


def reorder(blocks: Sequence[str], pipeline: ContextPipeline | None = None, namespace: str = "") -> list[str]:
    """``blocks`` in the order that shares the longest prefix with what was sent before."""
    texts = validate_blocks(blocks)
    pipe = pipeline or default_pipeline()
    order = pipe.index.best_order([block_id(t) for t in texts], namespace=namespace,
                                  token_lengths=[estimate_tokens(t) for t in texts])
    return [texts[i] for i in order]


def deduplicate(conversation_id: str, blocks: Sequence[str], pipeline: ContextPipeline | None = None,
                tenant: str = "") -> list[bool]:
    """For each block: True = send in full, False = already sent in this conversation
    (or earlier in this list) and may be replaced by a reference hint. Records them."""
    texts = validate_blocks(blocks)
    pipe = pipeline or default_pipeline()
    return pipe.dedup.mark((tenant, conversation_id), [block_id(t) for t in texts], commit=True)


@dataclass(frozen=True)
class BatchMessages:
    """``messages[i]`` belongs to input i; iterate to get (i, messages) in execution order."""

    messages: list[list[dict]]
    order: list[int]
    plan: BatchPlan

    def __iter__(self) -> Iterator[tuple[int, list[dict]]]:
        return ((i, self.messages[i]) for i in self.order)

    def __len__(self) -> int:
        return len(self.order)


def render_planned(blocks: Sequence[str], planned: Sequence[str], annotate: bool = True) -> str:
    """Context text for ``planned`` (a permutation of ``blocks``), annotated with the
    original order of ``blocks``; repeated blocks are rendered once.

    Without ``annotate`` nothing refers to a block, so blocks go out unlabelled: a label
    costs ~3 prompt tokens per block that the cache serves only when the block is in a
    shared prefix (the same rule as ``ContextPipeline.prepare`` for requests outside a
    conversation, so batch-planned and online requests still share prefixes).
    """
    ids = [block_id(t) for t in blocks]
    planned_ids = [block_id(t) for t in planned]
    labels = numbered_labels(planned_ids)  # keys: the distinct planned blocks, in order
    parts = []
    done: set[int] = set()
    for b, text in zip(planned_ids, planned):
        if b not in done:
            parts.append(render_block(labels[b], text, numbered=True) if annotate else text)
            done.add(b)
    # Only a changed order needs stating (see ContextPipeline.prepare).
    if annotate and len(labels) > 1 and list(labels) != list(dict.fromkeys(ids)):
        parts.append(render_annotation([labels[b] for b in ids]))
    return "\n\n".join(parts)


def _block_token_counts(block_lists: Sequence[Sequence[str]],
                        count_tokens: Callable[[str], int] | None) -> dict[str, int]:
    """Token count per distinct block text: ``count_tokens`` where given (checked), else estimates."""
    distinct = list(dict.fromkeys(t for blocks in block_lists for t in blocks))
    given = None if count_tokens is None else [count_tokens(t) for t in distinct]
    return dict(zip(distinct, token_lengths(distinct, given)))


def _item_blocks(i: int, blocks: Any) -> list[str]:
    try:
        return validate_blocks(blocks)
    except InvalidBlocks as exc:
        raise InvalidBlocks(f"items[{i}]: {exc}") from None


def plan_batch(contexts, token_lengths=None, **options) -> BatchPlan:
    """``cp_engine.planner.plan_batch`` (same arguments and result) with the overlap
    kernels' kNN partner search as ``partner_search``: ``partners="auto"`` takes it
    only where it runs on a GPU, ``partners="kernel"`` forces it."""
    options.setdefault("partner_search", PARTNER_SEARCH)
    return planner.plan_batch(contexts, token_lengths, **options)


def build_batch_messages(items: Sequence[tuple[Sequence[str], str]], system: str | None = None,
                         config: Config | None = None,
                         count_tokens: Callable[[str], int] | None = None) -> BatchMessages:
    """Plan a batch of (blocks, query) pairs for prefix sharing and render each one.

    ``count_tokens``: the served model's token count of a block's text, e.g.
    ``lambda t: len(tokenizer.encode(t, add_special_tokens=False))``, called once per
    distinct block. Without it blocks are weighed by a characters/4 estimate.
    """
    if count_tokens is not None and not callable(count_tokens):
        raise TypeError(f"count_tokens must be callable (str -> int), got {type(count_tokens).__name__}")
    cfg = config or load_config()
    block_lists = [_item_blocks(i, blocks) for i, (blocks, _) in enumerate(items)]
    # Weighted by tokens: the cache serves tokens, and a long shared block is worth
    # more than a short one (+5% cached tokens on the engine benchmark's Zipf batch;
    # exact counts another 0.4% there, see benchmarks/results/engine.md).
    if cfg.reorder:
        plan = plan_batch(block_lists, token_lengths=_block_token_counts(block_lists, count_tokens))
    else:
        plan = BatchPlan(contexts=[list(b) for b in block_lists], order=list(range(len(block_lists))))
    messages = []
    for (blocks, query), planned in zip(items, plan.contexts):
        msgs = [{"role": "system", "content": system}] if system is not None else []
        context = render_planned(blocks, planned, annotate=cfg.annotate and cfg.reorder)
        msgs.append({"role": "user", "content": f"{context}\n\n{query}" if context else query})
        messages.append(msgs)
    return BatchMessages(messages=messages, order=plan.order, plan=plan)


__all__ = [
    "BatchMessages", "Prepared", "build_batch_messages", "build_messages", "deduplicate",
    "default_pipeline", "plan_batch", "render_planned", "reorder",
]
