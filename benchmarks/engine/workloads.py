"""The engine benchmark's workloads (block texts are real HotpotQA paragraphs):

- ``rag_zipf``: batched RAG, the peer's synthetic workload (corpus 2,000, Zipf s=1,
  10-20 blocks per request); doc id d is the corpus' paragraph d.
- ``rag_zipf_k{k}``: the same popularity with exactly k blocks per request (k = 5, 10, 20).
- ``rag_hotpot``: HotpotQA questions with BM25 top-10 (real retrieval; little reuse at small N).
- ``chat_memory``: multi-turn memory chat (``memory_chat``: each turn retrieves with
  the previous and current question, so turns overlap), sessions run concurrently.
- ``chat_sliding``: multi-turn sessions whose turn t retrieves blocks t..t+k-1 of a
  session pool (a user paging through one topic: k-1 of k blocks already sent).

Each carries its reuse bound 1 - unique/total (token-weighted, over context blocks);
multi-turn ones also the dedup bound (share of block tokens already sent earlier in
the session).
"""
from __future__ import annotations

import random

from benchmarks.common import workloads as W


class Rag:
    """A batched-RAG workload: ``docs[i]`` (texts, retrieval order), ``queries[i]``."""

    def __init__(self, name: str, wl: W.Workload, texts, queries):
        self.name, self.wl = name, wl
        self.docs = [[texts[b] for b in ctx] for ctx in wl.contexts]
        self.queries = queries
        self.bound_tokens = wl.bound(weighted=True)


class Chat:
    """Multi-turn sessions: ``sessions[s]`` = list of (blocks, question) turns."""

    def __init__(self, name: str, sessions, contexts, tokens):
        self.name, self.sessions = name, sessions
        flat_sessions, i = [], 0
        for s in sessions:
            flat_sessions.append(list(range(i, i + len(s))))
            i += len(s)
        self.bound_tokens = W.bound(contexts, tokens)
        self.dedup_bound_tokens = W.session_dedup_bound(contexts, flat_sessions, tokens)


def _corpus_texts(n: int) -> list[str]:
    corpus, _ = W._hotpot_corpus()
    return corpus[:n]


def rag_zipf(n: int, k: int | None = None) -> Rag:
    """The peer's synthetic workload (k uniform in 10..20), or with every request at k blocks."""
    wl = W.synthetic(n) if k is None else W.synthetic(n, k_min=k, k_max=k)
    corpus = _corpus_texts(2000)
    texts = {b: corpus[b] for c in wl.contexts for b in c}
    wl.tokens = {b: W.estimate_tokens(t) for b, t in texts.items()}
    name = f"rag_zipf_{n}" + (f"_k{k}" if k is not None else "_k10-20")
    return Rag(name, wl, texts, [f"Question {i}: which document answers this?" for i in range(n)])


def rag_hotpot(n: int, k: int) -> Rag:
    wl = W.hotpotqa(n, k=k)
    return Rag(f"rag_hotpot_{n}_k{k}", wl, wl.texts, list(wl.queries))


def chat_memory(sessions: int, k: int) -> Chat:
    wl = W.memory_chat(sessions, turns=(3, 6), k=k)
    sess = [[([wl.texts[b] for b in wl.contexts[i]], wl.queries[i]) for i in idx] for idx in wl.sessions]
    ctxs = [wl.contexts[i] for idx in wl.sessions for i in idx]
    return Chat(f"chat_memory_{sessions}_k{k}", sess, ctxs, wl.tokens)


def chat_sliding(sessions: int, turns: int, k: int, seed: int = 0) -> Chat:
    corpus = _corpus_texts(4000)
    rng = random.Random(seed)
    sess, ctxs = [], []
    for s in range(sessions):
        pool = rng.sample(range(len(corpus)), k + turns - 1)
        turns_s = []
        for t in range(turns):
            ids = pool[t: t + k]
            rng.shuffle(ids)  # retrieval order differs turn to turn
            ctxs.append(ids)
            turns_s.append(([corpus[b] for b in ids], f"Session {s}, turn {t}: and what about the next one?"))
        sess.append(turns_s)
    tokens = {b: W.estimate_tokens(corpus[b]) for c in ctxs for b in c}
    return Chat(f"chat_sliding_{sessions}x{turns}_k{k}", sess, ctxs, tokens)

