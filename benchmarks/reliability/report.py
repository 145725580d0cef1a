"""``benchmarks/results/reliability.json``: one section per run (``soak``, ``fuzz_live``,
``storm``), each with the provenance of the run that produced it.

``record(section, summary, prov)`` stores a script's summary under its own key and
rewrites the file, its table (every section present) and its plot (the soak's
timelines) through the shared results writer, so one file always shows the latest
result of each run. ``--quick`` runs record into ``reliability_quick`` instead.
"""
from __future__ import annotations

import json
from pathlib import Path

from benchmarks.common.results import PROVENANCE, paths, provenance, read_result, write_result

NAME = "reliability"


def start(section: str, argv: list[str] | None) -> dict:
    """The provenance of a run of ``benchmarks.reliability.<section>``, taken at its start."""
    return provenance(f"benchmarks.reliability.{section}", argv)


def record(section: str, summary: dict, prov: dict, name: str = NAME, out_dir: Path | None = None) -> None:
    data = read_result(name, out_dir)[0] if paths(name, out_dir).json.exists() else {}
    data[section] = {**summary, PROVENANCE: prov}
    write_result(name, data, table=markdown, plot=plot if "soak" in data else None, prov=prov,
                 out_dir=out_dir, echo=False)


def publish(section: str, summary: dict, prov: dict, store: bool = True, quick: bool = False) -> None:
    """A script's end: print the summary as JSON and (with ``store``) record it."""
    print(json.dumps(summary, indent=1))
    if store:
        record(section, summary, prov, name=NAME + "_quick" if quick else NAME)


def _command(r: dict, default: str) -> str:
    return (r.get(PROVENANCE) or {}).get("command") or r.get("command") or r.get("config", {}).get("command") or default


def _soak(r: dict, png: str | None) -> list[str]:
    cfg = r["config"]
    out = [f"## Soak: {cfg['clients']} clients x {cfg['duration_s']:.0f} s per side ({r['date']})", "",
           f"`{_command(r, 'python -m benchmarks.reliability.soak')}` on {cfg['host']}", "",
           "| side | requests | errors | req/s | p50 (s) | p90 (s) | p99 (s) |", "|---|---|---|---|---|---|---|"]
    for name, side in r["sides"].items():
        lat = side["latency_s"]
        out.append(f"| {name} | {side['requests']} | {side['errors']} | {side['throughput_rps']} | "
                   f"{lat['p50']} | {lat['p90']} | {lat['p99']} |")
    if "overhead" in r:
        o = r["overhead"]
        out += ["", f"Plugin overhead: p50 {o['p50']['diff_ms']:+.1f} ms (x{o['p50']['ratio']}), "
                    f"p99 {o['p99']['diff_ms']:+.1f} ms (x{o['p99']['ratio']})."]
    out += ["", "| side | check | value |", "|---|---|---|"]
    for name, c in r["checks"].items():
        out += [f"| {name} | {k} | {v} |" for k, v in c.items()]
    out += ["", f"Verdict: **{'PASS' if r['ok'] else 'FAIL'}**"]
    if png:
        out += ["", f"![soak: latency, index nodes, fds/threads over time]({png})"]
    return out


def _fuzz(r: dict) -> list[str]:
    v = r["verdicts"]
    return [f"## Live fuzzer: {r['payloads']} payloads (seed {r['seed']}, {r['workers']} clients, "
            f"{r['elapsed_s']:.0f} s)", "",
            f"`{_command(r, 'python -m benchmarks.reliability.fuzz_live')}`", "",
            f"200 with choices: {v.get('ok', 0)}; 4xx JSON errors: {v.get('error', 0)}; "
            f"crashes (5xx, non-JSON, dropped connection): {v.get('crash', 0)}.  ",
            f"Statuses: {r['statuses']}.  ",
            f"Healthy at every check and at the end: {not r['unhealthy_at'] and r['healthy_at_end']}; "
            f"index consistent: {r['index_consistent']} (nodes {(r.get('index') or {}).get('nodes')}).  ",
            f"Server log tracebacks: {r.get('server_log_tracebacks', 'n/a')}.", "",
            f"Verdict: **{'PASS' if r['ok'] else 'FAIL'}**"]


def _storm(r: dict) -> list[str]:
    return [f"## Eviction storm: {r['requests']} requests, {r.get('kv_blocks', 40)} KV blocks "
            f"({r['elapsed_s']:.0f} s)", "",
            f"`{_command(r, 'python -m benchmarks.reliability.storm')}`", "",
            f"Errors: {r['errors']}; index claims checked: {r['claims']} "
            f"({r['claimed_tokens_total']} claimed tokens, {r['cached_tokens_total']} tokens served from cache).  ",
            f"Claims with any deficit: {r['stale_claims']}; largest deficit: {r['max_deficit_tokens']} tokens "
            f"(bound {r['stale_bound_tokens']}); over the bound: {len(r['over_bound'])}.  ",
            f"Invariant violations (negative refs, unowned/leaked nodes): {r['invariant_violation_count']}; "
            f"smallest reference count seen: {r['min_refs_seen']}; peak nodes: {r['max_nodes_seen']}.  ",
            f"Evictions applied: {r['evictions_applied']:.0f}; index nodes evicted: {r['evicted_nodes']}.", "",
            f"Verdict: **{'PASS' if r['ok'] else 'FAIL'}**"]


def markdown(data: dict) -> str:
    """Every section present; ``docs/reliability.md`` says what each run checks."""
    out = []
    # The soak's timelines are this file's plot; an earlier soak kept its own image.
    sections = (("soak", lambda r: _soak(r, f"{NAME}.png")), ("fuzz_live", _fuzz), ("storm", _storm),
                ("soak_first_run", lambda r: _soak(r, Path(r["png"]).name if r.get("png") else None)))
    for key, fn in sections:
        if key in data:
            section = fn(data[key])
            if data[key].get("note"):
                section[0] += " (earlier run)"
                section.insert(2, f"Note: {data[key]['note']}")
                section.insert(3, "")
            out += section + [""]
    return "\n".join(out)


def plot(data: dict, path: Path) -> None:
    """The soak's latency, index size and server fds/threads over time, per side."""
    import matplotlib.pyplot as plt

    result = data["soak"]
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
