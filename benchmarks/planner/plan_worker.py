"""Plan one workload with one planner in a fresh process, for a fair peak-memory reading.

    python -m benchmarks.planner.plan_worker METHOD IN.json OUT.json

METHOD: ``arrival``, ``greedy`` (benchmarks.planner.baselines) or ``cp_engine``
(``cp_engine.plan_batch(contexts)``, the exact public call). Writes the plan
(``contexts``, ``order``) with ``seconds`` (wall time of the planning call only) and
``peak_rss_delta_mb`` (peak RSS during the call, the Linux peak counter being reset
just before it, minus RSS before it: the memory the planner itself needed).
"""
from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


from benchmarks.peer.memwatch import peak_mb, reset_peak, rss_mb  # noqa: E402


def planner(method: str):
    if method == "cp_engine":
        from cp_engine import plan_batch

        return plan_batch
    from benchmarks.planner.baselines import PLANNERS

    return PLANNERS[method]


def main(argv: list[str]) -> int:
    method, src, dst = argv[1:4]
    contexts = json.loads(Path(src).read_text())
    plan_fn = planner(method)
    gc.collect()
    before = rss_mb()
    reset_peak()
    t0 = time.perf_counter()
    plan = plan_fn(contexts)
    seconds = time.perf_counter() - t0
    peak = peak_mb()
    out = {
        "contexts": [list(c) for c in plan.contexts],
        "order": [int(i) for i in plan.order],
        "seconds": seconds,
        "peak_rss_delta_mb": max(0.0, peak - before),
        "stats": getattr(plan, "stats", {}) or {},
    }
    Path(dst).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
