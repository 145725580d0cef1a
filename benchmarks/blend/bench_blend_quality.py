"""Blend's answer quality: HotpotQA F1 against prompt tokens computed, per blend setting.

    python -m benchmarks.blend.bench_blend_quality --model DIR           # 300 questions
    python -m benchmarks.blend.bench_blend_quality --model DIR --n 40    # a reduced sweep
    python -m benchmarks.blend.bench_blend_quality --quick               # tiny model, 8 questions: plumbing only

HotpotQA dev questions with BM25 top-``--k`` paragraphs over the pooled corpus
(``benchmarks.common.workloads.hotpotqa``), greedy, answers scored with the quality
benchmark's SQuAD-style F1 (``benchmarks.quality.bench``), 95 % percentile bootstrap per
arm and **paired** against ``plain`` on the same questions.

Why two passes. Blend only reuses a block whose KV it stored earlier, so a question's
documents must have been seen before, elsewhere and in another order, or blend is plain
prefill and its F1 says nothing. Each arm therefore runs

1. a **warm pass**: every question once with its documents in retrieval order (spans
   sent, so the connector stores the blocks it computed exactly), then
2. the **measured pass**: the same questions with the documents in a seeded shuffled
   order whose first document differs from the warm order's, so vLLM's exact prefix
   cache covers at most the system prompt and every reused document sits at a new
   position behind new neighbours. Only this pass is scored and counted.

Every arm's measured prompt is the same token ids (blocks, labels and separators
tokenized apart, ``benchmarks.blend.prompts``), so F1 differences come from the KV
alone; ``prefix`` (the plugin's reorder + annotation, client-side) and ``peer`` (the
peer's batch plan) send their own prompts. Arms:

- ``plain``: the measured prompts without spans: exact prefill (prefix caching);
- ``prefix``: cp_engine's prefix plan (``ContextPipeline``, reorder + annotate), fed the
  warm pass first so its index has seen every document;
- ``blend@r`` for each ``--ratios`` value (1.0 recomputes everything claimed: full
  recompute through the connector);
- ``first_tokens@r`` / ``deviation@r``: ``CP_ENGINE_BLEND_MODE`` at ``--mode-ratio``;
- ``blend@r:dN`` (opt-in, ``--arms``): the measured pass reuses entries stored N
  stitching generations deep (``CP_ENGINE_BLEND_STORE_DEPTH``). Its warm pass runs a
  chain of primer documents from other questions first (``[F, P0]``, ``[P0, P1]``, ...,
  each stitching the one stored before it at a new position), then every question's
  documents behind the last primer, so they are stored behind stitched KV at depth N.
  Paired against ``blend@r`` it prices the compounding; every blend arm sends its store
  depth (0 unless named) and the server allows the largest;
- ``peer``: ContextPilot's ``optimize_batch`` messages, when its venv exists;
- ``...:nocarry`` / ``...:carry`` (opt-in, after any ``:dN``): the blend arm with
  ``cp_blend_carry`` off (the ratio covers every reused block, carried or not:
  ``cp_engine.blend.leads``) or on, whatever the server's default.

``--layout suffix`` is CacheSlide's agent pattern instead of the shuffle: each prompt is
a *state* segment, then the documents as memory **in retrieval order in both passes**,
then the question. The warm pass's state is one paragraph of another question, the
measured pass's two or three others (a new length), so every document moves by the
same shift and all but the first follow the same neighbour as when stored: carried.
The prefix plan and the peer do not apply there (they reorder the documents).

Every arm runs on ONE server (``CP_ENGINE_BLEND=1``): each blend arm sends its ratio
and mode with every request (``vllm_xargs.cp_blend_ratio`` / ``cp_blend_mode``), and
every arm, in every chunk, uses its own fresh ``cache_salt``, which scopes both vLLM's
prefix cache and the blend store, so no arm reuses another's KV. The questions are run
in chunks of ``--chunk`` (each arm's warm and measured pass over the chunk, arms in the
``--arms`` order, which is the priority order), so every arm grows in n together and a
stopped run loses at most one arm-chunk. Tokens computed (measured pass) = vLLM's
``local_compute`` prompt tokens + ``cp_engine_blend_recomputed_tokens_total``
(``/metrics`` deltas), per chunk; the table and plot give them per question, and
plain/arm over the chunks both ran. Results:
``benchmarks/results/<--out>.{json,table.md,png}``, rewritten after every arm-chunk;
``--resume`` keeps the chunks already in the JSON (same model, n, k, max tokens, chunk).
"""
from __future__ import annotations

