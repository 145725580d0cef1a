"""Blend on a live vLLM server: prompt tokens computed and prefill time, side by side.

    python -m benchmarks.blend.bench_blend_engine --quick          # tiny model, small sizes: a smoke test
    python -m benchmarks.blend.bench_blend_engine --model DIR      # RAG N=400, chat 50 sessions, agent 24x8
    python -m benchmarks.blend.bench_blend_engine --only rag --ratios 0,0.05

Workloads (``benchmarks.blend.prompts``): batched Zipf RAG (the engine benchmark's
generator, sent all at once with ``--concurrency`` threads), multi-turn memory chat
(k=5, sessions in waves, fixed assistant answers) and CacheSlide's agent pattern
(system prompt, a segment of a new length every turn, then the fixed suffix of memory
and history). Every prompt is rendered with the served model's chat template and sent
as token ids to ``/v1/completions``; blend arms also send the exact ``[start, end)``
span of every context block (``vllm_xargs.cp_spans``), computed here by tokenizing the
blocks apart (``cp_engine.blend.spans.encode_segments``), so the benchmark does not
depend on the API server's span builder.

Arms, every one of them on servers of one type (same model and flags; blend servers add
``CP_ENGINE_BLEND=1`` and the ratio/mode flags):

- ``plain``: the plain client's prompts tokenized whole, no spans: vLLM's prefix caching.
  It runs first on every server and is that server's clock for prefill-time ratios.
- ``prefix``: today's best prefix plan (client-side batch plan for RAG, the
  ``conversation_id`` rewrite for chat; the agent has none), tokenized whole, no spans.
- ``blend-order@r``: the plain prompts with spans (retrieval order, no annotation).
- ``blend-aligned@r``: the prefix plan's prompts with spans.
- ``blend-api@r`` (opt-in, ``--arms``): batched RAG sent as chat requests with
  ``context_blocks``, the API server rendering the prompt and building the spans.

``--store-depths 0,1`` runs every blend arm once per store depth (``@r d1`` in the
tables): the blend servers get ``CP_ENGINE_BLEND_STORE_DEPTH`` = the largest, and each
arm lowers it with ``vllm_xargs.cp_blend_store_depth``. Depth 0 stores only blocks
computed exactly; depth d also stores blocks computed behind stitched KV, up to d
generations deep (docs/blend.md).

One server per ratio (the ratio is an engine flag) unless ``--ratio-xarg KEY`` names a
per-request ratio hint the connector reads; then one blend server serves all ratios.
Before every arm the caches are reset (``/reset_prefix_cache?reset_external=true``),
and every arm pass uses its own ``cache_salt``, so no pass can reuse another's KV,
whether in vLLM's prefix cache or in the blend store, even if the connector ignored the
reset. Counts are exact, from the server's ``/metrics`` deltas around each arm:
computed prompt tokens = ``vllm:prompt_tokens_by_source{source="local_compute"}`` +
``cp_engine_blend_recomputed_tokens_total``. Times: the batch's wall time (generation
is ``--max-tokens`` 1, so it is prefill) and the sum of vLLM's per-request prefill time.
Results: ``benchmarks/results/blend_engine[_quick].{json,table.md,png}``, rewritten after
every arm.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

from benchmarks.blend.prompts import Tokenizer, agent_prompts, chat_prompts, rag_prompts, rounds
from benchmarks.blend.server_io import Server, TokenRequest, computed_tokens, delta, served_model

RATIOS = (0.0, 0.05, 0.15, 0.3)
FULL = {"rag_n": 400, "chat_sessions": 50, "agent_sessions": 24, "agent_turns": 8}
QUICK = {"rag_n": 48, "chat_sessions": 8, "agent_sessions": 6, "agent_turns": 6}
TARGETS = {"rag": ("plain", 3.0), "chat": ("plain", 2.0), "agent": ("plain", 2.5)}
BASE_ARMS = ("plain", "prefix", "blend-order", "blend-aligned")
OPT_ARMS = ("blend-api",)


# ---------------------------------------------------------------------------- workloads

class Workload:
    """A workload's token-level requests per arm family, in send order, and its rounds
    (requests of one round may run concurrently; None: one batch)."""

    def __init__(self, kind: str, w: dict, tok: Tokenizer):
        self.kind, self.name = kind, w["name"]
        self.rounds = rounds(w["order"]) if w.get("order") else None
        self.plain_ids = [tok.whole(m) for m, _ in w["plain"]]
        self.order = [tok.blocks(m, b) for m, b in w["plain"]]
        self.prefix_ids = [tok.whole(m) for m, _ in w["prefix"]] if w["prefix"] is not None else None
        self.aligned = [tok.blocks(m, b) for m, b in w["prefix"]] if w["prefix"] is not None else None
        self.raw = w

    def requests(self, arm: str, salt: str, xargs: dict) -> list[TokenRequest] | None:
        if arm == "plain":
            return [TokenRequest(ids, None, salt, i) for i, ids in enumerate(self.plain_ids)]
        if arm == "prefix":
            return None if self.prefix_ids is None else [
                TokenRequest(ids, None, salt, i) for i, ids in enumerate(self.prefix_ids)]
        rendered = {"blend-order": self.order, "blend-aligned": self.aligned}.get(arm)
        if rendered is None:
            return None
        return [TokenRequest(r.ids, list(r.spans) or None, salt, i, dict(xargs)) for i, r in enumerate(rendered)]


def build_workloads(kinds, size: dict, tok: Tokenizer, width: int) -> list[Workload]:
    builders: dict[str, Callable[[], dict]] = {
        "rag": lambda: rag_prompts(size["rag_n"], tok),
        "chat": lambda: chat_prompts(size["chat_sessions"], tok, width),
        "agent": lambda: agent_prompts(size["agent_sessions"], size["agent_turns"], width),
    }
    out = []
    for kind in kinds:
        t0 = time.perf_counter()
        out.append(Workload(kind, builders[kind](), tok))
        print(f"[blend-engine] {out[-1].name}: {len(out[-1].plain_ids)} requests rendered in "
              f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return out


# ---------------------------------------------------------------------------- running

def send(srv: Server, w: Workload, reqs: list[TokenRequest], concurrency: int, max_tokens: int) -> None:
    if w.rounds is None:
        srv.send_batch(reqs, max_tokens, concurrency)
        return
    for rnd in w.rounds:  # a session's turn t+1 only after its turn t
        srv.send_batch([reqs[i] for i in rnd], max_tokens, concurrency)


def api_requests(srv: Server, w: Workload, salt: str, xargs: dict, max_tokens: int):
    """``blend-api``: batched RAG as chat requests with ``context_blocks`` (the API
    server renders them and builds the spans); None for the other workloads."""
    import requests as http

    if w.kind == "rag":
        from benchmarks.engine.arms import SYSTEM

        bodies = [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
                   "context_blocks": d} for (_, d), q in zip(w.raw["plain"], w.raw["queries"])]
    else:
        return None

    def post(body):
        body = {"model": srv.model, "max_tokens": max_tokens, "temperature": 0.0, "cache_salt": salt, **body}
        if xargs:
            body["vllm_xargs"] = dict(xargs)
        r = http.post(srv.url + "/v1/chat/completions", json=body, timeout=3600)
        if r.status_code != 200:
            raise RuntimeError(f"chat request failed with {r.status_code}: {r.text[:300]}")
    return bodies, post


def arm_label(a: dict) -> str:
    """``arm``, ``arm@ratio`` or ``arm@ratio dN`` (N: the arm's store depth, when not 0),
    then `` carry``/`` no-carry`` when the arm sent ``cp_blend_carry``."""
    label = a["arm"] + ("" if a["ratio"] is None else f"@{a['ratio']:g}")
    label += f" d{a['store_depth']}" if a.get("store_depth") else ""
    return label + ("" if a.get("carry") is None else " carry" if a["carry"] else " no-carry")


def run_arm(srv: Server, w: Workload, arm: str, ratio: float | None, args, xargs: dict) -> dict | None:
    salt = f"{arm}-{ratio}-{uuid.uuid4().hex[:12]}"
    if arm == "blend-api":
        got = api_requests(srv, w, salt, xargs, args.max_tokens)
        if got is None:
            return None
        bodies, post = got
        srv.reset()
        before = srv.counters()
        t0 = time.perf_counter()
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
            list(pool.map(post, bodies))
        wall = time.perf_counter() - t0
        n = len(bodies)
    else:
        reqs = w.requests(arm, salt, xargs)
        if reqs is None:
            return None
        srv.reset()
        before = srv.counters()
        t0 = time.perf_counter()
        send(srv, w, reqs, args.concurrency, args.max_tokens)
        wall = time.perf_counter() - t0
        n = len(reqs)
    # EngineCore forwards counters at most once a second (the last ones by a trailing
    # flush) and the API server applies them within its receiver's idle poll (0.5 s)
    time.sleep(2.5)
    d = delta(before, srv.counters())
    return {"requests": n, "prompt_tokens": int(d["prompt"]), "computed_tokens": int(round(computed_tokens(d))),
            "vllm_local_compute": int(d["local_compute"]), "vllm_cache_hit": int(d["local_cache_hit"]),
            "claimed_external": int(d["external"]), "blend_recomputed": round(d["blend_recomputed"], 1),
            "blend_reused": int(d["blend_reused"]), "blend_stored": int(d["blend_stored"]),
            "blend_hits": int(d["blend_hits"]), "wall_s": round(wall, 2), "prefill_sum_s": round(d["prefill_s"], 3),
            "blend_counters": {k: v for k, v in d.items() if k.startswith("blend:") and v},
            "ratio": ratio}


# ---------------------------------------------------------------------------- servers

def server_plan(args) -> list[dict]:
    """The servers to start, in order, each with the arms it runs: every server runs
    ``plain`` first (its clock); the first also runs ``prefix``."""
    blend_arms = [a for a in args.arms if a.startswith("blend")]
    base = [a for a in ("plain", "prefix") if a in args.arms]
    mode_env = {"CP_ENGINE_BLEND_MODE": args.mode} if args.mode else {}
    # Always named: the server's own default depth is not 0, and depth 0 runs must stay depth 0.
    mode_env["CP_ENGINE_BLEND_STORE_DEPTH"] = str(max(args.store_depths))
    if args.ratio_xarg:
        return [{"env": {"CP_ENGINE_BLEND": "1", **mode_env}, "ratios": list(args.ratios),
                 "arms": base + blend_arms, "label": "blend (per-request ratio)"}]
    plans = []
    for j, r in enumerate(args.ratios):
        arms = (base if j == 0 else ["plain"] if "plain" in args.arms else []) + blend_arms
        plans.append({"env": {"CP_ENGINE_BLEND": "1", "CP_ENGINE_BLEND_RATIO": f"{r:g}", **mode_env},
                      "ratios": [r], "arms": arms, "label": f"blend ratio {r:g}"})
    return plans


def interleaved(plan: dict, depths: list[int], repeats: int,
                carries: list[bool | None] = (None,)) -> list[tuple]:
    """(round, arm, ratio, store depth, carry) in run order: every arm of ``plan`` once
    per round (a blend arm once per ratio, depth and carry setting; None: not sent),
    ``repeats`` rounds, odd rounds in reverse (ABBA), so a drift in the machine's speed
    over the run weighs on every arm alike. ``plain`` is each round's clock."""
    one = []
    for arm in plan["arms"]:
        blend = arm.startswith("blend")
        one += ([(arm, r, d, c) for r in plan["ratios"] for d in depths for c in carries] if blend
                else [(arm, None, 0, None)])
    out = []
    for rep in range(max(1, repeats)):
        out += [(rep, *run) for run in (one if rep % 2 == 0 else one[::-1])]
    return out


def summarize(data: dict) -> None:
    """Ratios per arm: plain's computed tokens ÷ the arm's; prefill wall time vs the
    plain arm on the same server in the same round; with several rounds, the median of
    the per-round wall ratios per arm label (``wall_rounds``)."""
    for w in data["workloads"]:
        plain = next((a for a in w["arms"] if a["arm"] == "plain"), None)
        for a in w["arms"]:
            if plain and a["computed_tokens"]:
                a["plain_over_arm"] = round(plain["computed_tokens"] / a["computed_tokens"], 3)
            clock = next((c for c in w["arms"] if c["arm"] == "plain" and c["server"] == a["server"]
                          and c.get("round", 0) == a.get("round", 0)), None)
            if clock and a["wall_s"]:
                a["wall_plain_over_arm"] = round(clock["wall_s"] / a["wall_s"], 3)
                if a["prefill_sum_s"]:
                    a["prefill_plain_over_arm"] = round(clock["prefill_sum_s"] / a["prefill_sum_s"], 3)
        by_label: dict[str, list[float]] = {}
        for a in w["arms"]:
            if a["arm"] != "plain" and a.get("wall_plain_over_arm"):
                by_label.setdefault(f"{arm_label(a)} [{a['server']}]", []).append(a["wall_plain_over_arm"])
        w["wall_rounds"] = {k: {"rounds": len(v), "median": round(statistics.median(v), 3),
                                "min": min(v), "max": max(v)} for k, v in by_label.items()}


def table(data: dict) -> str:
    lines = [f"Model `{data['model']}`; {data['note']}", "",
             "| workload | arm | ratio | server | prompt tok | computed tok¹ | of which blend | plain/arm | "
             "wall s (plain/arm)² | prefill sum s (plain/arm) | blend hits |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for w in data["workloads"]:
        for a in w["arms"]:
            r = "—" if a["ratio"] is None else f"{a['ratio']:g}"
            r += f", depth {a['store_depth']}" if a.get("store_depth") else ""
            r += "" if a.get("carry") is None else ", carry" if a["carry"] else ", no carry"
            srv = a["server"] + (f", round {a['round'] + 1}" if data.get("repeats", 1) > 1 else "")
            lines.append(
                f"| {w['name']} | {a['arm']} | {r} | {srv} | {a['prompt_tokens']:,} | {a['computed_tokens']:,} | "
                f"{a['blend_recomputed']:,.0f} | {a.get('plain_over_arm', 0):.2f}× | "
                f"{a['wall_s']:.1f} ({a.get('wall_plain_over_arm', 0):.2f}×) | "
                f"{a['prefill_sum_s']:.1f} ({a.get('prefill_plain_over_arm', 0):.2f}×) | {a['blend_hits']:,} |")
    lines += ["", "¹ computed = vLLM's `prompt_tokens_by_source{source=\"local_compute\"}` + "
              "`cp_engine_blend_recomputed_tokens_total`, deltas of the server's /metrics around the arm.",
              "² against the `plain` arm on the same server (its clock); prefill sum = vLLM's "
              "`request_prefill_time_seconds` summed over requests (includes queueing at this concurrency)."]
    multi = {k: v for w in data["workloads"] for k, v in w.get("wall_rounds", {}).items() if v["rounds"] > 1}
    if multi:
        lines += ["", "Wall time, plain ÷ arm, per round against that round's plain arm (rounds interleaved, "
                  "odd rounds in reverse order):", ""]
        lines += [f"- {k}: median {v['median']:.2f}× over {v['rounds']} rounds (min {v['min']:.2f}×, "
                  f"max {v['max']:.2f}×)" for k, v in multi.items()]
    if data.get("targets"):
        lines += ["", "Targets (computed tokens, plain ÷ arm):", ""]
        for t in data["targets"]:
            lines.append(f"- {t['workload']}: goal ≥ {t['goal']}×; best measured {t['best']:.2f}× "
                         f"({t['arm']}) → {'met' if t['best'] >= t['goal'] else 'NOT met'}")
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    ws = [w for w in data["workloads"] if w["arms"]]
    fig, axes = plt.subplots(1, max(1, len(ws)), figsize=(5 * max(1, len(ws)), 4), squeeze=False)
    for ax, w in zip(axes[0], ws):
        labels = [arm_label(a) for a in w["arms"]]
        colors = ["#888888" if a["arm"] == "plain" else "#cc7733" if a["arm"] == "prefix" else "#3366aa"
                  for a in w["arms"]]
        ax.bar(range(len(labels)), [a["computed_tokens"] for a in w["arms"]], color=colors)
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("prompt tokens computed (vLLM + blend)")
        ax.set_title(w["name"], fontsize=9)
    fig.suptitle(f"Blend on live vLLM, {data['model']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def targets(data: dict) -> list[dict]:
    out = []
    for w in data["workloads"]:
        goal = TARGETS[w["kind"]][1]
        cands = [a for a in w["arms"] if a["arm"].startswith("blend") and a.get("plain_over_arm")]
        if cands:
            best = max(cands, key=lambda a: a["plain_over_arm"])
            out.append({"workload": w["name"], "goal": goal, "best": best["plain_over_arm"],
                        "arm": arm_label(best)})
    return out


# ---------------------------------------------------------------------------- main

def main(argv=None) -> int:
    from benchmarks.common.live import start_server
    from benchmarks.common.results import provenance, write_result

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, RAG N=48, chat 8 sessions, agent 6x6")
    ap.add_argument("--model", help="model folder (default: the tiny model with --quick, else Qwen2.5-0.5B)")
    ap.add_argument("--only", default="rag,chat,agent", help="comma-separated: rag, chat, agent")
    ap.add_argument("--arms", default=",".join(BASE_ARMS), help=f"of {BASE_ARMS + OPT_ARMS}")
    ap.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")], default=list(RATIOS))
    ap.add_argument("--mode", help="CP_ENGINE_BLEND_MODE for the blend servers (default: the flag's)")
    ap.add_argument("--ratio-xarg", help="per-request ratio hint key, if the connector reads one (one blend server)")
    ap.add_argument("--store-depths", type=lambda s: [int(x) for x in s.split(",")], default=[0],
                    help="blend arms once per store depth (CP_ENGINE_BLEND_STORE_DEPTH; default 0, whatever the flag's default)")
    ap.add_argument("--carry", type=lambda s: [{"on": True, "off": False}[x] for x in s.split(",")],
                    default=[None], help="on, off or on,off: each blend arm sends cp_blend_carry (default: not sent)")
    ap.add_argument("--rag-n", type=int)
    ap.add_argument("--chat-sessions", type=int)
    ap.add_argument("--agent-sessions", type=int)
    ap.add_argument("--concurrency", type=int, default=64, help="in-flight requests (RAG; chat/agent per round)")
    ap.add_argument("--chat-concurrency", type=int, default=8, help="sessions per wave")
    ap.add_argument("--repeats", type=int, default=1,
                    help="rounds of every arm on each server, interleaved (odd rounds reversed)")
    ap.add_argument("--max-tokens", type=int, default=1)
    ap.add_argument("--kv-cache-gib", type=int, default=2)
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--env", action="append", default=[], help="extra server env KEY=VALUE (repeatable)")
    ap.add_argument("--server-arg", action="append", default=[], help="extra vLLM argument (repeatable)")
    ap.add_argument("--url", help="an already running blend server (started with VLLM_SERVER_DEV_MODE=1)")
    ap.add_argument("--out", help="result name or path (default blend_engine[_quick])")
    args = ap.parse_args(argv)
    prov = provenance("benchmarks.blend.bench_blend_engine", argv)
    args.arms = [a for a in args.arms.split(",") if a]
    unknown = set(args.arms) - set(BASE_ARMS + OPT_ARMS)
    if unknown:
        ap.error(f"unknown arms {sorted(unknown)}")

    model = served_model(args.model, args.quick)
    size = dict(QUICK if args.quick else FULL)
    for key, val in (("rag_n", args.rag_n), ("chat_sessions", args.chat_sessions),
                     ("agent_sessions", args.agent_sessions)):
        if val is not None:
            size[key] = val
    tok = Tokenizer(model)
    kinds = [k for k in args.only.split(",") if k]
    wls = build_workloads(kinds, size, tok, args.chat_concurrency)
    name = args.out or ("blend_engine_quick" if args.quick else "blend_engine")
    data = {"model": Path(model).name, "sizes": size, "ratios": args.ratios, "mode": args.mode or "default",
            "max_tokens": args.max_tokens, "concurrency": args.concurrency, "repeats": args.repeats,
            "note": "", "workloads": [{"name": w.name, "kind": w.kind, "requests": len(w.plain_ids), "arms": []}
                                      for w in wls], "servers": []}
    data["note"] = (f"sizes {size}; max_tokens {args.max_tokens}; RAG concurrency {args.concurrency}; "
                    f"blend mode {data['mode']}.")
    extra_env = dict(kv.split("=", 1) for kv in args.env)
    t_start = time.perf_counter()
    for plan in server_plan(args):
        env = {"VLLM_SERVER_DEV_MODE": "1", **plan["env"], **extra_env}
        label = plan["label"]
        if args.url:
            from contextlib import nullcontext

            from benchmarks.common.live import Remote

            cm = nullcontext(Remote(args.url))
        else:
            print(f"[blend-engine] starting vLLM ({label}) ...", file=sys.stderr, flush=True)
            cm = start_server(model, env, ["--max-model-len", str(args.max_model_len), *args.server_arg],
                              kv_cache_gib=args.kv_cache_gib)
        with cm as raw:
            srv = Server(raw.url, raw.model)
            fmt = srv.probe_span_format(wls[0].plain_ids[0][:16])
            data["servers"].append({"label": label, "env": env, "span_format": fmt})
            for w, slot in zip(wls, data["workloads"]):
                for rep, arm, r, depth, carry in interleaved(plan, args.store_depths, args.repeats, args.carry):
                    blend = arm.startswith("blend")
                    xargs = {args.ratio_xarg: r} if args.ratio_xarg and r is not None else {}
                    if blend and max(args.store_depths) > 0:
                        xargs["cp_blend_store_depth"] = depth
                    if blend and carry is not None:
                        xargs["cp_blend_carry"] = carry
                    t0 = time.perf_counter()
                    try:
                        res = run_arm(srv, w, arm, r, args, xargs)
                    except Exception as exc:  # one failed arm must not lose the others
                        print(f"[blend-engine] {w.name} {arm}@{r} d{depth} failed: {exc!r}", file=sys.stderr, flush=True)
                        slot.setdefault("errors", []).append({"arm": arm, "ratio": r, "server": label,
                                                              "error": repr(exc)[:500]})
                        continue
                    if res is None:
                        continue
                    res.update(arm=arm, server=label, store_depth=depth, round=rep, carry=carry)
                    slot["arms"].append(res)
                    summarize(data)
                    data["targets"] = targets(data)
                    data["wall_s"] = round(time.perf_counter() - t_start, 1)
                    write_result(name, data, table=table, plot=plot, prov=prov, echo=False)
                    print(f"[blend-engine] {w.name} {arm_label(res)}: computed {res['computed_tokens']:,} of "
                          f"{res['prompt_tokens']:,} (blend {res['blend_recomputed']:,.0f}), wall "
                          f"{res['wall_s']:.1f} s ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    summarize(data)
    data["targets"] = targets(data)
    data["wall_s"] = round(time.perf_counter() - t_start, 1)
    write_result(name, data, table=table, plot=plot, prov=prov)
    return 0


if __name__ == "__main__":
    sys.exit(main())
