"""Planner partner search, side by side: posting lists vs the kNN graph from the
overlap kernel (``plan_batch(partners=...)``), hit ratio and planning time per workload.

    python -m benchmarks.planner.partners          # synthetic 1k/5k (+ HotpotQA if cached)
    python -m benchmarks.planner.partners --quick  # synthetic 1k only

Writes benchmarks/results/planner_partners.json and .table.md (``--quick``:
planner_partners_quick.*). The kernel backend is whatever
``cp_engine.kernels`` picks (NumPy on a CPU-only machine; set
CP_ENGINE_KERNEL_BACKEND=triton on a GPU machine). Each timing is the median of
``--repeat`` runs in this process; run on an idle machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import workloads as W
from benchmarks.common.results import provenance, write_result
from cp_engine.kernels import partner_candidates
from cp_engine import plan_batch
from cp_engine.planner import KNN_PARTNERS



def timed(fn, repeat: int):
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def markdown(data: dict) -> str:
    lines = [f"Median of {data['meta']['repeat']} in one process.", "",
             "| workload | N | postings: hit / s (tree) | kernel kNN: hit / s | kernel call alone s |",
             "|---|---|---|---|---|"]
    for r in data["rows"]:
        p, k = r["postings"], r["kernel"]
        lines.append(f"| {r['workload']} | {r['requests']:,} | {p['hit']:.4f} / {p['seconds']:.2f} ({p['strategy']}) "
                     f"| {k['hit']:.4f} / {k['seconds']:.2f} | {r['kernel_only_s']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="synthetic N=1,000 only")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, help="results JSON (default: results/planner_partners[_quick].json)")
    args = ap.parse_args(argv)
    prov = provenance("benchmarks.planner.partners", argv)
    wls = [W.synthetic(n) for n in ((1000,) if args.quick else (1000, 5000))]
    if not args.quick and W.hotpotqa_available():
        wls += [W.hotpotqa(5000), W.hotpotqa_kb(5000)]
    rows = []
    for wl in wls:
        row = {"workload": wl.name, "requests": len(wl.contexts)}
        _, row["kernel_only_s"] = timed(lambda: partner_candidates(wl.contexts, KNN_PARTNERS), args.repeat)
        for mode in ("postings", "kernel"):
            plan, secs = timed(lambda: plan_batch(wl.contexts, partners=mode), args.repeat)
            row[mode] = {"hit": plan.stats["predicted_hit_ratio"], "seconds": secs,
                         "strategy": plan.stats["strategy"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    name = args.out or ("planner_partners_quick" if args.quick else "planner_partners")
    write_result(name, {"meta": {"repeat": args.repeat}, "rows": rows}, table=markdown, prov=prov)
    return 0


if __name__ == "__main__":
    sys.exit(main())