import argparse
import random
import re
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Sequence

from benchmarks.blend.prompts import Tokenizer
from benchmarks.blend.server_io import Server, TokenRequest, computed_tokens, delta, served_model
from cp_engine.devtools.stats import bootstrap_ci, paired_bootstrap_ci

RATIOS = (0.0, 0.05, 0.15, 0.3, 1.0)
MODES = ("first_tokens", "deviation")


# ---------------------------------------------------------------------------- prompts

def measured_order(n_docs: int, seed: int, i: int) -> list[int]:
    """A seeded permutation of ``range(n_docs)`` for question ``i`` whose first element
    is not 0 (the warm pass's first document), so no exact prefix covers a document."""
    order = list(range(n_docs))
    if n_docs < 2:
        return order
    rng = random.Random(f"{seed}:{i}")
    while True:
        rng.shuffle(order)
        if order[0] != 0:
            return order


LAYOUTS = ("shuffle", "suffix")


def suffix_messages(system: str, state: Sequence[str], docs: Sequence[str], question: str) -> list[dict]:
    """The agent layout: a state segment, the documents as memory in the order given,
    then the question."""
    text = ("Current state:\n" + "\n\n".join(state) + "\n\nMemory:\n" + "\n\n".join(docs)
            + "\n\n" + question)
    return [{"role": "system", "content": system}, {"role": "user", "content": text}]


def state_docs(docs: Sequence[Sequence[str]], i: int, skip: int, count: int) -> list[str]:
    """``count`` paragraphs for question ``i``'s state: documents of the questions after
    it (starting ``skip`` questions on), none of which question ``i`` retrieved."""
    own, out = set(docs[i]), []
    for step in range(1 + skip, len(docs) + skip + 1):
        for d in docs[(i + step) % len(docs)]:
            if d not in own and d not in out:
                out.append(d)
                if len(out) == count:
                    return out
    raise ValueError(f"fewer than {count} other documents for question {i}'s state")


class Questions:
    """The questions, their documents and every arm's prompts (token ids, spans)."""

    def __init__(self, wl, tok: Tokenizer, seed: int = 0, layout: str = "shuffle"):
        from benchmarks.common.live import plain_messages
        from benchmarks.quality.bench import SYSTEM, question_text

        if layout not in LAYOUTS:
            raise ValueError(f"layout {layout!r} unknown; one of {', '.join(LAYOUTS)}")
        self.layout = layout
        self.system = SYSTEM
        self.answers = list(wl.meta["answers"])
        self.qs = [question_text(q) for q in wl.queries]
        self.docs = [[wl.texts[b] for b in ctx] for ctx in wl.contexts]
        self.tok = tok
        if layout == "suffix":
            self.orders = [list(range(len(d))) for d in self.docs]
            self.shuffled = [list(d) for d in self.docs]
            # the warm state is one paragraph; the measured one two or three others: a new length
            self.warm = [tok.blocks(suffix_messages(SYSTEM, state_docs(self.docs, i, 0, 1), d, q), d)
                         for i, (d, q) in enumerate(zip(self.docs, self.qs))]
            self.measured = [tok.blocks(suffix_messages(SYSTEM, state_docs(self.docs, i, 1, 2 + i % 2), d, q), d)
                             for i, (d, q) in enumerate(zip(self.docs, self.qs))]
            return
        self.orders = [measured_order(len(d), seed, i) for i, d in enumerate(self.docs)]
        self.warm = [tok.blocks(plain_messages(SYSTEM, d, q), d) for d, q in zip(self.docs, self.qs)]
        self.shuffled = [[d[j] for j in o] for d, o in zip(self.docs, self.orders)]
        self.measured = [tok.blocks(plain_messages(SYSTEM, d, q), d) for d, q in zip(self.shuffled, self.qs)]

    def __len__(self) -> int:
        return len(self.qs)

    def prefix_prompts(self, ids: list[int]) -> tuple[list, list]:
        """(warm, measured) prompts of cp_engine's prefix plan for questions ``ids``, a
        fresh index fed in send order (the warm pass, then the measured pass)."""
        from cp_engine import Config
        from cp_engine.pipeline import ContextPipeline

        pipe = ContextPipeline(Config())
        out = []
        for k, docs in enumerate((self.docs, self.shuffled)):
            rows = []
            for j, i in enumerate(ids):
                base = [{"role": "system", "content": self.system}, {"role": "user", "content": self.qs[i]}]
                msgs, prep = pipe.rewrite_messages(base, list(docs[i]))
                pipe.commit(k * len(ids) + j, prep)
                rows.append(self.tok.blocks(msgs, docs[i]))
            out.append(rows)
        return out[0], out[1]

    def peer_prompts(self, ids: list[int]) -> list | None:
        """The peer's batch plan over the measured documents of questions ``ids``, in
        their order; None without the peer's venv."""
        from benchmarks.common.live import peer_messages

        docs = [self.shuffled[i] for i in ids]
        out = peer_messages(docs, [self.qs[i] for i in ids], self.system)
        if out is None:
            return None
        table = {i: m for m, i in zip(out["messages"], out["order"])}
        return [self.tok.blocks(table[j], d) for j, d in enumerate(docs)]


