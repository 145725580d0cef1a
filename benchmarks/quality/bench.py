"""Answer quality with and without cp_engine: HotpotQA RAG on a live vLLM server.

    python -m benchmarks.quality --quick       # SmolLM2-135M, 50 questions, 6 sessions
    python -m benchmarks.quality               # Qwen2.5-Coder-0.5B, 300 questions, 20 sessions
    python -m benchmarks.quality --url http://GPU-HOST:8000   # an existing plugin-on server

HotpotQA dev questions, BM25 (bm25s) top-k=10 over the pooled paragraph corpus
(``benchmarks.common.workloads.hotpotqa``), greedy decoding, answers scored with SQuAD-style
F1 / exact match (HotpotQA's rule: yes/no answers only count when exact); 95%
percentile-bootstrap intervals per arm and for each arm's paired difference to off.

One plugin-on server answers every arm; requests without ``context_blocks`` pass
through it byte-identical (tests/live/test_vllm_live.py), so ``off`` and ``peer`` see
exactly the prompt plain vLLM sees. Arms:

- ``off``: the documents in retrieval order in the user turn (a client without the plugin).
- ``reorder+annotate``: documents sent as ``context_blocks``; the plugin reorders, annotates.
- ``reorder``: the plugin's pipeline with ``CP_ENGINE_ANNOTATE=0`` semantics, run client-side
  (``ContextPipeline(Config(annotate=False))``, fed in question order), sent as plain text.
- ``peer``: the peer's client-side ``contextpilot.optimize_batch`` messages.
- ``multiturn-off`` / ``multiturn-dedup``: sessions of related questions
  (``workloads.memory_chat``); off re-sends every turn's documents with the full
  history, dedup sends ``context_blocks`` + ``conversation_id`` with the short history.

Arms run in phases (multi-turn first, it is short; then off + reorder+annotate +
reorder + peer together), each over chunks of questions answered by every arm of the phase, and the JSON
(``--out``, default ``benchmarks/results/quality[_quick].json``) is rewritten after
every chunk: an interrupted run leaves paired results on the same questions, and
``--resume`` continues it. ``--plot`` redraws the PNG and markdown from the JSON.
"""
from __future__ import annotations

import argparse
import collections
import re
import statistics
import string
import sys
import time
from pathlib import Path

from benchmarks.common import live, workloads
from benchmarks.common.live import Remote, Request, choose_model, peer_messages, send_all, start_server
from benchmarks.common.results import provenance, read_result, redraw, write_result
from cp_engine.devtools.stats import bootstrap_ci, paired_bootstrap_ci

RESULTS = Path(__file__).resolve().parents[1] / "results"
SYSTEM = ("Answer the question using the documents. Reply with the answer only: "
          "a few words, no explanation.")
SINGLE_ARMS = ("off", "reorder+annotate", "reorder", "peer")
MULTI_ARMS = ("multiturn-off", "multiturn-dedup")
ALL_ARMS = SINGLE_ARMS + MULTI_ARMS


# --------------------------------------------------------------------------- scoring

def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation and articles, squeeze spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(pred: str, gold: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(gold))


