"""The online rewrite every engine hook uses: reorder → de-duplicate → render.

``ContextPipeline.prepare`` turns a request's context blocks (retrieval order) into
the text that goes before the user's question; ``rewrite_messages`` does the whole
chat-message rewrite, including replaying earlier turns of a conversation exactly as
the engine saw them (so the history is a cached prefix and de-duplicated references
always point at text that is really in the prompt).

Errors: ``InvalidBlocks`` (a ``ValueError``) for input the API should reject with a
400; requests over ``max_blocks_per_request`` are rendered in their given order with
no reordering, dedup or annotation (nothing is lost, nothing is reordered).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Hashable, Sequence

from .annotate import labels_for, numbered_labels, render_annotation, render_block, render_reference
from .blocks import block_id, estimate_tokens
from .config import Config, load_config
from .dedup import Deduplicator
from .index import ContextIndex

_REF_SALT = 0x9E3779B97F4A7C15  # reference items get ids distinct from their block's


class InvalidBlocks(ValueError):
    """The request's context blocks are malformed (maps to HTTP 400)."""


@dataclass(frozen=True)
class Prepared:
    context_text: str
    order: list[int]  # original index of each rendered item
    block_ids: list[int]  # content id of each rendered item
    full: list[bool]  # rendered in full (True) or as a reference hint (False)
    token_lengths: list[int]  # estimated tokens of each rendered item
    group_key: str
    tokens_saved: int
    namespace: str
    reordered: bool
    conversation: Hashable | None = None
    extra: dict = field(default_factory=dict)
    # (original user text, rendered user text, ids rendered in full) of this turn,
    # remembered by ``commit_history`` so a later turn can replay it exactly.
    turn: tuple[str, str, frozenset] | None = None

    def index_path(self) -> list[int]:
        """The ids the index records: references are keyed apart from full blocks."""
        return [b if f else b ^ _REF_SALT for b, f in zip(self.block_ids, self.full)]


def validate_blocks(blocks: Any) -> list[str]:
    """Return ``blocks`` as a list of str or raise ``InvalidBlocks`` naming the first bad one.

    An empty or whitespace-only block is malformed: it carries no context, and keeping
    it would either render a bare label or silently change the block count. An empty
    list is valid (nothing to render).
    """
    if not isinstance(blocks, (list, tuple)):
        raise InvalidBlocks(f"context_blocks must be a list of strings, got {type(blocks).__name__}")
    for i, b in enumerate(blocks):
        if not isinstance(b, str):
            raise InvalidBlocks(f"context_blocks[{i}] must be a string, got {type(b).__name__}")
        if not b.strip():
            raise InvalidBlocks(f"context_blocks[{i}] is empty" + (" (whitespace only)" if b else ""))
    return list(blocks)


def namespace_of(messages_before: Sequence[Any]) -> str:
    """Stable key of the prompt text before the blocks; "" when there is none.

    Equal message lists (key order aside) give equal keys in every process; different
    ones differ. The usual message (a dict of strings) is hashed field by field, each
    length-prefixed, which costs a fraction of serialising the history to JSON; any
    other message is hashed as sorted JSON under its own tag.
    """
    if not messages_before:
        return ""
    h = hashlib.blake2b(digest_size=8)
    for m in messages_before:
        if type(m) is dict and all(type(k) is str and type(v) is str for k, v in m.items()):
            h.update(b"\x01%d:" % len(m))
            for k in sorted(m):
                _update_str(h, k)
                _update_str(h, m[k])
        else:
            h.update(b"\x02")
            _update_str(h, json.dumps(m, sort_keys=True, ensure_ascii=False, default=str))
    return h.hexdigest()


def _update_str(h: Any, text: str) -> None:
    data = text.encode("utf-8", "surrogatepass")
    h.update(b"%d:" % len(data))
    h.update(data)


