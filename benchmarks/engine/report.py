"""The engine benchmark's result: ratios against ``off``, the Markdown table, the plot,
written by the shared results writer."""
from __future__ import annotations

from pathlib import Path

from benchmarks.common.results import write_result
from benchmarks.engine.arms import NOANNOT, OFF_ON, RAG_ARMS, SERVER_OF

COLORS = {"off": "#888888", "on": "#3366aa", "on+batch": "#66aadd", NOANNOT: "#99cc66", "peer": "#cc7733",
          OFF_ON: "#bbbbbb"}
RATIO_KEYS = (("recomputed_tokens", "recomputed"), ("engine_prefill_s", "prefill"),
              ("ttft_mean_s", "ttft"), ("wall_s", "wall"))


def add_ratios(entry: dict) -> None:
    """off/arm for costs (>1 = better). Tokens against ``off``; times against the off
    arm run on the same server (``off@on`` for plugin-on arms, when it ran), since the
    box's speed drifts between the two servers' runs."""
    arms = entry["arms"]
    off = arms.get("off")
    if not off:
        return
    for name, arm in arms.items():
        clock = arms.get(OFF_ON) if SERVER_OF.get(name) == "on" else None
        rat = {}
        for key, label in RATIO_KEYS:
            base = off if label == "recomputed" or clock is None else clock
            if base.get(key) and arm.get(key):
                rat[label] = round(base[key] / arm[key], 3)
        if clock is not None:
            rat["time_base"] = OFF_ON
        arm["vs_off"] = rat


def write(doc: dict, out: Path, prov: dict, echo: bool = False) -> None:
    """Ratios filled in, then JSON + table + PNG (``echo``: print the table too)."""
    for e in doc["runs"]:
        e["arms"] = {a: e["arms"][a] for a in RAG_ARMS if a in e["arms"]}  # off first
        add_ratios(e)
    write_result(out, doc, table=markdown, plot=plot, prov=prov, echo=echo)


def plot(doc: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    runs = [e for e in doc["runs"] if e["arms"]]  # an interrupted run leaves empty entries
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    # 1: recomputed-token ratio vs off per run and arm, bound as 1/(1-bound)
    ax = axes[0]
    labels = [e["label"] for e in runs]
    arms = [a for a in RAG_ARMS[1:] if a != OFF_ON and any(a in e["arms"] for e in runs)]
    width = 0.8 / max(1, len(arms) + 1)
    for j, a in enumerate(arms):
        ys = [e["arms"].get(a, {}).get("vs_off", {}).get("recomputed", 0) for e in runs]
        ax.bar([i + j * width for i in range(len(runs))], ys, width, label=a, color=COLORS[a])
    # the cap: all repeated block tokens served from cache (multi-turn: the dedup bound)
    caps = [1 / (1 - e.get("dedup_bound_tokens", e["bound_tokens"])) for e in runs]
    ax.bar([i + len(arms) * width for i in range(len(runs))], caps, width, label="1/(1-bound)",
           color="#dddddd", edgecolor="#888888")
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(runs))], labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("recomputed prompt tokens: off / arm")
    ax.legend(fontsize=7)
    # 2: engine prefill time vs k (HotpotQA)
    ax = axes[1]
    ks = sorted((e for e in runs if e.get("k") is not None and e["kind"] == "rag_zipf" and not e["cache_blocks"]),
                key=lambda e: e["k"])
    for a in RAG_ARMS:
        pts = [(e["k"], e["arms"][a]["engine_prefill_s"]) for e in ks if a in e["arms"]]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=a, color=COLORS[a])
    if ks:
        ax.set_xlabel("k (blocks per request), Zipf RAG")
        ax.set_ylabel("engine prefill time, s (sum over requests; noisy)")
        ax.legend(fontsize=7)
    else:  # e.g. --targets-only: no k-scaling runs in this file
        ax.axis("off")
        ax.text(0.5, 0.5, "no k-scaling runs in this file", ha="center", va="center", fontsize=9)
    # 3: hit ratio per run and arm
    ax = axes[2]
    allarms = ["off"] + arms
    width = 0.8 / len(allarms)
    for j, a in enumerate(allarms):
        ys = [e["arms"].get(a, {}).get("hit_ratio", 0) for e in runs]
        ax.bar([i + j * width for i in range(len(runs))], ys, width, label=a, color=COLORS[a])
    rag = [(i, e) for i, e in enumerate(runs) if e.get("dedup_bound_tokens") is None]
    ax.scatter([i + 0.4 - width / 2 for i, _ in rag], [e["bound_tokens"] for _, e in rag],
               marker="_", s=300, color="k", label="bound (RAG)", zorder=3)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(runs))], labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("vLLM prefix-cache hit ratio")
    ax.legend(fontsize=7)
    fig.suptitle(f"{doc['config']['model_name']} on vLLM {doc['config'].get('vllm', '?')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(doc: dict) -> str:
    lines = ["| run | bound | arm | prompt tok | recomputed tok | recomputed off/arm | hit ratio | "
             "prefill s (off/arm)¹ | TTFT mean s (off/arm)¹ | wall s (off/arm)¹ | req/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in doc["runs"]:
        if not e["arms"]:
            continue
        b = f"{e['bound_tokens']:.3f}"
        if e.get("dedup_bound_tokens") is not None:
            b += f" (dedup {e['dedup_bound_tokens']:.3f})"
        for a, m in e["arms"].items():
            r = m.get("vs_off", {})

            def rv(key):
                return f" ({r[key]:.2f}×)" if key in r and a != "off" else ""
            lines.append(
                f"| {e['label']} | {b} | {a} | {m['prompt_tokens']:,} | {m['recomputed_tokens']:,} | "
                + (f"{r.get('recomputed', 0):.2f}×" if a != "off" else "1") + f" | {m['hit_ratio']:.3f} | "
                f"{m['engine_prefill_s']:.1f}{rv('prefill')} | "
                + (f"{m['ttft_mean_s']:.3f}{rv('ttft')}" if m.get("ttft_mean_s") is not None else "—")
                + f" | {m['wall_s']:.1f}{rv('wall')} | {m['throughput_rps']} |")
    lines.append("")
    lines.append(f"¹ time ratios of plugin-on arms are against `{OFF_ON}` (the off requests on the "
                 "plugin-on server) where it ran, otherwise against `off`.")
    return "\n".join(lines)

