"""Block-store size against routing's gain with blend: round-robin and the routers at one
replica count for several per-replica store budgets (``benchmarks.scaleout.simulate_blend``'s
model and arms).

A router can only help blend where a replica's store cannot hold what every replica
sees under round-robin; this sweep shows how round-robin's computed tokens over the
routers' move as the store grows past the workload's block working set.

    python -m benchmarks.scaleout.blend_store_sweep          # both workloads, 4 replicas
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, replace
from pathlib import Path

from cp_engine.blend.selection import MODES
from cp_engine.blocks import estimate_tokens

from .simulate import WORKLOADS, load_workload, requests_of
from .simulate_blend import POLICIES, SIZES, Arm, Setup, run_arm

STORES = "16384,32768,65536,131072,262144,1048576"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--n", type=int, help="requests per workload (default: rag_zipf 8,000, hotpot_kb 5,000)")
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--stores", default=STORES, help="block-store tokens per replica")
    ap.add_argument("--ratio", type=float, default=0.15)
    ap.add_argument("--depth", type=int, default=0)
    ap.add_argument("--mode", choices=MODES, help="blend selection mode (default: CP_ENGINE_BLEND_MODE's default)")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--out", help="results JSON (default results/scaleout_sim_blend_store.json)")
    args = ap.parse_args(argv)

    from benchmarks.common.results import RESULTS, provenance, write_result
    from benchmarks.engine.arms import SYSTEM
    from cp_engine import Config

    prov = provenance("benchmarks.scaleout.blend_store_sweep", argv)
    cfg = Config()
    base = Setup(mode=args.mode or cfg.blend_mode, first_tokens=cfg.blend_first_tokens, check_layers=cfg.blend_check_layers)
    system_tokens = estimate_tokens(SYSTEM)
    workloads = []
    for wname in args.workloads.split(","):
        n = args.n or SIZES[wname]
        rag = load_workload(wname, n)
        reqs = requests_of(rag)
        blocks = {b: t for r in reqs for b, t in zip(r.blocks, r.tokens)}
        rows = []
        for store in (int(x) for x in args.stores.split(",")):
            setup = replace(base, store_tokens=store)
            for policy in args.policies.split(","):
                row = run_arm(Arm(policy, args.ratio, args.depth), reqs, args.replicas, setup, system_tokens)
                rows.append({"store_tokens": store, **row})
                print(f"{wname} store {store:>8} {policy:<18} computed {row['computed_tokens']:>12,.0f}", flush=True)
        workloads.append({"workload": rag.name, "requests": n, "block_tokens": sum(blocks.values()),
                          "rows": rows})
    data = {"setup": asdict(base) | {"system_tokens": system_tokens}, "replicas": args.replicas,
            "ratio": args.ratio, "depth": args.depth, "workloads": workloads}
    write_result(Path(args.out or RESULTS / "scaleout_sim_blend_store.json"), data, table=markdown, plot=plot,
                 prov=prov)
    return 0


def _by(w: dict) -> dict:
    return {(r["store_tokens"], r["policy"]): r for r in w["rows"]}


def markdown(data: dict) -> str:
    s = data["setup"]
    lines = [f"{data['replicas']} replicas, blend at ratio {data['ratio']:g}, store depth {data['depth']}, "
             f"{s['cache_tokens']:,}-token prefix cache per replica; the store budget varies. Ratio: round_robin's "
             "computed tokens / the policy's.", "",
             "| workload (distinct block tokens) | store tok / replica | policy | hit ratio | computed tok "
             "| round-robin / policy | hottest share (x even) |", "|---|---|---|---|---|---|---|"]
    for w in data["workloads"]:
        by = _by(w)
        for r in w["rows"]:
            rr = by.get((r["store_tokens"], "round_robin"))
            ratio = f"{rr['computed_tokens'] / r['computed_tokens']:.2f}×" if rr and r["computed_tokens"] else "–"
            lines.append(f"| {w['workload']} ({w['block_tokens']:,}) | {r['store_tokens']:,} | {r['policy']} | "
                         f"{r['hit_ratio']:.3f} | {r['computed_tokens']:,.0f} | {ratio} | "
                         f"{r['hottest_share']:.3f} ({r['hottest_share_x_even']:.2f}×) |")
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for w in data["workloads"]:
        by = _by(w)
        for policy, style in (("block_affinity", "-"), ("prefix_canonical", "--"), ("block_overlap", ":")):
            pts = [(s, by[(s, "round_robin")]["computed_tokens"] / r["computed_tokens"])
                   for (s, p), r in sorted(by.items()) if p == policy and (s, "round_robin") in by]
            if pts:
                ax.plot([s for s, _ in pts], [v for _, v in pts], style, marker="o",
                        label=f"{w['workload']}: {policy}")
    ax.axhline(1.0, color="#888888", lw=0.8)
    ax.axhline(1.5, color="#cc3333", lw=0.8, ls=":", label="issue's target (1.5x)")
    ax.set(xscale="log", xlabel="block-store tokens per replica", ylabel="round-robin computed / policy's",
           title=f"{data['replicas']} replicas, blend ratio {data['ratio']:g}, depth {data['depth']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