class ContextPipeline:
    def __init__(self, config: Config | None = None, index: ContextIndex | None = None,
                 deduplicator: Deduplicator | None = None):
        self.config = config or load_config()
        # `is None`, not `or`: an empty index or deduplicator has len 0 and is falsy.
        self.index = index if index is not None else ContextIndex(max_nodes=self.config.index_max_nodes)
        self.dedup = deduplicator if deduplicator is not None else Deduplicator(
            max_conversations=self.config.dedup_max_conversations,
            max_blocks=self.config.dedup_max_blocks,
        )

    # -- one request's blocks ----------------------------------------------------
    def prepare(self, blocks: Any, conversation_id: str | None = None, tenant: str = "",
                namespace: str = "", available: frozenset | None = None,
                follows_history: bool = False, keep_order: bool = False,
                known_ids: Sequence[int] | None = None) -> Prepared:
        """Choose order and dedup for ``blocks`` and render them (see module docs).

        ``known_ids``: ``block_id`` of each of ``blocks``, when the caller already
        validated and hashed this same list (it is trusted, not checked).

        ``follows_history``: the blocks come after earlier chat turns. If nothing was
        ever recorded behind that exact history (``namespace``), the blocks keep their
        retrieval order and get no annotation: the prefix before them is this
        conversation's own, so no other request can share a reordered block list, and
        reordering would only cost annotation tokens on every turn. A second request
        with the same history (parallel samples, agents forked from one state) finds
        the first one's path and is aligned to it as usual.

        ``keep_order`` (blend's retrieval-order mode, ``docs/blend.md``): the blocks go
        out in their given order with no annotation and, outside a conversation, no
        labels; blend reuses a block's KV wherever it sits, so the model can read the
        documents as retrieved. Dedup still applies in a conversation.
        """
        texts = validate_blocks(blocks) if known_ids is None else list(blocks)
        cfg = self.config
        ids = [block_id(t) for t in texts] if known_ids is None else list(known_ids)
        conv = (tenant, conversation_id) if conversation_id is not None and cfg.dedup else None
        plain = len(texts) > cfg.max_blocks_per_request or not (cfg.reorder or cfg.dedup or cfg.annotate)
        if plain:
            order = list(range(len(texts)))
        elif cfg.reorder and not keep_order and not (follows_history and not self.index.knows_namespace(namespace)):
            order = self.index.best_order(ids, namespace=namespace,
                                          token_lengths=[estimate_tokens(t) for t in texts])
        else:
            order = list(range(len(texts)))
        rendered_ids = [ids[i] for i in order]
        if plain:
            full = [True] * len(order)
        elif conv is not None:
            full = self.dedup.mark(conv, rendered_ids, commit=False, available=available)
        else:  # still collapse copies repeated inside this one request
            seen: set[int] = set()
            full = []
            for b in rendered_ids:
                full.append(b not in seen)
                seen.add(b)
        # Labels exist for what refers to them: the annotation (which needs reordering),
        # and dedup references in a conversation. Elsewhere they would only add tokens
        # (see render_planned). Outside a conversation nothing refers to a label from
        # another prompt, so the short numbered scheme serves (see annotate.py).
        labelled = not plain and ((cfg.annotate and cfg.reorder and not keep_order) or conv is not None)
        numbered = conv is None
        labels = numbered_labels(rendered_ids) if numbered else labels_for(ids)
        parts, lengths, saved = [], [], 0
        for i, is_full in zip(order, full):
            label = labels[ids[i]]
            if is_full:
                piece = render_block(label, texts[i], numbered) if labelled else texts[i]
            elif conv is not None:  # sent in an earlier turn: say where it went
                piece = render_reference(label, numbered)
            else:  # a repeat inside this prompt adds nothing: left out, as render_planned does
                piece = ""
            if piece:
                parts.append(piece)
            n = estimate_tokens(piece) if piece else 0
            lengths.append(n)
            if not is_full:
                whole = render_block(label, texts[i], numbered) if labelled else texts[i]
                saved += max(0, estimate_tokens(whole) - n)
        # Reordered = the distinct blocks go out in another order (swapping two copies
        # of one block changes nothing the model could be told about).
        reordered = list(dict.fromkeys(rendered_ids)) != list(dict.fromkeys(ids))
        # The annotation restates the original order; when the blocks go out in that
        # order it says nothing, and on a 0.5B model it cost answer F1 (quality.md).
        if cfg.annotate and cfg.reorder and not plain and not keep_order and reordered and len(set(ids)) > 1:
            parts.append(render_annotation([labels[b] for b in ids]))
        first = f"{rendered_ids[0]:016x}" if rendered_ids else ""
        return Prepared(
            context_text="\n\n".join(parts),
            order=order,
            block_ids=rendered_ids,
            full=full,
            token_lengths=lengths,
            group_key=f"{namespace}:{first}",
            tokens_saved=saved,
            namespace=namespace,
            reordered=reordered,
            conversation=conv,
        )

    def commit(self, request_id: Hashable, prep: Prepared, base_offset: int = 0) -> None:
        """Record what was sent: ``record`` (index) then ``commit_history`` (dedup)."""
        self.record(request_id, prep, base_offset=base_offset)
        self.commit_history(prep)

    def record(self, request_id: Hashable, prep: Prepared, base_offset: int = 0) -> None:
        """Index the rendered order under ``request_id`` (undone by ``rollback``)."""
        if self.config.reorder:
            self.index.record(request_id, prep.index_path(), namespace=prep.namespace,
                              token_lengths=prep.token_lengths, base_offset=base_offset)

    def commit_history(self, prep: Prepared) -> None:
        """The conversation now holds ``prep``'s blocks and rendered turn.

        ``prepare`` / ``rewrite_messages`` only read dedup state; this is the one
        writer, so a request the engine rejects (never committed) leaves the
        conversation exactly as it was: its next turn sends the blocks in full.
        """
        if prep.conversation is None:
            return
        self.dedup.mark(prep.conversation, prep.block_ids, commit=True)
        if prep.turn is not None:
            original, rendered, full_ids = prep.turn
            self.dedup.remember_turn(prep.conversation, original, rendered, full_ids)

    def rollback(self, request_id: Hashable) -> None:
        """The engine rejected ``request_id`` after ``record``: drop its index path.

        Block popularity counts taken by ``record`` stay (they only break ties
        between unindexed blocks); no prefix of the request stays claimed.
        """
        self.index.forget([request_id])

    # -- whole chat requests ---------------------------------------------------
    def rewrite_messages(self, messages: Any, blocks: Any, conversation_id: str | None = None,
                         tenant: str = "", keep_order: bool = False,
                         namespace_for: Callable[[str, list[int]], str] | None = None) -> tuple[list[dict], Prepared]:
        """Messages with the blocks rendered into the last user turn; input is not mutated.

        Earlier user turns of the same conversation are replayed as they were sent.
        Reads dedup state only: ``commit`` (or ``commit_history``) remembers this turn.
        ``namespace_for(namespace, block_ids)`` may replace the namespace derived from the
        history (one index view per data-parallel rank).
        Raises ``InvalidBlocks`` for malformed blocks or messages without a user turn.
        """
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
            raise InvalidBlocks("messages must be a list of objects")
        last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
        if last_user is None:
            raise InvalidBlocks("context_blocks needs a user message to attach to")
        conv = (tenant, conversation_id) if conversation_id is not None and self.config.dedup else None
        out = [dict(m) for m in messages]
        available: set[int] = set()
        if conv is not None:
            for m in out[:last_user]:
                if m.get("role") == "user":
                    key = _content_key(m.get("content"))
                    hit = self.dedup.rendered_turn(conv, key) if key is not None else None
                    if hit is not None:
                        m["content"] = hit[0]
                        available |= hit[1]
        namespace = namespace_of(out[:last_user])
        known_ids = None
        if namespace_for is not None:  # hashed once, for the rank choice and for prepare
            known_ids = [block_id(t) for t in validate_blocks(blocks)]
            namespace = namespace_for(namespace, known_ids)
        prep = self.prepare(blocks, conversation_id=conversation_id, tenant=tenant,
                            namespace=namespace, known_ids=known_ids,
                            available=frozenset(available) if conv is not None else None,
                            follows_history=any(m.get("role") in _TURN_ROLES for m in out[:last_user]),
                            keep_order=keep_order)
        question = out[last_user].get("content")
        out[last_user]["content"] = _with_context(prep.context_text, question)
        if conv is not None:
            key = _content_key(question)
            if key is not None:
                full_ids = frozenset(b for b, f in zip(prep.block_ids, prep.full) if f)
                prep = replace(prep, turn=(key, out[last_user]["content"], full_ids))
        return out, prep

    # -- engine feedback -------------------------------------------------------
    def evict(self, request_id: Hashable, from_token: int | None = None) -> int:
        if from_token is None:
            return self.index.evict(request_ids=[request_id])
        return self.index.evict_from_token(request_id, from_token)

    def evict_path(self, namespace: str, path: Sequence[int]) -> int:
        return self.index.evict_path(path, namespace=namespace)

    def reset(self) -> None:
        self.index.reset()


_TURN_ROLES = ("user", "assistant", "tool", "function")  # messages that make a history (not "system")


def _content_key(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return json.dumps(content, sort_keys=True, ensure_ascii=False, default=str)
    return None


def _with_context(context_text: str, question: Any) -> Any:
    """The user turn with the context in front of the question, keeping its shape."""
    if not context_text:
        return question
    if isinstance(question, list):
        return [{"type": "text", "text": context_text}] + list(question)
    if question is None or question == "":
        return context_text
    return f"{context_text}\n\n{question}"
