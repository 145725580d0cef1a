#!/usr/bin/env python
"""Live demo: the same RAG workload against vLLM with cp_engine off, then on.

    python scripts/demo_vllm.py                 # tiny offline model
    python scripts/demo_vllm.py --model DIR     # any local HF model folder

Starts ``vllm serve`` (``VllmServer``; the API server module where the CLI cannot run)
on 127.0.0.1 twice (plugin disabled with ``CP_ENGINE_DISABLE=1``, then enabled), prints
progress at each stage, sends identical requests and
prints vLLM's own numbers side by side: prefix-cache hit ratio
(``vllm:prefix_cache_hits_total / queries``), prompt tokens, prompt tokens computed
(not served from cache), and wall time. Without the plugin the client puts the
retrieved documents into the prompt itself, in retrieval order; with it the client
sends them as ``context_blocks`` (the plugin chooses the order, dedups per
conversation, annotates). ``bound`` is 1 - unique/total blocks: what a perfect
block-level cache could reuse. The table goes to ``--out`` (``results.md`` and
``results.json``, default ``build/demo``), rewritten after each server so a failed second
half keeps the first; server logs stay in ``build/logs`` (``CP_VLLM_LOG_DIR``).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

from cp_engine.devtools.vllm_server import VllmServer, cached_tokens, prompt_tokens, tiny_model_dir
from cp_engine.marking import fallback_messages, find_marks

SYSTEM = "You are a helpful assistant. Answer from the documents."
_WORDS = ("river mountain library engine market garden signal window harbor planet theory lantern "
          "castle orbit meadow copper violin desert thunder crystal archive bridge compass falcon").split()


def make_doc(i: int, words: int) -> str:
    rng = random.Random(i)
    return f"Document {i}: " + " ".join(rng.choice(_WORDS) for _ in range(words)) + "."


def rag_workload(n_requests: int, n_docs: int, k: int, seed: int) -> list[list[int]]:
    """Each request retrieves k docs, popular ones more often, in a random rank order."""
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) for i in range(n_docs)]  # Zipf(1) popularity
    out = []
    for _ in range(n_requests):
        picked: list[int] = []
        while len(picked) < k:
            d = rng.choices(range(n_docs), weights)[0]
            if d not in picked:
                picked.append(d)
        rng.shuffle(picked)
        out.append(picked)
    return out


def chat_turns(n_convs: int, turns: int, n_docs: int, k: int, seed: int) -> list[list[list[int]]]:
    """Multi-turn sessions whose turns retrieve overlapping documents."""
    rng = random.Random(seed)
    convs = []
    for c in range(n_convs):
        pool = rng.sample(range(n_docs), k + turns)
        convs.append([pool[t: t + k] for t in range(turns)])
    return convs


def stage(text: str) -> None:
    print(f"[demo] {text}", file=sys.stderr, flush=True)


def run(srv: VllmServer, docs: list[str], rag: list[list[int]], convs: list[list[list[int]]], plugin: bool) -> dict:
    h0, q0 = srv.metric("vllm:prefix_cache_hits_total"), srv.metric("vllm:prefix_cache_queries_total")
    totals = {"prompt": 0, "cached": 0, "sent": 0}
    n_total = len(rag) + sum(len(turns) for turns in convs)
    t0 = time.perf_counter()

    def send(messages, blocks, conv=None):
        if plugin:
            extra = {"context_blocks": blocks}
            if conv:
                extra["conversation_id"] = conv
            r = srv.chat(messages, max_tokens=1, **extra)
        else:
            if blocks:  # what a client without the plugin sends: documents in retrieval order
                messages = fallback_messages(find_marks({"context_blocks": blocks}, messages))
            r = srv.chat(messages, max_tokens=1)
        totals["prompt"] += prompt_tokens(r)
        totals["cached"] += cached_tokens(r)
        totals["sent"] += 1
        if totals["sent"] % 10 == 0 or totals["sent"] == n_total:
            stage(f"  {totals['sent']}/{n_total} requests answered ({time.perf_counter() - t0:.0f} s)")

    for i, ids in enumerate(rag):
        send([{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Question {i}?"}],
             [docs[d] for d in ids])
    for c, turns in enumerate(convs):
        history: list = [{"role": "system", "content": SYSTEM}]
        plain_history: list = list(history)
        for t, ids in enumerate(turns):
            q = {"role": "user", "content": f"Conversation {c}, turn {t}: what changed?"}
            blocks = [docs[d] for d in ids]
            if plugin:  # the client keeps its own short history; the plugin replays the rest
                send(history + [q], blocks, conv=f"demo-{c}")
                history += [q, {"role": "assistant", "content": "Noted."}]
            else:  # a plain client re-sends every retrieved document inside each turn
                msgs = plain_history + [q]
                rendered = fallback_messages(find_marks({"context_blocks": blocks}, msgs))
                send(rendered, [])  # already rendered
                plain_history = rendered + [{"role": "assistant", "content": "Noted."}]
    wall = time.perf_counter() - t0
    hits = srv.metric("vllm:prefix_cache_hits_total") - h0
    queries = srv.metric("vllm:prefix_cache_queries_total") - q0
    return {"hit_ratio": hits / queries if queries else 0.0, "prompt": totals["prompt"],
            "computed": totals["prompt"] - totals["cached"], "wall_s": wall}


ROWS = (("prefix-cache hit ratio", "hit_ratio", "{:.3f}"), ("prompt tokens", "prompt", "{:d}"),
        ("prompt tokens computed", "computed", "{:d}"), ("wall time (s)", "wall_s", "{:.1f}"))
ARMS = (("plugin off", {"CP_ENGINE_DISABLE": "1"}), ("plugin on", {}))


def table(results: dict) -> list[str]:
    """The off/on comparison as fixed-width lines (only the arms that finished)."""
    names = [n for n, _ in ARMS if n in results]
    lines = [f"{'':28}" + "".join(f"{n:>12}" for n in names) + (f"{'gain':>9}" if len(names) == 2 else "")]
    for label, key, fmt in ROWS:
        cells = [results[n][key] for n in names]
        row = f"{label:28}" + "".join(f"{fmt.format(v):>12}" for v in cells)
        if len(cells) == 2:
            a, b = cells
            # gain > 1 is better: more hits, fewer tokens, less time
            num, den = (b, a) if key == "hit_ratio" else (a, b)
            row += f"{num / den:.2f}x".rjust(9) if den else "-".rjust(9)
        lines.append(row)
    return lines


def write_results(out_dir: str, summary: str, results: dict, meta: dict) -> tuple[str, str]:
    """``results.md`` (the table) and ``results.json`` (numbers and settings) in ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    md_path, json_path = os.path.join(out_dir, "results.md"), os.path.join(out_dir, "results.json")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(f"# cp_engine live demo ({meta['finished_at']})\n\n{summary}\n\n```\n"
                + "\n".join(table(results)) + "\n```\n\nServer logs: " + ", ".join(meta["logs"].values()) + "\n")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump({"results": results, **meta}, f, indent=2)
    return md_path, json_path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="local model folder (default: build the tiny offline model)")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--docs", type=int, default=30)
    ap.add_argument("--k", type=int, default=4, help="documents per RAG request")
    ap.add_argument("--doc-words", type=int, default=120, help="~2.8 tiny-model tokens per word")
    ap.add_argument("--conversations", type=int, default=4)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--chat-k", type=int, default=2, help="documents per conversation turn")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--server-arg", action="append", default=[], help="extra vLLM server argument (repeatable)")
    ap.add_argument("--out", default=os.path.join("build", "demo"), help="folder for results.md / results.json")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    if args.model:
        model = args.model
    else:
        stage("building the tiny offline model (cached after the first run) ...")
        t0 = time.perf_counter()
        model = tiny_model_dir()
        stage(f"model ready at {model} ({time.perf_counter() - t0:.0f} s)")
    docs = [make_doc(i, args.doc_words) for i in range(args.docs)]
    rag = rag_workload(args.requests, args.docs, args.k, args.seed)
    convs = chat_turns(args.conversations, args.turns, args.docs, args.chat_k, args.seed + 1)
    all_blocks = [d for r in rag for d in r]
    bound = 1 - len(set(all_blocks)) / len(all_blocks)
    summary = (f"RAG: {args.requests} requests x {args.k} of {args.docs} docs, plus {args.conversations} "
               f"conversations x {args.turns} turns; block-reuse bound (RAG) 1-unique/total = {bound:.2f}")
    extra = tuple(args.server_arg)
    results: dict = {}
    meta: dict = {"model": model, "args": vars(args), "logs": {}, "server_start_s": {}}
    for name, env in ARMS:
        stage(f"starting vLLM ({name}); progress below, it can take minutes on a busy machine")
        t0 = time.perf_counter()
        with VllmServer(model, env=env, extra_args=extra, name="demo-" + name.replace(" ", "-")) as srv:
            meta["logs"][name] = srv.log_path
            meta["server_start_s"][name] = round(time.perf_counter() - t0, 1)
            stage(f"sending the workload ({name}) ...")
            results[name] = run(srv, docs, rag, convs, plugin=(name == "plugin on"))
        meta["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        meta["demo_wall_s"] = round(time.perf_counter() - t_start, 1)
        md_path, json_path = write_results(os.path.abspath(args.out), summary, results, meta)
    print(f"\n{summary}\n")
    print("\n".join(table(results)))
    stage(f"done in {time.perf_counter() - t_start:.0f} s; results: {md_path} and {json_path}")
    for name, path in meta["logs"].items():
        stage(f"server log ({name}): {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
