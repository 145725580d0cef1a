"""Interleaved A/B of vLLM server settings on the same requests, with the box's drift cancelled.

All servers are up at once and receive the same request lists in rotating order, one
server at a time (prefix cache reset before each list), for several rounds; compare
the medians. Use it for questions the full engine benchmark cannot answer because its
two servers run minutes apart on a box whose speed drifts (2026-11-24: the same
pre-rendered requests ran at 11,300 to 13,300 recomputed tokens/s on four server
starts): for example, what the plugin costs on traffic it does not rewrite.

    python -m benchmarks.bench_server_ab                      # off / on / on without the queue, 3 rounds
    python -m benchmarks.bench_server_ab --n 100 --rounds 5 --servers off,on

Request lists: ``off`` (the first N requests of the Zipf RAG batch, documents in
retrieval order) and ``noannot`` (the first N of the batch plan, unlabelled), both
plain prompts that pass through a plugin-on server unmodified.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from contextlib import ExitStack
from pathlib import Path

from benchmarks import bench_engine as be
from benchmarks.live import run_stamp, send_all, start_server

SERVERS = {**be.SERVER_ENV, "nosched": {**be.SERVER_ENV["on"], "CP_ENGINE_SCHEDULE": "0"},
           "nosync": {**be.SERVER_ENV["on"], "CP_ENGINE_EVICTION_SYNC": "0"}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--servers", default="off,on,nosched", help=f"comma-separated, from {sorted(SERVERS)}")
    ap.add_argument("--n", type=int, default=100, help="requests per list")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--out", default=str(be.RESULTS / "engine_ab.json"))
    args = ap.parse_args(argv)
    names = [s for s in args.servers.split(",") if s]
    unknown = [s for s in names if s not in SERVERS]
    if unknown:
        ap.error(f"unknown servers {unknown}; choose from {sorted(SERVERS)}")

    from cp_engine.devtools.vllm_server import tiny_model_dir

    rag = be.rag_zipf(400)
    lists = {"off": be.rag_requests("off", rag)[0][:args.n],
             "noannot": be.rag_requests(be.NOANNOT, rag)[0][:args.n]}
    rows = []
    with ExitStack() as stack:
        srvs = {s: stack.enter_context(start_server(tiny_model_dir(), SERVERS[s], ["--max-model-len", "8192"]))
                for s in names}
        for rnd in range(args.rounds):
            for s in names[rnd % len(names):] + names[:rnd % len(names)]:  # rotate who goes first
                for lst, reqs in lists.items():
                    be.reset_cache(srvs[s])
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
                      **run_stamp("benchmarks.bench_server_ab", argv)},
           "median_wall_s": summary, "rows": rows}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    for k, v in summary.items():
        print(f"{k:24s} median wall {v:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
