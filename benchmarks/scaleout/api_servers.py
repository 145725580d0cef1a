"""Simulation: one engine, N API server processes, each with its own plugin index.

``--api-server-count N`` starts N API server processes that share one engine (one
prefix cache); the kernel spreads connections over them, so each index records only
the requests its process took (``own``), unless every index records every admitted
request (``shared``: what an engine-side echo of each admitted request's block path
gives, docs/scale-out.md). Evictions reach every index in both. Requests go to a
seeded random API server, one at a time, through the same model of cache and index
as ``benchmarks.scaleout.simulate``.

    python -m benchmarks.scaleout.api_servers              # Zipf RAG N=8,000, 1/2/4 API servers
    python -m benchmarks.scaleout.api_servers --quick      # N=1,000
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

from cp_engine.blocks import estimate_tokens
from cp_engine.index import ContextIndex

from .replica import PromptCache
from .simulate import SYSTEM_UNIT, SimRequest, load_workload, requests_of


def run(reqs: list[SimRequest], servers: int, shared: bool, capacity: int | None, system_tokens: int,
        seed: int = 0) -> dict:
    cache, indexes, rng = PromptCache(capacity), [ContextIndex() for _ in range(servers)], random.Random(seed)
    prompt = served = 0
    for i, req in enumerate(reqs):
        taker = rng.randrange(servers)
        order = indexes[taker].best_order(req.blocks, token_lengths=req.tokens)
        ids, lens = [req.blocks[j] for j in order], [req.tokens[j] for j in order]
        for k in (range(servers) if shared else (taker,)):
            indexes[k].record(i, ids, token_lengths=lens)
        weights = [system_tokens, *lens, req.question]
        hit, evicted = cache.access([SYSTEM_UNIT, *ids, ("q", i)], weights)
        prompt, served = prompt + sum(weights), served + hit
        for path in evicted:  # eviction sync reaches every API server
            if len(path) > 1 and isinstance(path[-1], int):
                for index in indexes:
                    index.evict_path(path[1:])
    return {"api_servers": servers, "indexes": "shared" if shared else "own", "prompt_tokens": prompt,
            "cached_tokens": served, "recomputed_tokens": prompt - served, "hit_ratio": served / prompt}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N=1,000")
    ap.add_argument("--n", type=int, help="requests (default 8,000; 1,000 with --quick)")
    ap.add_argument("--servers", default="1,2,4", help="API server counts")
    ap.add_argument("--capacities", default="0,65536", help="engine prefix-cache tokens (0: unbounded)")
    ap.add_argument("--out", help="results JSON (default results/scaleout_api_servers[_quick].json)")
    args = ap.parse_args(argv)

    from benchmarks.common.results import RESULTS, provenance, write_result
    from benchmarks.engine.arms import SYSTEM

    prov = provenance("benchmarks.scaleout.api_servers", argv)
    n = args.n or (1000 if args.quick else 8000)
    rag = load_workload("rag_zipf", n)
    reqs, system_tokens = requests_of(rag), estimate_tokens(SYSTEM)
    rows = []
    for cap in (int(c) or None for c in args.capacities.split(",")):
        for servers in (int(s) for s in args.servers.split(",")):
            for shared in ((False, True) if servers > 1 else (False,)):
                row = {"capacity_tokens": cap, **run(reqs, servers, shared, cap, system_tokens)}
                rows.append(row)
                print(row, flush=True)
    out = args.out or RESULTS / ("scaleout_api_servers_quick.json" if args.quick else "scaleout_api_servers.json")
    write_result(Path(out), {"workload": rag.name, "requests": n, "rows": rows}, table=markdown, prov=prov)
    return 0


def markdown(data: dict) -> str:
    lines = [f"{data['workload']}, {data['requests']:,} requests, each to a random API server; one engine prefix "
             "cache; recomputed tokens against one API server with the same cache.", "",
             "| engine cache tokens | API servers | indexes | hit ratio | recomputed tok | vs 1 API server |",
             "|---|---|---|---|---|---|"]
    one = {r["capacity_tokens"]: r for r in data["rows"] if r["api_servers"] == 1}
    for r in data["rows"]:
        base = one.get(r["capacity_tokens"])
        delta = f"{r['recomputed_tokens'] / base['recomputed_tokens'] - 1:+.1%}" if base else "–"
        cap = f"{r['capacity_tokens']:,}" if r["capacity_tokens"] else "unbounded"
        lines.append(f"| {cap} | {r['api_servers']} | {r['indexes']} | {r['hit_ratio']:.3f} | "
                     f"{r['recomputed_tokens']:,} | {delta} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
