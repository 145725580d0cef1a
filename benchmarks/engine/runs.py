"""Which runs a benchmark invocation makes: run sizes (full or ``--quick``), the
target runs, the command line's selections, and building each run's workload."""
from __future__ import annotations

from benchmarks.engine.workloads import chat_memory, chat_sliding, rag_hotpot, rag_zipf

# Run sizes. Full: the targets (batched Zipf RAG, both multi-turn workloads) at the
# size where prefix reuse can reach them at all (N=400: simulated ceiling 1.32x, vs
# 1.27x at N=120), and the scaling runs (k, cache size, HotpotQA) at N=200, so the
# full run fits in about an hour on 2 CPU cores. Quick: every run and arm at a size
# that finishes in minutes (a smoke test of the whole pipeline; ratios are noisy).
FULL_SIZES = {"n_target": 400, "n_scaling": 200, "memory_sessions": 50, "sliding_sessions": 24,
              "caches": (256, 48)}
QUICK_SIZES = {"n_target": 32, "n_scaling": 32, "memory_sessions": 6, "sliding_sessions": 4, "caches": (48,)}


def is_target_run(run: dict) -> bool:
    """The runs the engine targets name: batched Zipf RAG (k 10-20, default cache) and multi-turn."""
    return run["cache"] is None and (run["kind"].startswith("chat") or (run["kind"] == "rag_zipf" and run["k"] is None))


def plan_runs(quick: bool) -> list[dict]:
    """Every run of a full or ``--quick`` invocation: kind, size, k and the KV cache in
    blocks (None: the server's default)."""
    size = QUICK_SIZES if quick else FULL_SIZES
    runs = [{"kind": "rag_zipf", "n": size["n_target"], "k": None, "cache": None}]
    for k in (5, 10, 20):  # scaling with k: the same Zipf popularity, k blocks per request
        runs.append({"kind": "rag_zipf", "n": size["n_scaling"], "k": k, "cache": None})
    runs.append({"kind": "rag_hotpot", "n": size["n_scaling"], "k": 10, "cache": None})
    runs.append({"kind": "chat_memory", "sessions": size["memory_sessions"], "k": 5, "cache": None})
    runs.append({"kind": "chat_sliding", "sessions": size["sliding_sessions"], "turns": 5, "k": 4, "cache": None})
    for blocks in size["caches"]:  # 128-token blocks: 48 = 6,144 tokens
        runs.append({"kind": "rag_zipf", "n": size["n_scaling"], "k": 10, "cache": blocks})
    return runs


def build(run: dict):
    kind = run["kind"]
    if kind == "rag_zipf":
        return rag_zipf(run["n"], run["k"])
    if kind == "rag_hotpot":
        return rag_hotpot(run["n"], run["k"])
    if kind == "chat_memory":
        return chat_memory(run["sessions"], run["k"])
    if kind == "chat_sliding":
        return chat_sliding(run["sessions"], run["turns"], run["k"])
    raise ValueError(kind)


def select_runs(runs: list[dict], *, only: str | None = None, caches: str | None = None,
                cache_runs_only: bool = False, targets_only: bool = False, no_targets: bool = False
                ) -> list[dict]:
    """The command line's selection: ``only`` run kinds (comma-separated), the
    cache-size runs at ``caches`` blocks instead of the default sizes, only the
    cache-size runs, only the target runs or all but them."""
    if only:
        keep = set(only.split(","))
        runs = [r for r in runs if r["kind"] in keep]
    if caches:
        sizes = [int(x) for x in caches.split(",") if x]
        template = next((r for r in runs if r["cache"] is not None), None)
        runs = [r for r in runs if r["cache"] is None]
        if template is not None:
            runs += [{**template, "cache": c} for c in sizes]
    if cache_runs_only:
        runs = [r for r in runs if r["cache"] is not None]
    if targets_only:
        runs = [r for r in runs if is_target_run(r)]
    if no_targets:
        runs = [r for r in runs if not is_target_run(r)]
    return runs