# ---------------------------------------------------------------------------- scoring

def score(predictions: list[str], answers: list[str]) -> tuple[list[float], list[str]]:
    """Per-question F1 of the raw completions and the cleaned predictions."""
    from benchmarks.quality.bench import clean_prediction, f1_score

    preds = [clean_prediction(p) for p in predictions]
    return [f1_score(p, a) for p, a in zip(preds, answers)], preds


def _sum(arm: dict, key: str, chunks=None) -> float:
    """``key`` summed over the arm's chunks (all, or those in ``chunks``); an arm
    without chunks (one run over every question) holds the total itself."""
    if "chunks" not in arm:
        return arm.get(key, 0)
    return sum(c.get(key, 0) for k, c in arm["chunks"].items() if chunks is None or k in chunks)


def summarize(arms: dict, base: str = "plain") -> list[dict]:
    """Per arm: F1 with its 95 % bootstrap CI, ΔF1 paired against ``base`` on the
    questions both answered, the tokens computed in the measured pass (total and per
    question) and plain/arm over the chunks both ran."""
    ref = arms.get(base)
    rows = []
    for name, a in arms.items():
        f1 = [round(100 * x, 2) for x in bootstrap_ci(a["f1"])]
        computed = _sum(a, "computed_tokens")
        row = {"arm": name, "n": len(a["f1"]), "f1": f1, "computed_tokens": computed,
               "computed_per_question": round(computed / max(1, len(a["f1"])), 1),
               "prompt_tokens": _sum(a, "prompt_tokens"), "blend_recomputed": _sum(a, "blend_recomputed"),
               "blend_hits": _sum(a, "blend_hits")}
        if ref is not None and name != base:
            theirs = dict(zip(ref["ids"], ref["f1"]))
            common = [(theirs[i], f) for i, f in zip(a["ids"], a["f1"]) if i in theirs]
            if common:
                d = paired_bootstrap_ci([x for x, _ in common], [y for _, y in common])
                row["df1_vs_plain"] = [round(100 * x, 2) for x in d]
                row["paired_n"] = len(common)
        common_chunks = set(ref.get("chunks", {})) & set(a.get("chunks", {})) if ref is not None else set()
        if ref is not None and "chunks" not in ref and "chunks" not in a:
            common_chunks = None
        if ref is not None and common_chunks != set():
            theirs, ours = _sum(ref, "computed_tokens", common_chunks), _sum(a, "computed_tokens", common_chunks)
            if theirs and ours:
                row["computed_plain_over_arm"] = round(theirs / ours, 3)
        rows.append(row)
    return rows


