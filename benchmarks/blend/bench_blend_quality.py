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
- ``peer``: ContextPilot's ``optimize_batch`` messages, when its venv exists.

The ratio and the mode are engine flags, so each blend setting gets its own server
(``plain``, ``prefix`` and ``peer`` share the first); every arm uses its own
``cache_salt``, which scopes both vLLM's prefix cache and the blend store, so no arm
reuses another's KV. Tokens computed (measured pass) = vLLM's ``local_compute`` prompt
tokens + ``cp_engine_blend_recomputed_tokens_total`` (``/metrics`` deltas).
Results: ``benchmarks/results/blend_quality[_quick].{json,table.md,png}``, rewritten
after every arm; ``--resume`` keeps the arms already in the JSON (same settings).
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


class Questions:
    """The questions, their documents and every arm's prompts (token ids, spans)."""

    def __init__(self, wl, tok: Tokenizer, seed: int = 0):
        from benchmarks.common.live import plain_messages
        from benchmarks.quality.bench import SYSTEM, question_text

        self.system = SYSTEM
        self.answers = list(wl.meta["answers"])
        self.qs = [question_text(q) for q in wl.queries]
        self.docs = [[wl.texts[b] for b in ctx] for ctx in wl.contexts]
        self.orders = [measured_order(len(d), seed, i) for i, d in enumerate(self.docs)]
        self.tok = tok
        self.warm = [tok.blocks(plain_messages(SYSTEM, d, q), d) for d, q in zip(self.docs, self.qs)]
        self.shuffled = [[d[j] for j in o] for d, o in zip(self.docs, self.orders)]
        self.measured = [tok.blocks(plain_messages(SYSTEM, d, q), d) for d, q in zip(self.shuffled, self.qs)]

    def __len__(self) -> int:
        return len(self.qs)

    def prefix_prompts(self) -> tuple[list, list]:
        """(warm, measured) prompts of cp_engine's prefix plan, its index fed in send order."""
        from cp_engine import Config
        from cp_engine.pipeline import ContextPipeline

        pipe = ContextPipeline(Config())
        out = []
        for k, docs in enumerate((self.docs, self.shuffled)):
            rows = []
            for i, (d, q) in enumerate(zip(docs, self.qs)):
                base = [{"role": "system", "content": self.system}, {"role": "user", "content": q}]
                msgs, prep = pipe.rewrite_messages(base, list(d))
                pipe.commit(k * len(self.qs) + i, prep)
                rows.append(self.tok.blocks(msgs, d))
            out.append(rows)
        return out[0], out[1]

    def peer_prompts(self) -> list | None:
        """The peer's batch plan over the measured documents, in question order; None
        without the peer's venv."""
        from benchmarks.common.live import peer_messages

        out = peer_messages(self.shuffled, self.qs, self.system)
        if out is None:
            return None
        table = {i: m for m, i in zip(out["messages"], out["order"])}
        return [self.tok.blocks(table[i], d) for i, d in enumerate(self.shuffled)]


# ---------------------------------------------------------------------------- scoring

def score(predictions: list[str], answers: list[str]) -> tuple[list[float], list[str]]:
    """Per-question F1 of the raw completions and the cleaned predictions."""
    from benchmarks.quality.bench import clean_prediction, f1_score

    preds = [clean_prediction(p) for p in predictions]
    return [f1_score(p, a) for p, a in zip(preds, answers)], preds


def summarize(arms: dict, base: str = "plain") -> list[dict]:
    """Per arm: F1 with its 95 % bootstrap CI, ΔF1 paired against ``base`` on the
    questions both answered, and the tokens computed in the measured pass."""
    ref = arms.get(base)
    rows = []
    for name, a in arms.items():
        f1 = [round(100 * x, 2) for x in bootstrap_ci(a["f1"])]
        row = {"arm": name, "n": len(a["f1"]), "f1": f1, "computed_tokens": a["computed_tokens"],
               "prompt_tokens": a["prompt_tokens"], "blend_recomputed": a.get("blend_recomputed", 0),
               "blend_hits": a.get("blend_hits", 0)}
        if ref is not None and name != base:
            theirs = dict(zip(ref["ids"], ref["f1"]))
            common = [(theirs[i], f) for i, f in zip(a["ids"], a["f1"]) if i in theirs]
            if common:
                d = paired_bootstrap_ci([x for x, _ in common], [y for _, y in common])
                row["df1_vs_plain"] = [round(100 * x, 2) for x in d]
                row["paired_n"] = len(common)
        if ref is not None and ref["computed_tokens"] and a["computed_tokens"]:
            row["computed_plain_over_arm"] = round(ref["computed_tokens"] / a["computed_tokens"], 3)
        rows.append(row)
    return rows