def f1_score(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    # yes/no/noanswer golds only count when matched exactly (as HotpotQA's scorer does)
    if normalize_answer(gold) in ("yes", "no", "noanswer") or normalize_answer(pred) in ("yes", "no", "noanswer"):
        return float(normalize_answer(pred) == normalize_answer(gold))
    common = collections.Counter(p) & collections.Counter(g)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


_PREFIX = re.compile(r"^(the\s+)?(final\s+)?answer\s*(is)?\s*[:\-]?\s*", re.I)


def clean_prediction(text: str) -> str:
    """The model's answer: first non-empty line, without an 'Answer:' / 'The answer is' prefix."""
    for line in text.strip().splitlines():
        line = line.strip()
        if line:
            return _PREFIX.sub("", line).strip().rstrip(".").strip()
    return ""


def question_text(q: str) -> str:
    return f"Question: {q}\nAnswer with a short phrase (at most five words)."


# ------------------------------------------------------------------------- requests

def plain_messages(blocks: list[str], question: str) -> list[dict]:
    """What a client without the plugin sends: documents joined in retrieval order."""
    return live.plain_messages(SYSTEM, blocks, question)


class SingleArms:
    """Builds the request of question i for each single-turn arm."""

    def __init__(self, wl: workloads.Workload):
        self.qs = [question_text(q) for q in wl.queries]
        self.docs = [[wl.texts[b] for b in ctx] for ctx in wl.contexts]
        self._peer: dict | None = None
        self._noannot = None

    def peer_table(self) -> dict[int, list[dict]] | None:
        if self._peer is None:
            out = peer_messages(self.docs, self.qs, SYSTEM)
            self._peer = {} if out is None else {i: m for m, i in zip(out["messages"], out["order"])}
        return self._peer or None

    def request(self, arm: str, i: int) -> Request | None:
        d, q = self.docs[i], self.qs[i]
        if arm == "off":
            return Request(plain_messages(d, q), tag=(arm, i))
        if arm == "reorder+annotate":
            return Request([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
                           {"context_blocks": d}, tag=(arm, i))
        if arm == "reorder":
            # The plugin's own pipeline with CP_ENGINE_ANNOTATE=0, run client-side (same
            # code path, its own index fed in question order), sent as a plain request.
            if self._noannot is None:
                from cp_engine.config import Config
                from cp_engine.pipeline import ContextPipeline

                self._noannot = ContextPipeline(Config(annotate=False))
            msgs, prep = self._noannot.rewrite_messages(
                [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}], d)
            self._noannot.commit(i, prep)
            return Request(msgs, tag=(arm, i))
        if arm == "peer":
            table = self.peer_table()
            return Request(table[i], tag=(arm, i)) if table else None
        raise ValueError(arm)


def _accumulate(doc: dict, arm: str, results, answers) -> None:
    slot = doc["arms"].setdefault(arm, {"arm": arm, "n": 0, "ids": [], "f1": [], "em": [], "predictions": [],
                                        "prompt_tokens": 0, "cached_tokens": 0, "recomputed_tokens": 0,
                                        "wall_s": 0.0})
    for r in sorted(results, key=lambda r: r.tag[1]):
        i = r.tag[1]
        pred = clean_prediction(r.text)
        slot["ids"].append(i)
        slot["predictions"].append(pred)
        slot["f1"].append(f1_score(pred, answers[i]))
        slot["em"].append(exact_match(pred, answers[i]))
        slot["prompt_tokens"] += r.prompt_tokens
        slot["cached_tokens"] += r.cached_tokens
        slot["recomputed_tokens"] += r.prompt_tokens - r.cached_tokens
    slot["n"] = len(slot["ids"])


def _fold(doc, arms, results, wall: float, answers, step: str) -> None:
    """Add one step's results to each arm (wall time shared in proportion) and report."""
    for a in arms:
        mine = [r for r in results if r.tag[0] == a]
        if mine:
            _accumulate(doc, a, mine, answers)
            doc["arms"][a]["wall_s"] = round(doc["arms"][a]["wall_s"] + wall * len(mine) / len(results), 1)
    print(f"[quality] {step}: " + "  ".join(
        f"{a}: F1 {100 * statistics.fmean(doc['arms'][a]['f1']):.1f} (n={doc['arms'][a]['n']})"
        for a in arms if a in doc["arms"]), file=sys.stderr, flush=True)


def run_single_phase(doc, arms, srv, wl, builder: SingleArms, chunk: int, concurrency: int,
                     max_tokens: int, save) -> None:
    """Questions in chunks; every arm of the phase answers each chunk (interleaved), so an
    interrupted run leaves paired results on the same questions."""
    answers = wl.meta["answers"]
    arms = [a for a in arms if a != "peer" or builder.peer_table()]
    done = {a: set(doc["arms"].get(a, {}).get("ids", [])) for a in arms}
    n = len(wl.queries)
    for lo in range(0, n, chunk):
        reqs = []
        # Arm-major within a chunk: "reorder" renders the same block order as
        # "reorder+annotate" minus the annotation, so sent after it, it is mostly
        # served from the prefix cache (the chunk fits in the KV cache).
        for a in arms:
            for i in range(lo, min(n, lo + chunk)):
                if i not in done[a]:
                    r = builder.request(a, i)
                    if r is not None:
                        reqs.append(r)
                elif a == "reorder":
                    builder.request(a, i)  # keep the client-side index in question order on resume
        if not reqs:
            continue
        results, wall = send_all(srv.url + "/v1", srv.model, reqs, concurrency=concurrency,
                                 max_tokens=max_tokens, progress=f"q{lo}-{lo + chunk} {'/'.join(arms)}")
        _fold(doc, arms, results, wall, answers, f"q{lo}-{lo + chunk}")
        save()


def run_multiturn_phase(doc, arms, srv, wl, chunk: int, concurrency: int, max_tokens: int, save,
                        tag: str) -> None:
    """Sessions in chunks; within a chunk every (session, arm) runs its turns in order, in
    parallel; ``tag`` (the run's start) keeps conversation ids apart from earlier runs'."""
    from concurrent.futures import ThreadPoolExecutor

    from benchmarks.common.live import _client, run_session

    answers = wl.meta["answers"]
    client = _client(srv.url + "/v1")
    t0 = time.perf_counter()

    def session(job):
        arm, s_idx = job
        turns = [([wl.texts[b] for b in wl.contexts[i]], question_text(wl.queries[i]), (arm, i))
                 for i in wl.sessions[s_idx]]
        return run_session(client, srv.model, SYSTEM, turns, arm == "multiturn-dedup",
                           f"q-{tag}-{s_idx}", max_tokens, False, t0)

    done = {a: set(doc["arms"].get(a, {}).get("ids", [])) for a in arms}
    for lo in range(0, len(wl.sessions), chunk):
        jobs = [(a, s) for s in range(lo, min(len(wl.sessions), lo + chunk)) for a in arms
                if wl.sessions[s][0] not in done[a]]
        if not jobs:
            continue
        t1 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            results = [r for rs in pool.map(session, jobs) for r in rs]
        wall = time.perf_counter() - t1
        _fold(doc, arms, results, wall, answers, f"sessions {lo}-{lo + chunk}")
        save()


def summarize(arm: dict, base: dict | None) -> dict:
    f1 = bootstrap_ci(arm["f1"])
    em = bootstrap_ci(arm["em"])
    row = {"arm": arm["arm"], "n": arm["n"], "f1": [round(100 * x, 2) for x in f1],
           "em": [round(100 * x, 2) for x in em], "prompt_tokens": arm["prompt_tokens"],
           "recomputed_tokens": arm["recomputed_tokens"], "wall_s": arm["wall_s"]}
    if base is not None and base is not arm:
        ours = dict(zip(arm["ids"], arm["f1"]))
        theirs = dict(zip(base["ids"], base["f1"]))
        common = sorted(set(ours) & set(theirs))
        if common:
            d = paired_bootstrap_ci([theirs[i] for i in common], [ours[i] for i in common])
            row["f1_delta_vs_off"] = [round(100 * x, 2) for x in d]
            row["paired_n"] = len(common)
        if set(arm["ids"]) == set(base["ids"]):
            row["recomputed_ratio_vs_off"] = round(base["recomputed_tokens"] / max(1, arm["recomputed_tokens"]), 3)
    return row


# --------------------------------------------------------------------------- output

def write_outputs(doc: dict, out: Path, prov: dict, echo: bool = False) -> None:
    write_result(out, doc, table=markdown, plot=plot, prov=prov, echo=echo)


def summary_rows(doc: dict) -> list[dict]:
    arms = doc["arms"]
    rows = []
    for name in ALL_ARMS:
        if name in arms:
            base = arms.get("multiturn-off" if name.startswith("multiturn") else "off")
            rows.append(summarize(arms[name], base))
    return rows


def plot(doc: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = summary_rows(doc)
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    xs = range(len(rows))
    mids = [r["f1"][0] for r in rows]
    errs = [[r["f1"][0] - r["f1"][1] for r in rows], [r["f1"][2] - r["f1"][0] for r in rows]]
    colors = ["#888888" if r["arm"] in ("off", "multiturn-off") else "#cc7733" if r["arm"] == "peer"
              else "#3366aa" for r in rows]
    ax.bar(xs, mids, yerr=errs, capsize=4, color=colors)
    ax.set_xticks(list(xs), [f"{r['arm']}\nn={r['n']}" for r in rows], rotation=15, fontsize=8)
    ax.set_ylabel("answer F1 (%), 95% bootstrap CI")
    cfg = doc["config"]
    ax.set_title(f"HotpotQA BM25 top-{cfg['k']}, {cfg['model_name']} "
                 f"({max(r['n'] for r in rows)} of {cfg['questions']} questions answered)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(doc: dict) -> str:
    cfg = doc["config"]
    lines = [
        f"Model `{cfg['model_name']}`; HotpotQA dev, {cfg['questions']} questions, BM25 top-{cfg['k']} "
        f"over the pooled corpus; multi-turn: {cfg.get('sessions')} sessions ({cfg.get('turns')} turns, "
        f"k={cfg.get('chat_k')}), {cfg.get('multiturn_questions', '?')} turns; greedy, max {cfg['max_tokens']} "
        f"tokens; wall time {doc.get('wall_s', '?')} s.",
        "",
        "| arm | n | F1 (95% CI) | EM (95% CI) | ΔF1 vs off (paired 95% CI) | prompt tokens / question |",
        "|---|---|---|---|---|---|",
    ]
    for r in summary_rows(doc):
        f, e = r["f1"], r["em"]
        d = r.get("f1_delta_vs_off")
        lines.append(
            f"| {r['arm']} | {r['n']} | {f[0]:.1f} [{f[1]:.1f}, {f[2]:.1f}] | {e[0]:.1f} [{e[1]:.1f}, {e[2]:.1f}] | "
            + (f"{d[0]:+.1f} [{d[1]:+.1f}, {d[2]:+.1f}]" + (f" (n={r['paired_n']})" if r.get("paired_n") != r["n"] else "")
               if d else "—")
            + f" | {r['prompt_tokens'] / max(1, r['n']):,.0f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

# Multi-turn first (20 sessions, short), then every single-question arm per chunk, so a
# run cut short still leaves all arms paired on the same questions.
PHASES = (MULTI_ARMS, SINGLE_ARMS)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="SmolLM2-135M, 50 questions, 6 sessions")
    ap.add_argument("--model", help="local HF folder (default: smollm2 with --quick, else qwen0.5b)")
    ap.add_argument("--url", help="an already running plugin-on vLLM server (e.g. a GPU server)")
    ap.add_argument("--questions", type=int)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--sessions", type=int)
    ap.add_argument("--chat-k", type=int, default=5, help="documents per multi-turn turn")
    ap.add_argument("--arms", default=",".join(ALL_ARMS))
    ap.add_argument("--chunk", type=int, default=25, help="questions (sessions / 5) per saved step")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--kv-cache-gib", type=int, default=3)
    ap.add_argument("--server-arg", action="append", default=[], help="extra vLLM argument (repeatable)")
    ap.add_argument("--out")
    ap.add_argument("--resume", action="store_true", help="keep the answers already in --out (same settings)")
    ap.add_argument("--plot", action="store_true", help="only redraw PNG/markdown from --out")
    args = ap.parse_args(argv)

    out = Path(args.out) if args.out else RESULTS / ("quality_quick.json" if args.quick else "quality.json")
    if args.plot:
        redraw(out, table=markdown, plot=plot)
        return 0
    n_q = args.questions or (50 if args.quick else 300)
    n_s = args.sessions if args.sessions is not None else (6 if args.quick else 20)
    turns = (2, 4)
    def packaged():
        from benchmarks.quality.models import SPECS, model_dir

        key = "smollm2" if args.quick else "qwen0.5b"
        return model_dir(key), SPECS[key].name

    model, model_name = choose_model(args.model, bool(args.url), packaged)
    arms = [a for a in args.arms.split(",") if a]
    unknown = set(arms) - set(ALL_ARMS)
    if unknown:
        ap.error(f"unknown arms {sorted(unknown)}")

    wl = workloads.hotpotqa(n_q, k=args.k)
    chat = workloads.memory_chat(n_s, turns=turns, k=args.chat_k) if n_s and set(arms) & set(MULTI_ARMS) else None
    cfg = {"model_name": model_name, "questions": n_q, "k": args.k, "sessions": n_s, "turns": list(turns),
           "chat_k": args.chat_k, "multiturn_questions": len(chat.contexts) if chat else 0,
           "max_tokens": args.max_tokens, "concurrency": args.concurrency, "system": SYSTEM,
           "bound_tokens": round(wl.bound(weighted=True), 4)}
    doc = {"config": cfg, "arms": {}, "wall_s": 0.0}
    prov = provenance("benchmarks.quality", argv)
    if args.resume and out.exists():
        old, old_prov = read_result(out)
        keys = ("model_name", "questions", "k", "sessions", "chat_k", "max_tokens", "system")
        if all(old["config"].get(k) == cfg[k] for k in keys):
            doc["arms"], doc["wall_s"] = old["arms"], old.get("wall_s", 0.0)
            prov["date"] = old_prov["date"]
            print(f"[quality] resuming: " + ", ".join(f"{a} n={v['n']}" for a, v in doc["arms"].items()),
                  file=sys.stderr)
    t_start = time.perf_counter() - float(doc["wall_s"] or 0)

    def save() -> None:
        doc["wall_s"] = round(time.perf_counter() - t_start, 1)
        write_outputs(doc, out, prov)

    if args.url:
        srv_cm = Remote(args.url)
    else:
        print(f"[quality] starting vLLM (plugin on) with {model_name} ...", file=sys.stderr, flush=True)
        srv_cm = start_server(model, {}, ["--max-model-len", str(args.max_model_len), *args.server_arg],
                              kv_cache_gib=args.kv_cache_gib)
    builder = SingleArms(wl)
    with srv_cm as srv:
        for phase in PHASES:
            mine = [a for a in phase if a in arms]
            if not mine:
                continue
            if phase is MULTI_ARMS:
                if chat is not None:
                    run_multiturn_phase(doc, mine, srv, chat, max(1, args.chunk // 5), args.concurrency,
                                        args.max_tokens, save, tag=prov["date"])
            else:
                run_single_phase(doc, mine, srv, wl, builder, args.chunk, args.concurrency, args.max_tokens, save)
    doc["wall_s"] = round(time.perf_counter() - t_start, 1)
    write_outputs(doc, out, prov, echo=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
