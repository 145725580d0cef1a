"""Interleaved A/B of vLLM server settings on the same requests, with the box's drift cancelled.

All servers are up at once and receive the same request lists in rotating order, one
server at a time (prefix cache reset before each list), for several rounds; compare
the medians. Use it for questions the full engine benchmark cannot answer because its
two servers run minutes apart on a box whose speed drifts (measured: the same
pre-rendered requests ran at 11,300 to 13,300 recomputed tokens/s on four server
starts): for example, what the plugin costs on traffic it does not rewrite.

    python -m benchmarks.engine.server_ab                      # off / on / on without the queue, 3 rounds
    python -m benchmarks.engine.server_ab --n 100 --rounds 5 --servers off,on
    python -m benchmarks.engine.server_ab --servers on --n 400 --rounds 2 --model-shape prefill \
        --lists off,on,on+batch,noannot,peer      # every batched-RAG arm on one server
    python -m benchmarks.engine.server_ab --quick              # off / on, 16 requests, 1 round: engine_ab_quick.*

Request lists (``--lists``; default ``off,noannot``): the first N requests of the Zipf
RAG batch as the engine benchmark sends them for an arm: ``off`` (documents in retrieval
order), ``noannot`` (the batch plan, unlabelled), ``on+batch``, ``peer`` (plain prompts
all, which pass through a plugin-on server unmodified) and ``on`` (``context_blocks``,
rewritten online; only for plugin-on servers). With one server and several lists this
is the drift-free way to time the arms against each other: the list order rotates
every round too.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from contextlib import ExitStack
from pathlib import Path

from benchmarks.common.live import send_all, start_server
from benchmarks.common.results import RESULTS, provenance, write_result
from benchmarks.engine.arms import NOANNOT, rag_requests
from benchmarks.engine.runner import reset_cache, warm_up, warmup_requests
from benchmarks.engine.servers import SERVER_ENV, model_folder
from benchmarks.engine.tokens import block_token_counter
from benchmarks.engine.workloads import rag_zipf
from cp_engine.devtools.tiny_model import SHAPES

LISTS = {"off": "off", "on": "on", "on+batch": "on+batch", "noannot": NOANNOT, "peer": "peer"}
SERVERS = {**SERVER_ENV, "nosched": {**SERVER_ENV["on"], "CP_ENGINE_SCHEDULE": "0"},
           "nosync": {**SERVER_ENV["on"], "CP_ENGINE_EVICTION_SYNC": "0"}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="servers off,on, 16 requests per list, one round")
    ap.add_argument("--servers", default=None, help=f"comma-separated, from {sorted(SERVERS)} "
                                                    "(default off,on,nosched; off,on with --quick)")
    ap.add_argument("--n", type=int, default=None, help="requests per list (default 100, 16 with --quick)")
    ap.add_argument("--rounds", type=int, default=None, help="default 3 (1 with --quick)")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--lists", default="off,noannot", help=f"comma-separated, from {sorted(LISTS)}")
    ap.add_argument("--model-shape", choices=sorted(SHAPES), default="tiny",
                    help="built-in random-weight model (see python -m benchmarks.engine --model-shape)")
    ap.add_argument("--out", default=None, help="results JSON (default: results/engine_ab[_quick].json)")
    args = ap.parse_args(argv)
    args.servers = args.servers or ("off,on" if args.quick else "off,on,nosched")
    args.n = args.n or (16 if args.quick else 100)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.out = args.out or str(RESULTS / ("engine_ab_quick.json" if args.quick else "engine_ab.json"))
    names = [s for s in args.servers.split(",") if s]
    unknown = [s for s in names if s not in SERVERS]
    if unknown:
        ap.error(f"unknown servers {unknown}; choose from {sorted(SERVERS)}")
    list_names = [x for x in args.lists.split(",") if x]
    bad = [x for x in list_names if x not in LISTS]
    if bad:
        ap.error(f"unknown lists {bad}; choose from {sorted(LISTS)}")
    if "on" in list_names and any(SERVERS[s].get("CP_ENGINE_DISABLE") == "1" for s in names):
        # A plugin-off server ignores context_blocks: it would answer without the documents.
        ap.error("the 'on' list needs plugin-on servers only")

    prov = provenance("benchmarks.engine.server_ab", argv)
    model = model_folder(args.model_shape)
    rag = rag_zipf(400)
    count_tokens = block_token_counter(model)
    lists = {x: rag_requests(LISTS[x], rag, count_tokens)[0][:args.n] for x in list_names}
    empty = [x for x, reqs in lists.items() if not reqs]
    if empty:
        ap.error(f"no requests for {empty} (the peer list needs the peer's venv: benchmarks/setup_bench.sh)")
    rows = []
    with ExitStack() as stack:
        srvs = {s: stack.enter_context(start_server(model, SERVERS[s], ["--max-model-len", "8192"]))
                for s in names}
        for s in names:
            warm_up(srvs[s], warmup_requests([rag], 128), args.concurrency, 2)
        for rnd in range(args.rounds):
            for s in names[rnd % len(names):] + names[:rnd % len(names)]:  # rotate who goes first
                for lst in list_names[rnd % len(list_names):] + list_names[:rnd % len(list_names)]:
                    reqs = lists[lst]
                    reset_cache(srvs[s])
                    res, wall = send_all(srvs[s].url + "/v1", srvs[s].model, reqs,
                                         concurrency=args.concurrency, max_tokens=2, stream=True)
                    rec = sum(r.prompt_tokens - r.cached_tokens for r in res)
                    row = {"round": rnd, "server": s, "list": lst, "wall_s": round(wall, 2),
                           "recomputed_tokens": rec, "tok_per_s": round(rec / wall)}
                    print(json.dumps(row), file=sys.stderr, flush=True)
                    rows.append(row)
    summary = {f"{lst} on {s}": statistics.median(r["wall_s"] for r in rows if r["server"] == s and r["list"] == lst)
               for lst in lists for s in names}
    doc = {"config": {"n": args.n, "rounds": args.rounds, "concurrency": args.concurrency,
                      "model_shape": args.model_shape},
           "median_wall_s": summary, "rows": rows}
    # Fixed for plain lists; the online list's count moves a little with arrival timing.
    tokens = {lst: statistics.median(r["recomputed_tokens"] for r in rows if r["list"] == lst) for lst in list_names}
    doc["median_recomputed_tokens"] = tokens
    write_result(Path(args.out), doc, table=markdown, prov=prov)
    return 0


def markdown(doc: dict) -> str:
    """Median wall time and recomputed tokens per (list, server), with off/list ratios."""
    summary, tokens = doc["median_wall_s"], doc.get("median_recomputed_tokens", {})
    lines = ["| list on server | median wall s | recomputed tokens (median) | off/list wall | off/list tokens |",
             "|---|---|---|---|---|"]
    for key, wall in summary.items():
        lst, server = key.split(" on ")
        base = summary.get(f"off on {server}")
        tok = tokens.get(lst)
        lines.append(f"| {key} | {wall:.2f} | " + (f"{tok:,.0f}" if tok is not None else "–") + " | "
                     + (f"{base / wall:.3f}×" if base else "–") + " | "
                     + (f"{tokens['off'] / tok:.3f}×" if tok and "off" in tokens else "–") + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
