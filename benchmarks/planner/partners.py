"""Planner partner search, side by side: posting lists vs the kNN graph from the
overlap kernel (``plan_batch(partners=...)``), hit ratio and planning time per workload.

    python -m benchmarks.planner.partners          # synthetic 1k/5k (+ HotpotQA if cached)
    python -m benchmarks.planner.partners --quick  # synthetic 1k only

Writes benchmarks/results/planner_partners.{json,md}. The kernel backend is whatever
``cp_engine.kernels`` picks (NumPy on a CPU-only machine; set
CP_ENGINE_KERNEL_BACKEND=triton on a GPU machine). Each timing is the median of
``--repeat`` runs in this process; run on an idle machine.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import workloads as W
from cp_engine.kernels import partner_candidates
from cp_engine import plan_batch
from cp_engine.planner import KNN_PARTNERS

RESULTS = Path(__file__).resolve().parents[1] / "results"


def timed(fn, repeat: int):
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
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
    meta = {"machine": f"{platform.machine()}, {platform.python_version()}",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "repeat": args.repeat}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "planner_partners.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["# Planner partner search: posting lists vs kNN graph (overlap kernel)", "",
             f"{meta['machine']}; {meta['date']}; median of {args.repeat}. "
             "Command: `python -m benchmarks.planner.partners`.", "",
             "| workload | N | postings: hit / s (tree) | kernel kNN: hit / s | kernel call alone s |",
             "|---|---|---|---|---|"]
    for r in rows:
        p, k = r["postings"], r["kernel"]
        lines.append(f"| {r['workload']} | {r['requests']:,} | {p['hit']:.4f} / {p['seconds']:.2f} ({p['strategy']}) "
                     f"| {k['hit']:.4f} / {k['seconds']:.2f} | {r['kernel_only_s']:.2f} |")
    (RESULTS / "planner_partners.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