def table(data: dict) -> str:
    lines = [f"Model `{data['model']}`; HotpotQA dev, {data['n']} questions, BM25 top-{data['k']}; greedy, "
             f"max {data['max_tokens']} tokens. {data['note']}", "",
             "| arm | n | F1 (95% CI) | ΔF1 vs plain (paired 95% CI) | computed tok (measured pass) | plain/arm | "
             "blend recomputed | blend hits |", "|---|---|---|---|---|---|---|---|"]
    for r in data["summary"]:
        f, d = r["f1"], r.get("df1_vs_plain")
        lines.append(f"| {r['arm']} | {r['n']} | {f[0]:.1f} [{f[1]:.1f}, {f[2]:.1f}] | "
                     + (f"{d[0]:+.1f} [{d[1]:+.1f}, {d[2]:+.1f}]" if d else "—")
                     + f" | {r['computed_tokens']:,} | {r.get('computed_plain_over_arm', 0):.2f}× | "
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
        ax.errorbar([r["computed_tokens"]], [f[0]], yerr=[[f[0] - f[1]], [f[2] - f[0]]], fmt="o", color=color,
                    capsize=3)
        ax.annotate(r["arm"], (r["computed_tokens"], f[0]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("prompt tokens computed in the measured pass (vLLM + blend)")
    ax.set_ylabel("answer F1 (%), 95% bootstrap CI")
    ax.set_title(f"Blend quality, HotpotQA n={data['n']}, {data['model']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------- running

def arm_plan(args, have_peer: bool) -> list[dict]:
    """Servers in order, each with its arms: the first also serves plain, prefix, peer."""
    servers = []
    for j, r in enumerate(args.ratios):
        arms = [f"blend@{r:g}"]
        if j == 0:
            arms = ["plain", "prefix"] + (["peer"] if have_peer else []) + arms
        servers.append({"env": {"CP_ENGINE_BLEND": "1", "CP_ENGINE_BLEND_RATIO": f"{r:g}"}, "arms": arms})
    for mode in args.modes:
        servers.append({"env": {"CP_ENGINE_BLEND": "1", "CP_ENGINE_BLEND_RATIO": f"{args.mode_ratio:g}",
                                "CP_ENGINE_BLEND_MODE": mode}, "arms": [f"{mode}@{args.mode_ratio:g}"]})
    return servers


def run_pass(srv: Server, prompts, spans: bool, salt: str, args) -> tuple[list, dict]:
    reqs = [TokenRequest(r.ids, list(r.spans) if spans and r.spans else None, salt, i)
            for i, r in enumerate(prompts)]
    before = srv.counters()
    t0 = time.perf_counter()
    out = srv.send_batch(reqs, args.max_tokens, args.concurrency)
    wall = time.perf_counter() - t0
    time.sleep(1.5)  # the last step's stats reach /metrics just after the last response
    d = delta(before, srv.counters())
    d["wall_s"] = wall
    return out, d


def run_note(arms: dict, mode_ratio: float, have_peer: bool) -> str:
    """The result's note, saying only what the arms that actually ran did."""
    note = "Warm pass (retrieval order) then measured pass (seeded shuffle, first document moved)"
    if any(a.startswith(("first_tokens", "deviation")) for a in arms):
        note += f"; mode arms at ratio {mode_ratio:g}"
    if "peer" in arms:
        note += "; peer ran"
    elif have_peer:
        note += "; peer available, not run"
    return note + "; arms run: " + ", ".join(arms) + "."


def arm_salt(arm: str) -> str:
    """A fresh ``cache_salt`` for one arm's run. vLLM refuses a salt holding ``@``, ``/``,
    ``\\`` or NUL, or longer than 128 characters, and arm names carry ``@``."""
    return f"q-{re.sub(r'[^A-Za-z0-9._-]', '_', arm)[:80]}-{uuid.uuid4().hex[:12]}"


def run_arm(srv: Server, arm: str, qs: Questions, prompts: dict, args) -> dict | None:
    salt = arm_salt(arm)
    blend = "@" in arm
    if arm == "plain":
        warm, measured = None, qs.measured
    elif arm == "prefix":
        warm, measured = prompts["prefix"]
    elif arm == "peer":
        warm, measured = None, prompts.get("peer")
        if measured is None:
            return None
    else:
        warm, measured = qs.warm, qs.measured
    srv.reset()
    warm_d = None
    if warm is not None:
        _, warm_d = run_pass(srv, warm, blend, salt, args)
    out, d = run_pass(srv, measured, blend, salt, args)
    f1, preds = score([c.text for c in out], qs.answers)
    return {"ids": list(range(len(qs))), "f1": f1, "predictions": preds,
            "prompt_tokens": int(d["prompt"]), "computed_tokens": int(round(computed_tokens(d))),
            "vllm_local_compute": int(d["local_compute"]), "blend_recomputed": round(d["blend_recomputed"], 1),
            "blend_reused": int(d["blend_reused"]), "blend_hits": int(d["blend_hits"]),
            "measured_wall_s": round(d["wall_s"], 1),
            "warm": None if warm_d is None else {"computed_tokens": int(round(computed_tokens(warm_d))),
                                                 "blend_stored": int(warm_d["blend_stored"]),
                                                 "wall_s": round(warm_d["wall_s"], 1)}}


def main(argv=None) -> int:
    from benchmarks.common import workloads
    from benchmarks.common.live import start_server
    from benchmarks.common.results import provenance, read_result, write_result

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, 8 questions (plumbing, not quality)")
    ap.add_argument("--model", help="model folder (default: Qwen2.5-0.5B from the offline wheel)")
    ap.add_argument("--n", type=int, help="questions (default 300; --quick 8)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")], default=list(RATIOS))
    ap.add_argument("--modes", type=lambda s: [x for x in s.split(",") if x], default=list(MODES))
    ap.add_argument("--mode-ratio", type=float, help="ratio of the mode arms (default: the flag's default)")
    ap.add_argument("--arms", help="keep only these arms (comma-separated names as in the table)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--kv-cache-gib", type=int, default=3)
    ap.add_argument("--server-arg", action="append", default=[], help="extra vLLM argument (repeatable)")
    ap.add_argument("--out", help="result name (default blend_quality[_quick])")
    ap.add_argument("--resume", action="store_true", help="keep the arms already in the result (same settings)")
    args = ap.parse_args(argv)
    prov = provenance("benchmarks.blend.bench_blend_quality", argv)
    if args.mode_ratio is None:
        from cp_engine import Config

        args.mode_ratio = Config().blend_ratio
    n = args.n or (8 if args.quick else 300)
    model = served_model(args.model, args.quick)
    tok = Tokenizer(model)
    qs = Questions(workloads.hotpotqa(n, k=args.k), tok)
    name = args.out or ("blend_quality_quick" if args.quick else "blend_quality")
    settings = {"model": Path(model).name, "n": n, "k": args.k, "max_tokens": args.max_tokens}
    data = {**settings, "ratios": args.ratios, "modes": args.modes, "mode_ratio": args.mode_ratio,
            "note": "", "arms": {}, "summary": [], "servers": []}
    if args.resume:
        try:
            old, _ = read_result(name)
            if all(old.get(k) == v for k, v in settings.items()):
                data["arms"] = old["arms"]
        except (OSError, ValueError, KeyError):
            pass
    prompts = {"prefix": qs.prefix_prompts()}
    peer = qs.peer_prompts()
    if peer is not None:
        prompts["peer"] = peer
    keep = set(args.arms.split(",")) if args.arms else None
    t_start = time.perf_counter()

    def save(echo=False):
        data["note"] = run_note(data["arms"], args.mode_ratio, peer is not None)
        data["summary"] = summarize(data["arms"])
        data["wall_s"] = round(time.perf_counter() - t_start, 1)
        write_result(name, data, table=table, plot=plot, prov=prov, echo=echo)

    for server in arm_plan(args, peer is not None):
        arms = [a for a in server["arms"] if a not in data["arms"] and (keep is None or a in keep)]
        if not arms:
            continue
        env = {"VLLM_SERVER_DEV_MODE": "1", **server["env"]}
        print(f"[blend-quality] starting vLLM ({env}) for {arms} ...", file=sys.stderr, flush=True)
        with start_server(model, env, ["--max-model-len", "8192", *args.server_arg],
                          kv_cache_gib=args.kv_cache_gib) as raw:
            srv = Server(raw.url, raw.model)
            fmt = srv.probe_span_format(qs.measured[0].ids[:16])
            data["servers"].append({"env": env, "span_format": fmt, "arms": arms})
            for arm in arms:
                t0 = time.perf_counter()
                try:
                    res = run_arm(srv, arm, qs, prompts, args)
                except Exception as exc:  # one failed arm must not lose the others
                    print(f"[blend-quality] {arm} failed: {exc!r}", file=sys.stderr, flush=True)
                    data.setdefault("errors", {})[arm] = repr(exc)[:500]
                    continue
                if res is None:
                    continue
                data["arms"][arm] = res
                save()
                print(f"[blend-quality] {arm}: F1 {100 * statistics.fmean(res['f1']):.1f}, computed "
                      f"{res['computed_tokens']:,} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    save(echo=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
