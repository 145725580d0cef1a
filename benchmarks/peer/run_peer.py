"""Run the peer's (ContextPilot 0.5.0) offline batch plan on one workload.

Runs INSIDE benchmarks/.peer-venv (never imported by cp_engine or its tests):

    .peer-venv/bin/python peer/run_peer.py IN.json OUT.json

IN.json: a list of block-id lists. OUT.json, in cp_engine's BatchPlan convention:
``contexts[i]`` = the peer's reordering of input request i, ``order`` = execution
order (input indices), plus ``seconds`` (wall time of the planning call),
``cpu_seconds`` (CPU time of the call: this process and the worker processes it
started and reaped, so the work its process pool spreads over both cores counts),
``peak_rss_mb`` (this process), ``children_peak_rss_mb`` (its worker pool) and
``rss_before_mb``.

The call is the peer's public ``ContextPilot(use_gpu=False).reorder(contexts)``, the
same call its ``optimize_batch`` makes, on a fresh instance: a second call on one
instance is an incremental update (and mis-pairs requests), not a batch plan.
"""
from __future__ import annotations

import contextlib
import json
import logging
import resource
import sys
import time

from memwatch import children_peak_mb, peak_mb, reset_peak, rss_mb  # this script's folder


def _children_cpu() -> float:
    """User + system CPU of the reaped child processes (the peer's pool workers)."""
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    contexts = [[int(b) for b in ctx] for ctx in json.loads(open(argv[1]).read())]
    logging.disable(logging.WARNING)  # its INFO/DEBUG chatter would swamp our progress lines
    from contextpilot.server.live_index import ContextPilot

    pilot = ContextPilot(use_gpu=False)
    rss_before = rss_mb()
    reset_peak()
    c0 = time.process_time() + _children_cpu()
    t0 = time.perf_counter()
    # The peer prints progress banners to stdout; keep stdout for nothing but errors.
    with contextlib.redirect_stdout(sys.stderr):
        reordered, order = pilot.reorder(contexts)
    seconds = time.perf_counter() - t0
    cpu_seconds = time.process_time() + _children_cpu() - c0

    order = [int(i) for i in order]
    by_request: list = [None] * len(contexts)
    for ctx, i in zip(reordered, order):
        by_request[i] = [int(b) for b in ctx]
    out = {
        "contexts": by_request,
        "order": order,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "peak_rss_mb": peak_mb(),
        "children_peak_rss_mb": children_peak_mb(),
        "rss_before_mb": rss_before,
        "peer": "contextpilot " + __import__("contextpilot").__version__,
    }
    with open(argv[2], "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
