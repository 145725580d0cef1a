"""The blend benchmarks' prompts: chat-rendered, tokenized with the served model's
tokenizer, each context block marked so its exact token span is known.

Contract:
- ``Tokenizer(model)``: ``whole(messages)`` tokenizes the rendered chat prompt in one go
  (what the engine computes from text); ``blocks(messages, block_texts)`` tokenizes
  every block, label and separator apart (``cp_engine.blend.spans.encode_segments``),
  so each block keeps its own ids and ``Rendered.spans`` point exactly at them.
- Workload builders return ``{"name", "plain": [(messages, block_texts)], "prefix":
  [(messages, block_texts)] or None}`` in send order; ``prefix`` is today's best
  prefix plan (client-side batch plan for RAG, the in-server ``conversation_id``
  rewrite for memory chat, none for the agent: no prefix plan keeps its suffix order).
- ``rounds(order)`` groups a multi-turn send order into rounds that may run
  concurrently: a session's turn t is always in a later round than its turn t-1.
- Assistant answers in multi-turn histories are fixed sentences (``answer``), so every
  arm sends exactly the same prompts whatever the model says.
"""
from __future__ import annotations

from typing import Sequence

from cp_engine.blend.spans import Rendered, Segment, encode_segments

AGENT_SYSTEM = ("You are a planning agent. Read the current state, then your memory and the history "
                "of earlier steps, and answer with the next action only.")


def block_segments(text: str, block_texts: Sequence[str]) -> list[Segment]:
    """``text`` cut into segments, every occurrence of a block text marked as a block
    (overlaps: the earlier, then longer, occurrence wins)."""
    hits = []
    for bt in set(block_texts):
        i = text.find(bt)
        while i >= 0:
            hits.append((i, -len(bt)))
            i = text.find(bt, i + len(bt))
    segs, pos = [], 0
    for start, neg in sorted(hits):
        if start < pos:
            continue
        if start > pos:
            segs.append(Segment(text[pos:start]))
        segs.append(Segment(text[start:start - neg], block=True))
        pos = start - neg
    if pos < len(text):
        segs.append(Segment(text[pos:]))
    return segs


class Tokenizer:
    """The served model's chat template and tokenizer: whole prompts as the engine
    tokenizes them from text, and block-exact prompts as blend needs them."""

    def __init__(self, model: str):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model)
        self._pieces: dict[str, list[int]] = {}

    def text(self, messages: list[dict]) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        ids = self._pieces.get(text)
        if ids is None:
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            if len(text) > 64:  # blocks and long labels recur; short joints are cheap
                self._pieces[text] = ids
        return list(ids)

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def whole(self, messages: list[dict]) -> list[int]:
        return self.tok(self.text(messages), add_special_tokens=False)["input_ids"]

    def blocks(self, messages: list[dict], block_texts: Sequence[str]) -> Rendered:
        return encode_segments(self.encode, block_segments(self.text(messages), block_texts))


# ------------------------------------------------------------------------- workloads

def waves(sessions: Sequence[Sequence], width: int) -> list[tuple[int, int]]:
    """(session, turn) in send order: ``width`` sessions at a time, turns round-robin."""
    order = []
    for w in range(0, len(sessions), width):
        wave = range(w, min(w + width, len(sessions)))
        for t in range(max(len(sessions[s]) for s in wave)):
            order += [(s, t) for s in wave if t < len(sessions[s])]
    return order


def rounds(order: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Indices into ``order`` grouped into consecutive rounds, each holding at most one
    turn per session (a new round starts when a session comes back)."""
    out: list[list[int]] = []
    seen: set[int] = set()
    for i, (s, _) in enumerate(order):
        if not out or s in seen:
            out.append([])
            seen = set()
        out[-1].append(i)
        seen.add(s)
    return out


def answer(s: int, t: int) -> str:
    return f"Noted for step {t} of session {s}."


def rag_prompts(n: int, tok: Tokenizer) -> dict:
    """Batched Zipf RAG (the engine benchmark's target run): plain and on+batch messages."""
    from benchmarks.engine import workloads as ew
    from benchmarks.engine.arms import plain, rag_requests

    rag = ew.rag_zipf(n)
    plain_ = [(plain(d, q), d) for d, q in zip(rag.docs, rag.queries)]
    batch = [(r.messages, rag.docs[r.tag]) for r in rag_requests("on+batch", rag, tok.count)[0]]
    return {"name": rag.name, "plain": plain_, "prefix": batch, "order": None, "queries": list(rag.queries)}


def chat_prompts(sessions: int, tok: Tokenizer, width: int) -> dict:
    """Multi-turn memory chat (k=5, the engine benchmark's): the plain client re-sends
    every turn with documents and full history; the plugin client sends
    ``context_blocks`` + ``conversation_id``, rewritten as the in-server hook does."""
    from benchmarks.common.live import plain_messages
    from benchmarks.engine import workloads as ew
    from benchmarks.engine.arms import SYSTEM
    from cp_engine import Config
    from cp_engine.pipeline import ContextPipeline

    chat = ew.chat_memory(sessions, 5)
    pipe = ContextPipeline(Config())
    full: dict[int, list[dict]] = {}
    short: dict[int, list[dict]] = {}
    seen: dict[int, list[str]] = {}
    plain, dedup = [], []
    order = waves(chat.sessions, width)
    for i, (s, t) in enumerate(order):
        blocks, q = chat.sessions[s][t]
        seen[s] = seen.get(s, []) + list(blocks)  # earlier turns' blocks sit in the history
        msgs = plain_messages(SYSTEM, blocks, q, full.get(s, [])[1:])  # as live.run_session sends
        plain.append((msgs, list(seen[s])))
        base = [{"role": "system", "content": SYSTEM}, *short.get(s, []), {"role": "user", "content": q}]
        rewritten, prep = pipe.rewrite_messages(base, list(blocks), conversation_id=f"s{s}")
        pipe.commit(i, prep)
        dedup.append((rewritten, list(seen[s])))
        reply = {"role": "assistant", "content": answer(s, t)}
        full[s] = msgs + [reply]
        short[s] = short.get(s, []) + [{"role": "user", "content": q}, reply]
    return {"name": chat.name, "plain": plain, "prefix": dedup, "order": order}


def agent_messages(texts: dict, dynamic: Sequence[int], suffix: Sequence[int], query: str) -> list[dict]:
    state = "\n\n".join(texts[b] for b in dynamic)
    memory = "\n\n".join(texts[b] for b in suffix)
    return [{"role": "system", "content": AGENT_SYSTEM},
            {"role": "user", "content": f"Current state:\n{state}\n\nMemory and history:\n{memory}\n\n{query}"}]


def agent_prompts(sessions: int, turns: int, width: int) -> dict:
    """CacheSlide-style agent sessions (``workloads.agent_shifted``): system prompt, a
    dynamic segment of a new length every turn, then the fixed suffix (memory and
    history in order). The suffix blocks are the marked blocks; the dynamic segment is not."""
    from benchmarks.common import workloads

    wl = workloads.agent_shifted(sessions, turns)
    plain = []
    order = waves(wl.sessions, width)
    for s, t in order:
        i = wl.sessions[s][t]
        msgs = agent_messages(wl.texts, wl.meta["dynamic"][i], wl.contexts[i], wl.queries[i])
        plain.append((msgs, [wl.texts[b] for b in wl.contexts[i]]))
    return {"name": wl.name, "plain": plain, "prefix": None, "order": order}
