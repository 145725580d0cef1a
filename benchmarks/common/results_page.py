"""``benchmarks/RESULTS.md``'s figures, generated from the result files.

    python -m benchmarks.common.results_page          # rewrite the generated sections
    python -m benchmarks.common.results_page --check  # exit 1 when RESULTS.md is stale

RESULTS.md is prose around marked sections (``<!-- name:start -->`` ...
``<!-- name:end -->``); every section here is rebuilt from ``benchmarks/results/*.json``
(each names its files), so no figure in a marked section can drift from what a
benchmark last wrote. The prose says what the figures mean; a test keeps the marked
sections in sync (``benchmarks/tests/test_results_page.py``).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Callable

from benchmarks.common.results import PROVENANCE, RESULTS

PAGE = RESULTS.parent / "RESULTS.md"


def load(name: str, results: Path | None = None) -> dict:
    return json.loads(((results or RESULTS) / name).read_text())


def _x(a: float, b: float, digits: int = 2) -> str:
    return f"{a / b:.{digits}f}×"


def _source(*names: str) -> str:
    return "Source: " + ", ".join(f"[{n}](results/{n})" for n in names) + "."


# ------------------------------------------------------------------------- sections

def files_section(results: Path) -> str:
    """Every result file with the command that reproduces it and when and where it ran."""
    lines = ["| file | command | date | machine |", "|---|---|---|---|"]
    for path in sorted(results.glob("*.json")):
        doc = json.loads(path.read_text())
        prov = doc.get(PROVENANCE) if isinstance(doc, dict) else None
        if prov is None:  # written by hand or by a script outside the shared writer
            lines.append(f"| [{path.name}](results/{path.name}) | (no provenance) | | |")
            continue
        lines.append(f"| [{path.name}](results/{path.name}) | `{prov['command']}` | {prov.get('date') or '?'} | "
                     f"{prov.get('machine') or '?'} |")
    return "\n".join(lines)


def planner_section(results: Path) -> str:
    sim = load("sim.json", results)
    lines = ["| workload | N | bound | ContextPilot hit | cp_engine hit | ratio | LRU 250 / 1,000 |",
             "|---|---|---|---|---|---|---|"]
    for w in sim["workloads"]:
        ours, peer = w["methods"]["cp_engine"], w["methods"].get("contextpilot", {})
        if "hit" not in ours or "hit" not in peer:
            continue
        bounded = all(ours["hit"][c] >= peer["hit"][c] for c in ("250", "1000"))
        lines.append(f"| {w['family']} | {w['requests']:,} | {w['bound']:.3f} | {peer['hit']['inf']:.4f} | "
                     f"{ours['hit']['inf']:.4f} | {_x(ours['hit']['inf'], peer['hit']['inf'], 3)} | "
                     + ("never below the peer" if bounded else "below the peer") + " |")
    big = [w for w in sim["workloads"] if w["requests"] == 5000 and "seconds" in w["methods"].get("contextpilot", {})]
    lines += ["", "Planning time at N=5,000 (one call, fresh process each): " + "; ".join(
        f"{w['family']} {w['methods']['cp_engine']['seconds']:.2f} s vs {w['methods']['contextpilot']['seconds']:.1f} s "
        f"(**{w['methods']['contextpilot']['seconds'] / w['methods']['cp_engine']['seconds']:.0f}×**)" for w in big)
        + f". Online reorder + record with {sim['online']['indexed_requests']:,} requests indexed: "
        f"p99 {sim['online']['p99_ms']:.2f} ms wall."]
    opt = load("optimality_hotpotqa_1000_k10.json", results)
    lines += ["", f"Best possible on {opt['workload']}: at most **{opt['max_hits_upper_bound']:,} of "
              f"{opt['total_blocks']:,} blocks** hit (cp_engine {opt['ours_hits']:,}, ContextPilot {opt['peer_hits']:,}), "
              f"so no prefix plan exceeds {opt['max_ratio_vs_peer_upper_bound']:.4f}× the peer; "
              f"{opt['checked_components']} components enumerated, {opt['solved_exactly']} of "
              f"{opt['skipped_components']} larger ones solved by branch and bound."]
    part = load("planner_partners.json", results)
    lines += ["", "Partner search, posting lists vs the kernel's kNN graph (hit ratio): " + ", ".join(
        f"{r['workload']} {r['postings']['hit']:.4f} vs {r['kernel']['hit']:.4f}" for r in part["rows"]) + "."]
    scaling = load("scaling.json", results)

    def by_cpu(rows: dict, method: str) -> str:
        g = rows.get("growth_cpu_by_method", {}).get(method)
        return "" if g is None else f" / N^{g:.2f}"

    families = scaling["families"]
    lines += ["", "Planning time against N, slope of log time against log N (wall clock / CPU time "
              "where recorded): " + ", ".join(
                  f"{fam} up to {max(p['requests'] for p in rows['points']):,} N^{rows['growth']:.2f}"
                  + by_cpu(rows, "ours") for fam, rows in families.items()) + "; ContextPilot " + ", ".join(
                  f"{fam} N^{g:.2f}" + by_cpu(families[fam], "peer") for fam, g in scaling["peer_growth"].items())
              + "."]
    lines += ["", _source("sim.json", "optimality_hotpotqa_1000_k10.json", "planner_partners.json", "scaling.json")
              + " Plot: [sim.png](results/sim.png), [scaling.png](results/scaling.png)."]
    return "\n".join(lines)


ENGINE_ARMS = ("on", "on+batch", "on+batch-noannot", "peer")


def _engine_cells(run: dict) -> list[str]:
    arms, off = run["arms"], run["arms"]["off"]["recomputed_tokens"]
    return [f"{_x(off, arms[a]['recomputed_tokens'])} ({arms[a]['recomputed_tokens']:,} tok)" if a in arms else "–"
            for a in ENGINE_ARMS]


def engine_section(results: Path) -> str:
    exact = load("engine_targets_exact.json", results)["runs"]
    scaling = load("engine_scaling.json", results)["runs"]
    targets = load("engine_targets.json", results)["runs"]
    lines = ["| run | bound | on (online) | on + batch plan | on + batch plan, no annotation | peer |",
             "|---|---|---|---|---|---|"]
    for r in exact:
        lines.append(f"| {r['label']}, 64 in flight | {r['bound_tokens']:.3f} | " + " | ".join(_engine_cells(r)) + " |")
    for r in scaling:
        if r["kind"] == "rag_zipf" or r["kind"] == "rag_hotpot":
            lines.append(f"| {r['label']} | {r['bound_tokens']:.3f} | " + " | ".join(_engine_cells(r)) + " |")
    for r in targets:
        if r["kind"].startswith("chat"):
            cap = 1 / (1 - r["dedup_bound_tokens"])
            lines.append(f"| {r['label']} (dedup) | {r['dedup_bound_tokens']:.3f} (cap {cap:.2f}×) | "
                         + _engine_cells(r)[0] + " | – | – | – |")
    lines += ["", "Cells: recomputed prompt tokens, off / arm (>1 = fewer), and the arm's count.",
              "", _source("engine_targets_exact.json", "engine_scaling.json", "engine_targets.json")]
    return "\n".join(lines)


def quality_section(results: Path) -> str:
    from benchmarks.quality.bench import summary_rows

    lines = ["| run | model | arm | n | F1 (95% CI) | ΔF1 vs off (paired 95% CI) | prompt tokens / question |",
             "|---|---|---|---|---|---|---|"]
    names = ("quality.json", "quality_multiturn.json", "quality_quick.json")
    for name in names:
        doc = load(name, results)
        for r in summary_rows(doc):
            if name == "quality.json" and r["arm"].startswith("multiturn"):
                continue  # the multi-turn arms were re-run on their own: quality_multiturn.json
            d = r.get("f1_delta_vs_off")
            lines.append(f"| {name[:-5]} | {doc['config']['model_name']} | {r['arm']} | {r['n']} | "
                         f"{r['f1'][0]:.1f} [{r['f1'][1]:.1f}, {r['f1'][2]:.1f}] | "
                         + (f"{d[0]:+.1f} [{d[1]:+.1f}, {d[2]:+.1f}]" if d else "—")
                         + f" | {r['prompt_tokens'] / max(1, r['n']):,.0f} |")
    return "\n".join(lines + ["", _source(*names)])


def online_section(results: Path) -> str:
    doc = load("online.json", results)
    lines = ["| workload | index | nodes | query p50 / p99 ms (wall) | best of 3 p99 ms | query + record p99 ms |",
             "|---|---|---|---|---|---|"]
    for r in doc["runs"]:
        q = r["query"]
        lines.append(f"| {r['workload']} | {r['config']} | {r['nodes']:,} | {q['p50_ms']:.2f} / **{q['p99_ms']:.2f}** | "
                     f"{r['query_best_of_3']['p99_ms']:.2f} | {r['query_plus_record']['p99_ms']:.2f} |")
    return "\n".join(lines + ["", f"{doc['runs'][0]['indexed']:,} requests indexed, "
                              f"{doc['runs'][0]['measured']:,} timed; target p99 ≤ {doc['target_p99_ms']} ms. "
                              + _source("online.json")])


def kernels_section(results: Path) -> str:
    lines = ["| device | workload | N | NumPy ms | peer N×N ms | Triton ms |", "|---|---|---|---|---|---|"]

    def ms(v):
        return "–" if v is None else f"{v * 1e3:,.1f}"
    for name in ("kernels_gpu.json", "kernels_cpu.json"):
        doc = load(name, results)
        for r in doc["rows"]:
            lines.append(f"| {doc['device']} | {r['workload']} | {r['n']:,} | {ms(r.get('numpy_s'))} | "
                         f"{ms(r.get('peer_dense_s'))} | {ms(r.get('triton_s'))} |")
    return "\n".join(lines + ["", "Self-join of N block lists, k=16, distance metric. "
                              + _source("kernels_gpu.json", "kernels_cpu.json")
                              + " Plots: [kernels_gpu.png](results/kernels_gpu.png), "
                                "[kernels_cpu.png](results/kernels_cpu.png)."])


def reliability_section(results: Path) -> str:
    rel = load("reliability.json", results)
    fuzz, storm, soak = rel["fuzz_live"], rel["storm"], rel["soak"]
    on, off = soak["sides"]["on"], soak["sides"]["off"]
    rows = [("fuzz_live", fuzz, f"{fuzz['payloads']:,} payloads, {len(fuzz['crashes'])} crashes; statuses "
             + ", ".join(f"{n:,} × {code}" for code, n in sorted(fuzz["statuses"].items()))),
            ("storm", storm, f"{storm['requests']:,} requests on a {storm['kv_blocks']}-block KV cache: "
             f"{storm['stale_claims']} stale claims, {storm['invariant_violation_count']} invariant violations"),
            ("soak", soak, f"{on['clients']} clients × {on['duration_s'] / 60:.0f} min per side: "
             f"{on['errors'] + off['errors']} errors; {on['throughput_rps']} vs {off['throughput_rps']} req/s "
             f"plugin on vs off, p50 ×{soak['overhead']['p50']['ratio']}, p99 ×{soak['overhead']['p99']['ratio']}")]
    lines = ["| run | command | result | verdict |", "|---|---|---|---|"]
    lines += [f"| {name} | `{r[PROVENANCE]['command']}` | {text} | {'PASS' if r['ok'] else 'FAIL'} |"
              for name, r, text in rows]
    return "\n".join(lines + ["", _source("reliability.json") + " Full tables: "
                               "[reliability.table.md](results/reliability.table.md)."])


SECTIONS: dict[str, Callable[[Path], str]] = {
    "files": files_section, "planner": planner_section, "engine": engine_section, "quality": quality_section,
    "online": online_section, "kernels": kernels_section, "reliability": reliability_section}


# ---------------------------------------------------------------------------- page

def replace_section(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- {name}:start -->\n)(.*?)(<!-- {name}:end -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"RESULTS.md has no <!-- {name}:start/end --> markers")
    return pattern.sub(lambda m: m.group(1) + body.rstrip("\n") + "\n" + m.group(3), text)


def refresh(text: str, results: Path | None = None) -> str:
    """``text`` with every generated section rebuilt from ``results``."""
    for name, make in SECTIONS.items():
        text = replace_section(text, name, make(results or RESULTS))
    return text


def main(argv=None) -> int:
    old = PAGE.read_text()
    new = refresh(old)
    if "--check" in (sys.argv[1:] if argv is None else argv):
        if new != old:
            print("benchmarks/RESULTS.md is stale: run python -m benchmarks.common.results_page", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
