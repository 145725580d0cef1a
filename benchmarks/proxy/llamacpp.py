"""llama.cpp's own server behind the proxy vs direct: block sets reused in other orders.

    bash scripts/setup_llamacpp.sh                 # once: builds the venv (cached wheel) + model
    python -m benchmarks.proxy.llamacpp            # 24 requests per arm, 5 blocks each

llama_cpp.server keeps one context: its prompt cache is the previous request's tokens,
and a new prompt reuses their longest common prefix. The workload is made for that: a
sequence of requests over a pool of documents where each request's block set is the
previous one's, with one block replaced every second request, always in a new order
(a retriever ranking the same documents differently for each follow-up question).

- ``direct``: the client sends its blocks in its own order (the plain prompt);
- ``proxy``: the same requests marked with ``context_blocks`` through ``cp_engine.proxy``,
  which sends the blocks it has seen in the order it sent them before.

Both arms start after an unrelated request (so the slot holds nothing of theirs). The
numbers are llama.cpp's: prompt tokens evaluated per request (its perf counter) and
reused from the previous request (``prefix-match hit``), plus its prompt eval time
(``benchmarks.proxy.llama_server``). Result: ``benchmarks/results/proxy_llamacpp.json``.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from benchmarks.common.results import RESULTS, provenance, write_result
from benchmarks.proxy.llama_server import LlamaServer, Processed, locate

ARMS = ("direct", "proxy")
COLORS = {"direct": "#888888", "proxy": "#cc7733"}
SYSTEM = "You are a careful assistant. Answer only from the documents."
_WORDS = ("river mountain library engine market garden signal window harbor planet theory lantern castle "
          "orbit meadow copper violin desert thunder crystal forest bridge canyon island compass glacier "
          "falcon marble pepper saddle timber velvet anchor beacon cobalt ember harvest ivory jasmine").split()


def document(i: int, words: int = 70) -> str:
    rng = random.Random(1000 + i)
    return f"Document {i}: " + " ".join(rng.choice(_WORDS) for _ in range(words)) + "."


def overlap_sequence(requests: int, k: int, pool: int, seed: int = 0) -> list[tuple[list[str], str]]:
    """``requests`` (blocks, question) pairs: each block set is the previous one with one
    block replaced every second request (from a pool of ``pool`` documents), always
    shuffled into a new order."""
    rng = random.Random(seed)
    current = rng.sample(range(pool), k)
    out = []
    for t in range(requests):
        if t and t % 2 == 0:
            current[rng.randrange(k)] = rng.choice([d for d in range(pool) if d not in current])
        order = current[:]
        rng.shuffle(order)
        out.append(([document(d) for d in order], f"Question {t}: which documents mention a {rng.choice(_WORDS)}?"))
    return out


def chat_body(model: str, blocks: list[str] | None, question: str, marked: bool, max_tokens: int) -> dict:
    """The request a client sends: marked (``context_blocks``) or plain (blocks in its order)."""
    from cp_engine.marking import fallback_messages, find_marks

    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0.0}
    if blocks and marked:
        return {**body, "messages": msgs, "context_blocks": blocks}
    if blocks:
        msgs = fallback_messages(find_marks({"context_blocks": blocks}, msgs))
    return {**body, "messages": msgs}


def clear_slot(srv: LlamaServer) -> None:
    """An unrelated request: afterwards the slot holds nothing of either arm."""
    srv.chat(chat_body(srv.model, None, "Say hello.", False, 1))


def run_arm(arm: str, srv: LlamaServer, seq, args, proxy_url: str | None) -> dict:
    clear_slot(srv)
    rows: list[Processed] = []
    for blocks, question in seq:
        _, p = srv.chat(chat_body(srv.model, blocks, question, arm == "proxy", args.max_tokens), url=proxy_url)
        rows.append(p)
    return {
        "requests": len(rows),
        "prompt_tokens": sum(r.prompt_tokens for r in rows),
        "evaluated_tokens": sum(r.evaluated_tokens for r in rows),
        "reused_tokens": sum(r.reused_tokens for r in rows),
        "prompt_eval_ms": round(sum(r.eval_ms for r in rows), 1),
        "per_request": [{"prompt": r.prompt_tokens, "evaluated": r.evaluated_tokens, "reused": r.reused_tokens,
                         "eval_ms": round(r.eval_ms, 1)} for r in rows],
    }


def summarize(doc: dict) -> None:
    d, p = doc["arms"].get("direct"), doc["arms"].get("proxy")
    if d and p and p["evaluated_tokens"]:
        doc["direct_over_proxy"] = {"evaluated_tokens": round(d["evaluated_tokens"] / p["evaluated_tokens"], 3),
                                    "prompt_eval_ms": round(d["prompt_eval_ms"] / p["prompt_eval_ms"], 3)
                                    if p["prompt_eval_ms"] else None}


def table(doc: dict) -> str:
    c = doc["config"]
    lines = [f"llama-cpp-python {c['llama_cpp_python']} (`llama_cpp.server`, one context), {c['model']}, "
             f"{c['requests']} requests per arm, {c['k']} blocks each from a pool of {c['pool']}, one block "
             f"replaced every second request, every request in a new order; proxy "
             f"`--upstream-cache-tokens {c['upstream_cache_tokens']}`.", "",
             "| arm | requests | prompt tok | evaluated tok (llama.cpp) | reused tok (prefix match) | "
             "prompt eval ms |", "|---|---|---|---|---|---|"]
    for name in ARMS:
        a = doc["arms"].get(name)
        if a:
            lines.append(f"| {name} | {a['requests']} | {a['prompt_tokens']:,} | {a['evaluated_tokens']:,} | "
                         f"{a['reused_tokens']:,} | {a['prompt_eval_ms']:,.0f} |")
    r = doc.get("direct_over_proxy")
    if r:
        lines += ["", f"Direct / proxy: {r['evaluated_tokens']:.2f}× the prompt tokens llama.cpp evaluated, "
                      f"{r['prompt_eval_ms']:.2f}× its prompt eval time."]
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for name in ARMS:
        a = doc["arms"].get(name)
        if a:
            ax.plot(range(1, a["requests"] + 1), [r["evaluated"] for r in a["per_request"]], marker="o",
                    color=COLORS[name], label=f"{name} ({a['evaluated_tokens']:,} tok)")
    ax.set_xlabel("request")
    ax.set_ylabel("prompt tokens llama.cpp evaluated")
    ax.set_title("llama_cpp.server, overlapping block sets in new orders", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.proxy.llamacpp", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--k", type=int, default=5, help="blocks per request")
    ap.add_argument("--pool", type=int, default=12, help="documents the blocks are drawn from")
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--upstream-cache-tokens", type=int, default=1000,
                    help="the proxy's index bound: about one prompt's block tokens, since the server "
                    "caches only the previous prompt")
    ap.add_argument("--out", default=str(RESULTS / "proxy_llamacpp.json"))
    args = ap.parse_args(argv)
    found = locate()
    if found is None:
        print("llama.cpp venv or model missing: run scripts/setup_llamacpp.sh", file=sys.stderr)
        return 2
    python, model = found
    prov = provenance("benchmarks.proxy.llamacpp", argv)
    seq = overlap_sequence(args.requests, args.k, args.pool)
    from cp_engine.proxy.app import build_app
    from cp_engine.proxy.background import BackgroundServer
    from cp_engine.proxy.config import ProxyConfig

    with LlamaServer(python, model, n_ctx=args.n_ctx, threads=args.threads) as srv:
        import subprocess

        version = subprocess.run([python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                                 capture_output=True, text=True, timeout=120).stdout.strip()
        doc = {"config": {"llama_cpp_python": version, "model": Path(model).name, "requests": args.requests,
                          "k": args.k, "pool": args.pool, "max_tokens": args.max_tokens, "n_ctx": args.n_ctx,
                          "upstream_cache_tokens": args.upstream_cache_tokens}, "arms": {}}
        doc["arms"]["direct"] = run_arm("direct", srv, seq, args, None)
        cfg = ProxyConfig(upstream=srv.url, upstream_cache_tokens=args.upstream_cache_tokens)
        with BackgroundServer(build_app(cfg)) as proxy:
            doc["arms"]["proxy"] = run_arm("proxy", srv, seq, args, proxy.url)
    summarize(doc)
    write_result(Path(args.out), doc, table=table, plot=plot, prov=prov)
    return 0


if __name__ == "__main__":
    sys.exit(main())
