"""Load bound against cache hits: block affinity (with the plugin) at one replica count
for several bound factors, beside round-robin (``benchmarks.scaleout.simulate``'s model).

A factor f lets a replica take up to f times the even share of requests; f = 1 is
strict balance, a large f is plain consistent hashing (the hottest key's replica takes
whatever hashes there).

``--leads`` also varies the block-set key: ``lead`` k joins the k smallest block ids
(``cp_engine.scaleout.key``), so fewer sets share a key and a hot block with a small id
pulls fewer of them to one replica: what a router without a load bound (vllm-router's
``consistent_hash``, SGLang's ``manual``: a large factor here) can be given instead.

    python -m benchmarks.scaleout.load_sweep                     # HotpotQA KB N=5,000, 16 replicas
    python -m benchmarks.scaleout.load_sweep --workload rag_zipf --n 8000
    python -m benchmarks.scaleout.load_sweep --replicas 4 --leads 1,2,3 --factors 1.25,100
"""
from __future__ import annotations

import argparse
from pathlib import Path

from cp_engine.blocks import estimate_tokens

from .simulate import ARMS, WORKLOADS, load_workload, requests_of, run_arm

FACTORS = "1.0,1.1,1.25,1.5,2,4,100"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", choices=WORKLOADS, default="hotpot_kb")
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--replicas", type=int, default=16)
    ap.add_argument("--capacity", type=int, default=65536, help="prefix-cache tokens per replica")
    ap.add_argument("--factors", default=FACTORS)
    ap.add_argument("--leads", default="1", help="comma-separated ids per block-set key (default 1)")
    ap.add_argument("--out", help="results JSON (default results/scaleout_load_<workload>.json)")
    args = ap.parse_args(argv)

    from benchmarks.common.results import RESULTS, provenance, write_result
    from benchmarks.engine.arms import SYSTEM

    prov = provenance("benchmarks.scaleout.load_sweep", argv)
    rag = load_workload(args.workload, args.n)
    reqs, system_tokens = requests_of(rag), estimate_tokens(SYSTEM)
    arms = {a.name: a for a in ARMS}
    rows = [{"factor": None, **run_arm(arms["round_robin+plugin"], reqs, args.replicas, args.capacity,
                                       system_tokens, 1.0, 0.5)}]
    for lead in (int(x) for x in args.leads.split(",")):
        for f in (float(x) for x in args.factors.split(",")):
            rows.append({"factor": f, "lead": lead, **run_arm(arms["block_affinity+plugin"], reqs, args.replicas,
                                                              args.capacity, system_tokens, f, 0.5, lead)})
            print(rows[-1], flush=True)
    data = {"workload": rag.name, "requests": args.n, "replicas": args.replicas, "capacity_tokens": args.capacity,
            "rows": rows}
    out = args.out or RESULTS / f"scaleout_load_{args.workload}.json"
    write_result(Path(out), data, table=markdown, plot=plot, prov=prov)
    return 0


def markdown(data: dict) -> str:
    lines = [f"{data['workload']}, {data['requests']:,} requests, {data['replicas']} replicas with the plugin, "
             f"{data['capacity_tokens']:,}-token LRU prefix cache each.", "",
             "| policy | key lead | load factor | hit ratio | recomputed tok | vs round-robin | hottest share (x even) |",
             "|---|---|---|---|---|---|---|"]
    rr = data["rows"][0]
    for r in data["rows"]:
        name = "round_robin" if r["factor"] is None else "block_affinity"
        factor = "–" if r["factor"] is None else f"{r['factor']:g}"
        lead = "–" if r["factor"] is None else str(r.get("lead", 1))
        lines.append(f"| {name} | {lead} | {factor} | {r['hit_ratio']:.3f} | {r['recomputed_tokens']:,} | "
                     f"{rr['recomputed_tokens'] / r['recomputed_tokens']:.2f}× | "
                     f"{r['hottest_share']:.3f} ({r['hottest_share_x_even']:.2f}×) |")
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    aff = [r for r in data["rows"] if r["factor"] is not None]
    leads = sorted({r.get("lead", 1) for r in aff})
    for lead in leads:
        mine = [r for r in aff if r.get("lead", 1) == lead]
        ax.plot([r["hottest_share_x_even"] for r in mine], [r["hit_ratio"] for r in mine], marker="o",
                label="block_affinity + plugin" + (f", key lead {lead}" if len(leads) > 1 else ""))
    for r in aff:
        ax.annotate(f"f={r['factor']:g}", (r["hottest_share_x_even"], r["hit_ratio"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    rr = data["rows"][0]
    ax.plot([rr["hottest_share_x_even"]], [rr["hit_ratio"]], marker="s", linestyle="", label="round_robin + plugin")
    ax.set(xlabel="hottest replica's share x replicas (1 = even)", ylabel="prompt tokens served from cache",
           title=f"{data['workload']}, {data['replicas']} replicas")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