def table(data: dict) -> str:
    lines = [f"Model `{data['model']}`; HotpotQA dev (question set of {data['n']}, each arm's n below), "
             f"BM25 top-{data['k']}; greedy, max {data['max_tokens']} tokens. {data['note']}", "",
             "| arm | n | F1 (95% CI) | ΔF1 vs plain (paired 95% CI) | computed tok (measured pass) | per question | "
             "plain/arm | blend recomputed | blend hits |", "|---|---|---|---|---|---|---|---|---|"]
    for r in data["summary"]:
        f, d = r["f1"], r.get("df1_vs_plain")
        lines.append(f"| {r['arm']} | {r['n']} | {f[0]:.1f} [{f[1]:.1f}, {f[2]:.1f}] | "
                     + (f"{d[0]:+.1f} [{d[1]:+.1f}, {d[2]:+.1f}]" if d else "—")
                     + f" | {r['computed_tokens']:,} | {r.get('computed_per_question', 0):,.0f} | "
                     f"{r.get('computed_plain_over_arm', 0):.2f}× | "
                     f"{r['blend_recomputed']:,.0f} | {r['blend_hits']:,} |")
    lines += ["", "Computed = vLLM's `local_compute` prompt tokens + `cp_engine_blend_recomputed_tokens_total` "
              "in the measured pass (after a warm pass that showed every document in retrieval order)."]
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = data["summary"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in rows:
        f = r["f1"]
        color = ("#888888" if r["arm"] == "plain" else "#cc7733" if r["arm"] in ("prefix", "peer")
                 else "#3366aa" if r["arm"].startswith("blend") else "#66aa33")
        x = r.get("computed_per_question", r["computed_tokens"])
        ax.errorbar([x], [f[0]], yerr=[[f[0] - f[1]], [f[2] - f[0]]], fmt="o", color=color, capsize=3)
        ax.annotate(f"{r['arm']} (n={r['n']})", (x, f[0]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("prompt tokens computed per question, measured pass (vLLM + blend)")
    ax.set_ylabel("answer F1 (%), 95% bootstrap CI")
    ns = sorted({r["n"] for r in rows})
    n_text = f"n={ns[0]}" if len(ns) == 1 else f"n={ns[0]}-{ns[-1]} per arm"
    layout = ", agent layout" if data.get("layout") == "suffix" else ""
    ax.set_title(f"Blend quality, HotpotQA {n_text}{layout}, {data['model']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------- running

def default_arms(ratios, modes, default_ratio: float, mode_ratio: float) -> list[str]:
    """Every arm in priority order: plain, blend at the default ratio, full recompute,
    ratio 0, the prefix plan, the peer, the other ratios, the mode arms."""
    first = ["plain", f"blend@{default_ratio:g}", "blend@1", "blend@0", "prefix", "peer"]
    rest = [f"blend@{r:g}" for r in ratios] + [f"{m}@{mode_ratio:g}" for m in modes]
    return first + [a for a in rest if a not in first]


def store_depth(arm: str) -> int:
    """N of an arm named ``...:dN`` (``:nocarry`` may follow); 0 for any other arm."""
    for part in arm.split(":")[1:]:
        if part[:1] == "d" and part[1:].isdigit():
            return int(part[1:])
    return 0


def arm_xargs(arm: str) -> dict | None:
    """The blend settings an arm sends with every request; None for an exact arm."""
    kind, at, rest = arm.partition("@")
    if not at:
        return None
    ratio, *options = rest.split(":")
    out = {"cp_blend_ratio": float(ratio), "cp_blend_mode": "both" if kind == "blend" else kind,
           "cp_blend_store_depth": store_depth(arm)}
    if "nocarry" in options or "carry" in options:
        out["cp_blend_carry"] = "carry" in options
    return out


def primer_docs(qs: "Questions", ids: list[int], count: int) -> list[str]:
    """``count`` documents of questions outside ``ids`` that no question in ``ids`` retrieved."""
    inside = {d for i in ids for d in qs.docs[i]}
    out: list[str] = []
    for step in range(1, len(qs) + 1):
        for d in qs.docs[(ids[-1] + step) % len(qs)]:
            if d not in inside and d not in out:
                out.append(d)
                if len(out) == count:
                    return out
    raise ValueError(f"fewer than {count} documents outside the chunk to prime with")


def primed_warm(qs: "Questions", ids: list[int], depth: int) -> tuple[list, list]:
    """(primer chain, warm prompts) that store the questions' documents ``depth``
    stitching generations deep: ``[F, P0]`` stores P0 exactly; ``[P(j-1), Pj]`` stitches
    P(j-1) at a new position and stores Pj one generation deeper; the warm prompts put
    the questions' documents behind the last primer."""
    from benchmarks.common.live import plain_messages

    docs = primer_docs(qs, ids, depth + 1)
    filler, primers = docs[0], docs[1:]
    q = qs.qs[ids[0]]
    chain = [[filler, primers[0]]] + [[primers[j - 1], primers[j]] for j in range(1, depth)]
    chain_prompts = [qs.tok.blocks(plain_messages(qs.system, c, q), c) for c in chain]
    warm = [qs.tok.blocks(plain_messages(qs.system, [primers[-1], *qs.docs[i]], qs.qs[i]), [primers[-1], *qs.docs[i]])
            for i in ids]
    return chain_prompts, warm


def run_pass(srv: Server, prompts, xargs: dict | None, salt: str, args, max_tokens: int) -> tuple[list, dict]:
    reqs = [TokenRequest(r.ids, list(r.spans) if xargs is not None and r.spans else None, salt, i,
                         dict(xargs or {})) for i, r in enumerate(prompts)]
    before = srv.counters()
    t0 = time.perf_counter()
    out = srv.send_batch(reqs, max_tokens, args.concurrency)
    wall = time.perf_counter() - t0
    # EngineCore forwards counters at most once a second (the last ones by a trailing
    # flush) and the API server applies them within its receiver's idle poll (0.5 s)
    time.sleep(2.5)
    d = delta(before, srv.counters())
    d["wall_s"] = wall
    return out, d


def run_note(arms: dict, mode_ratio: float, have_peer: bool, layout: str = "shuffle") -> str:
    """The result's note, saying only what the arms that actually ran did."""
    note = ("Warm pass (retrieval order) then measured pass (seeded shuffle, first document moved)"
            if layout == "shuffle" else
            "Agent layout: state, documents in retrieval order, question; warm pass behind one state paragraph, "
            "measured pass behind 2-3 others (every document shifted, all but the first carried)")
    if any(a.startswith(("first_tokens", "deviation")) for a in arms):
        note += f"; mode arms at ratio {mode_ratio:g}"
    if "peer" in arms:
        note += "; peer ran"
    elif have_peer:
        note += "; peer available, not run"
    ran = [f"{a} (n={len(v.get('f1', ()))})" if v else a for a, v in arms.items()]
    return note + "; arms run: " + ", ".join(ran) + "."


def arm_salt(arm: str) -> str:
    """A fresh ``cache_salt`` for one arm's run. vLLM refuses a salt holding ``@``, ``/``,
    ``\\`` or NUL, or longer than 128 characters, and arm names carry ``@``."""
    return f"q-{re.sub(r'[^A-Za-z0-9._-]', '_', arm)[:80]}-{uuid.uuid4().hex[:12]}"


def chunk_prompts(qs: Questions, arm: str, ids: list[int]) -> tuple[list | None, list | None]:
    """(warm, measured) prompts of one arm over questions ``ids``; (None, None) when the
    arm cannot run (the peer without its venv). A ``:dN`` arm's warm prompts are its
    ``primed_warm`` (the primer chain is sent by ``run_arm``)."""
    if arm == "plain":
        return None, [qs.measured[i] for i in ids]
    if arm in ("prefix", "peer") and qs.layout != "shuffle":
        return None, None  # they reorder the documents: not the suffix layout's question
    if arm == "prefix":
        warm, measured = qs.prefix_prompts(ids)
        return warm, measured
    if arm == "peer":
        return None, qs.peer_prompts(ids)
    if store_depth(arm):
        return primed_warm(qs, ids, store_depth(arm))[1], [qs.measured[i] for i in ids]
    return [qs.warm[i] for i in ids], [qs.measured[i] for i in ids]


def _add_counts(a: dict | None, b: dict) -> dict:
    return dict(b) if a is None else {k: a.get(k, 0) + v for k, v in b.items()}


def run_arm(srv: Server, arm: str, qs: Questions, ids: list[int], args) -> dict | None:
    """One arm over questions ``ids``: a fresh salt, the caches emptied, the warm pass
    (not scored, one token each), the measured pass (scored and counted)."""
    warm, measured = chunk_prompts(qs, arm, ids)
    if measured is None:
        return None
    salt, xargs = arm_salt(arm), arm_xargs(arm)
    srv.reset()
    warm_d = None
    if store_depth(arm):  # one primer at a time: each stitches the one before it
        for prompt in primed_warm(qs, ids, store_depth(arm))[0]:
            warm_d = _add_counts(warm_d, run_pass(srv, [prompt], xargs, salt, args, 1)[1])
    if warm is not None:
        warm_d = _add_counts(warm_d, run_pass(srv, warm, xargs, salt, args, 1)[1])
    out, d = run_pass(srv, measured, xargs, salt, args, args.max_tokens)
    f1, preds = score([c.text for c in out], [qs.answers[i] for i in ids])
    return {"ids": list(ids), "f1": f1, "predictions": preds,
            "prompt_tokens": int(d["prompt"]), "computed_tokens": int(round(computed_tokens(d))),
            "vllm_local_compute": int(d["local_compute"]), "blend_recomputed": round(d["blend_recomputed"], 1),
            "blend_reused": int(d["blend_reused"]), "blend_hits": int(d["blend_hits"]),
            "blend_load_failures": int(d["blend_load_failures"]), "measured_wall_s": round(d["wall_s"], 1),
            "warm": None if warm_d is None else {"computed_tokens": int(round(computed_tokens(warm_d))),
                                                 "blend_stored": int(warm_d["blend_stored"]),
                                                 "wall_s": round(warm_d["wall_s"], 1)}}


def add_chunk(arms: dict, arm: str, chunk: int, res: dict) -> None:
    """Merge one arm-chunk result into ``arms[arm]`` (per-question lists, per-chunk counts)."""
    a = arms.setdefault(arm, {"ids": [], "f1": [], "predictions": [], "chunks": {}})
    a["ids"] += res["ids"]
    a["f1"] += res["f1"]
    a["predictions"] += res["predictions"]
    a["chunks"][str(chunk)] = {k: v for k, v in res.items() if k not in ("ids", "f1", "predictions")}


def main(argv=None) -> int:
    from benchmarks.common import workloads
    from benchmarks.common.live import start_server
    from benchmarks.common.results import provenance, read_result, write_result
    from cp_engine import Config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, 8 questions (plumbing, not quality)")
    ap.add_argument("--model", help="model folder (default: Qwen2.5-0.5B from the offline wheel)")
    ap.add_argument("--n", type=int, help="the question set (default 300; --quick 8); BM25 pools its paragraphs")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--layout", choices=LAYOUTS, default="shuffle",
                    help="shuffle: documents reordered between passes; suffix: the agent layout (module docstring)")
    ap.add_argument("--chunk", type=int, default=10, help="questions per arm-chunk")
    ap.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")], default=list(RATIOS))
    ap.add_argument("--modes", type=lambda s: [x for x in s.split(",") if x], default=list(MODES))
    ap.add_argument("--mode-ratio", type=float, help="ratio of the mode arms (default: the flag's default)")
    ap.add_argument("--arms", help="these arms, in this (priority) order (comma-separated names as in the table; "
                                   "default: every arm in priority order)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--kv-cache-gib", type=int, default=3)
    ap.add_argument("--server-arg", action="append", default=[], help="extra vLLM argument (repeatable)")
    ap.add_argument("--out", help="result name (default blend_quality[_quick])")
    ap.add_argument("--resume", action="store_true", help="keep the arm-chunks already in the result")
    args = ap.parse_args(argv)
    prov = provenance("benchmarks.blend.bench_blend_quality", argv)
    default_ratio = Config().blend_ratio
    if args.mode_ratio is None:
        args.mode_ratio = default_ratio
    n = args.n or (8 if args.quick else 300)
    model = served_model(args.model, args.quick)
    tok = Tokenizer(model)
    qs = Questions(workloads.hotpotqa(n, k=args.k), tok, layout=args.layout)
    name = args.out or ("blend_quality_quick" if args.quick else "blend_quality")
    settings = {"model": Path(model).name, "n": n, "k": args.k, "max_tokens": args.max_tokens, "chunk": args.chunk}
    if args.layout != "shuffle":
        settings["layout"] = args.layout  # results of the default layout keep their old settings
    order = (args.arms.split(",") if args.arms
             else default_arms(args.ratios, args.modes, default_ratio, args.mode_ratio))
    data = {**settings, "default_ratio": default_ratio, "mode_ratio": args.mode_ratio, "arm_order": order,
            "note": "", "arms": {}, "summary": [], "servers": []}
    if args.resume:
        try:
            old, _ = read_result(name)
            if all(old.get(k) == v for k, v in settings.items()):
                data["arms"], data["servers"] = old["arms"], old.get("servers", [])
                data["errors"] = old.get("errors", {})
        except (OSError, ValueError, KeyError):
            pass
    have_peer = "peer" in order and qs.peer_prompts([0]) is not None
    t_start = time.perf_counter()

    def save(echo=False):
        data["note"] = run_note(data["arms"], args.mode_ratio, have_peer, args.layout)
        data["summary"] = summarize(data["arms"])
        data["wall_s"] = round(time.perf_counter() - t_start, 1)
        write_result(name, data, table=table, plot=plot, prov=prov, echo=echo)

    def todo():
        for c in range(0, n, args.chunk):
            for arm in order:
                if str(c // args.chunk) not in data["arms"].get(arm, {}).get("chunks", {}):
                    yield c // args.chunk, arm

    # A full-recompute step (up to the connector's per-step cap) on 2 shared cores can
    # outlast vLLM's 300 s execute_model timeout, which kills the engine.
    env = {"VLLM_SERVER_DEV_MODE": "1", "CP_ENGINE_BLEND": "1", "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": "3600"}
    # Always named (the flag's default is not 0); each arm sends its own depth besides.
    env["CP_ENGINE_BLEND_STORE_DEPTH"] = str(max(map(store_depth, order)))
    if next(todo(), None) is None:
        save(echo=True)
        return 0
    print(f"[blend-quality] starting vLLM ({env}) ...", file=sys.stderr, flush=True)
    with start_server(model, env, ["--max-model-len", "8192", *args.server_arg], kv_cache_gib=args.kv_cache_gib) as raw:
        srv = Server(raw.url, raw.model)
        fmt = srv.probe_span_format(qs.measured[0].ids[:16])
        data["servers"].append({"env": env, "span_format": fmt, "started": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                         time.gmtime())})
        for chunk, arm in todo():
            if arm == "peer" and not have_peer:
                continue
            ids = list(range(chunk * args.chunk, min(n, (chunk + 1) * args.chunk)))
            t0 = time.perf_counter()
            try:
                res = run_arm(srv, arm, qs, ids, args)
            except Exception as exc:  # one failed arm-chunk must not lose the others
                print(f"[blend-quality] {arm} chunk {chunk} failed: {exc!r}", file=sys.stderr, flush=True)
                data.setdefault("errors", {})[f"{arm}/{chunk}"] = repr(exc)[:500]
                if not srv.alive():
                    print("[blend-quality] the server is gone; stopping (--resume continues)", file=sys.stderr,
                          flush=True)
                    break
                continue
            if res is None:
                continue
            add_chunk(data["arms"], arm, chunk, res)
            save()
            print(f"[blend-quality] {arm} chunk {chunk}: F1 {100 * statistics.fmean(res['f1']):.1f}, computed "
                  f"{res['computed_tokens']:,} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    save(echo=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
