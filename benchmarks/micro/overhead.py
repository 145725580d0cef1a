"""The plugin's CPU time per request in vLLM's API server, without an engine.

    .venv/bin/python -m benchmarks.micro.overhead              # 1k and 100k indexed requests
    .venv/bin/python -m benchmarks.micro.overhead --quick      # 1k only, fewer requests
    .venv/bin/python -m benchmarks.micro.overhead --profile    # and cProfile's top functions

Drives the code the API server runs per request, as the patch table installs it:
``serving_patch``'s wrapper around a ``create_chat_completion`` / ``create_completion``
stand-in (an ``async`` method returning a finished response: the engine's part), with
``chat_rewrite`` / ``completion_rewrite`` inside it (marks, ``ContextPipeline`` rewrite
with its index lookup and lock, the tokenizer-ratio sample with the tiny model's real
tokenizer, hints, pending commit, acceptance), then ``request_gate`` on an engine
request carrying those hints, and the receiver's handling of one eviction message.
The receiver thread is also run for real (``--receiver-seconds``): evict_path messages
at the live soak's rate from another process over its ipc socket, its thread CPU per
message counted with and without the batching window (``hooks.channel``).
Requests are vLLM's own pydantic ``ChatCompletionRequest`` / ``CompletionRequest``
built from the soak's seeded stream (``cp_engine.devtools.reliability.soak``: 60 %
chat with blocks in a conversation, 20 % unmarked chat, 20 % completion with blocks).

Before timing, ``--indexed`` requests over a 20,000-document Zipf pool are recorded
into the index (its node bound raised so none is trimmed). Reported per request kind:
the wrapper's total minus the bare call (the plugin's cost) and a breakdown by stage
(a timer around each stage's function, measured in a second pass so the timers do not
inflate the totals); all in this thread's CPU time (``time.thread_time_ns``), which
other processes on a busy machine do not inflate the way they do wall time. Results: ``benchmarks/results/overhead_micro.*``.
"""
from __future__ import annotations

import argparse
import dataclasses
import asyncio
import cProfile
import functools
import io
import itertools
import pstats
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks.common.results import provenance, write_result

KINDS = ("chat", "passthrough", "completion")
# This thread's CPU time: on a shared machine, time another process runs in does not count.
CLOCK = time.thread_time_ns
# Stage timers: a CPU-clock read is a system call that would inflate short stages; the
# wall clock is cheap, and a median over requests drops the ones another process preempted.
STAGE_CLOCK = time.perf_counter_ns
DOCS = 20_000


class _Serving:
    """What the rewrites read from vLLM's serving object: its tokenizer and error response."""

    def __init__(self, tokenizer: Any) -> None:
        self.renderer = type("Renderer", (), {"tokenizer": tokenizer})()

    def create_error_response(self, message: str) -> dict:
        return {"error": message}

    async def create_chat_completion(self, request: Any, raw_request: Any = None) -> dict:
        return {"choices": [{"text": "ok"}]}

    async def create_completion(self, request: Any, raw_request: Any = None) -> dict:
        return {"choices": [{"text": "ok"}]}


class _Raw:
    def __init__(self, headers: Any) -> None:
        self.headers = headers


class _Params:
    def __init__(self, extra_args: dict | None) -> None:
        self.extra_args = extra_args


class _EngineRequest:
    """The fields of vLLM's ``EngineCoreRequest`` that ``request_gate`` reads."""

    def __init__(self, extra_args: dict | None) -> None:
        self.sampling_params = _Params(extra_args)
        self.prompt_token_ids = None


def _setup(indexed: int, seed: int = 5) -> None:
    """A fresh process-wide pipeline holding ``indexed`` recorded requests, each in the
    order the index itself chooses (as the rewrite records them)."""
    from cp_engine.blocks import block_id, estimate_tokens
    from cp_engine.config import load_config
    from cp_engine.hooks import faults, metrics, runtime
    from cp_engine.pipeline import ContextPipeline

    runtime.reset_for_tests()
    metrics.reset()
    # No stall breaker: on a busy machine one preempted call would switch a hook off
    # for the rest of the run, and every later request would be measured as skipped.
    cfg = dataclasses.replace(load_config(), index_max_nodes=max(load_config().index_max_nodes, 8 * indexed),
                              hook_stall_s=0.0)
    runtime._config = cfg
    runtime._pipeline = runtime.LockedPipeline(ContextPipeline(cfg))
    faults.reset_breaker()
    index = runtime.pipeline().unwrapped.index
    rng = random.Random(seed)
    docs = [f"Indexed document {d}: " + " ".join(f"w{rng.randrange(5000)}" for _ in range(50)) for d in range(DOCS)]
    ids = [block_id(d) for d in docs]
    lengths = [estimate_tokens(d) for d in docs]
    cum = list(itertools.accumulate(1.0 / (r + 1) for r in range(DOCS)))  # Zipf, summed once
    for r in range(indexed):
        chosen = list(dict.fromkeys(rng.choices(range(DOCS), cum_weights=cum, k=rng.randint(3, 6))))
        ns = f"ns{rng.randrange(50)}"
        order = index.best_order([ids[d] for d in chosen], namespace=ns, token_lengths=[lengths[d] for d in chosen])
        index.record(f"warm-{r}", [ids[chosen[i]] for i in order], namespace=ns,
                     token_lengths=[lengths[chosen[i]] for i in order])


def _failures() -> dict[str, float]:
    """Hook failures and stalls counted so far: a measured request must have run whole."""
    from cp_engine.hooks import metrics

    return {name: metrics.total(name) for name in ("hook_failures", "hook_stalls", "hook_calls_skipped")}


def _requests(n: int, model: str, tag: str) -> list[tuple[str, Any, Any]]:
    """``n`` (kind, vLLM request, raw request) from the soak's client streams, fresh
    objects (a rewrite changes its request in place), ids prefixed with ``tag``."""
    from starlette.datastructures import Headers
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    from cp_engine.devtools.reliability.soak import Workload, _pool

    pool = _pool()
    streams = [Workload(c, pool) for c in range(64)]
    out = []
    for i in range(n):
        endpoint, body, _ = streams[i % 64].next()
        full = {"model": model, "max_tokens": 4, "temperature": 0.0, **body}
        raw = _Raw(Headers({"x-request-id": f"{tag}{i}", "content-type": "application/json"}))
        if endpoint == "chat":
            kind = "chat" if "context_blocks" in body else "passthrough"
            out.append((kind, ChatCompletionRequest.model_validate(full), raw))
        else:
            out.append(("completion", CompletionRequest.model_validate(full), raw))
    return out


# -- stage timers ----------------------------------------------------------------------
class Stages:
    """Nanoseconds per stage of the request being timed (``wrap`` installs a timer)."""

    def __init__(self) -> None:
        self.current: dict[str, int] = {}
        self._undo: list[Callable[[], None]] = []

    def wrap(self, owner: Any, name: str, stage: str) -> None:
        original = getattr(owner, name, None)
        if original is None:  # not in this version of the code (a baseline run)
            return

        @functools.wraps(original)
        def timed(*a: Any, **k: Any) -> Any:
            t = STAGE_CLOCK()
            try:
                return original(*a, **k)
            finally:
                self.current[stage] = self.current.get(stage, 0) + STAGE_CLOCK() - t

        setattr(owner, name, timed)
        self._undo.append(lambda: setattr(owner, name, original))

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


def _install_stage_timers(st: Stages) -> None:
    from cp_engine import pipeline as pl
    from cp_engine.index import ContextIndex
    from cp_engine.hooks.vllm import chat_rewrite, completion_rewrite, serving_patch, staging

    for mod in (chat_rewrite, completion_rewrite):
        st.wrap(mod, "find_marks", "marks")
        st.wrap(mod, "tenant_of_request", "tenant")
        st.wrap(mod, "make_plan", "blend plan")
        st.wrap(mod, "attach", "blend plan")
    st.wrap(serving_patch, "_passes", "pass-through test")
    st.wrap(serving_patch, "read_args", "read arguments")
    st.wrap(serving_patch, "bind_args", "read arguments")
    st.wrap(serving_patch, "settle", "accept (dedup commit, counters)")
    st.wrap(pl, "namespace_of", "rewrite: namespace key")
    st.wrap(ContextIndex, "best_order", "rewrite: index lookup")
    st.wrap(ContextIndex, "record", "stage: index record")
    st.wrap(staging.token_ratio, "observe", "stage: tokenizer ratio")
    st.wrap(staging, "merged", "stage: hints")
    st.wrap(pl.ContextPipeline, "prepare", "rewrite: prepare (order, dedup, render)")
    st.wrap(pl.ContextPipeline, "rewrite_messages", "rewrite: total")
    st.wrap(staging, "stage", "stage: total")


def _run(reqs: list, serving: _Serving, gate: Callable, st: Stages | None = None,
         profile: cProfile.Profile | None = None) -> dict[str, list[dict]]:
    """Each request through the wrapper, then its engine request through the gate."""
    from cp_engine.hooks.vllm import chat_rewrite, completion_rewrite

    # The wrappers the patch table installs (an unmarked request skips the rewrite).
    chat, completion = chat_rewrite.wrapper, completion_rewrite.wrapper
    bare_chat, bare_cmpl = _Serving.create_chat_completion, _Serving.create_completion
    out: dict[str, list[dict]] = {k: [] for k in KINDS}

    async def drive() -> None:
        for kind, request, raw in reqs:
            wrapper, bare = (completion, bare_cmpl) if kind == "completion" else (chat, bare_chat)
            method = bare.__get__(serving)
            t0 = CLOCK()
            await method(request, raw)
            t1 = CLOCK()
            if st is not None:
                st.current = {}
            t2 = CLOCK()
            await wrapper(method, serving, (request,), {"raw_request": raw})
            t3 = CLOCK()
            gate(serving, _EngineRequest(getattr(request, "vllm_xargs", None)))
            t4 = CLOCK()
            row = {"plugin_ns": (t3 - t2) - (t1 - t0), "gate_ns": t4 - t3}
            if st is not None:
                row["stages"] = st.current
            out[kind].append(row)

    if profile is not None:
        profile.enable()
    try:
        asyncio.run(drive())
    finally:
        if profile is not None:
            profile.disable()
    return out


def _evict_cost(n: int = 2000) -> float:
    """µs to apply one ``evict_path`` message (the receiver thread's work per eviction)."""
    from cp_engine.hooks import channel, runtime

    pipe = runtime.pipeline()
    apply = channel.apply_to_pipeline(pipe)
    index = pipe.unwrapped.index
    paths = [p for ns in (f"ns{i}" for i in range(50)) for p in ((ns, q) for q in index.paths(ns)[:40])]
    rng = random.Random(3)
    msgs = [{"op": "evict_path", "ns": ns, "path": [int(b) & 0xFFFFFFFFFFFFFFFF for b in p[:rng.randint(1, len(p))]]}
            for ns, p in rng.sample(paths, min(n, len(paths)))] or [{"op": "evict_path", "ns": "x", "path": [1]}]
    t = CLOCK()
    for m in msgs:
        apply(m)
    return (CLOCK() - t) / len(msgs) / 1000


def _send_evictions(instance: str, runtime_dir: str, msgs: list[dict], per_request: int, rate: float,
                    ready: Any, go: Any) -> None:
    """EngineCore's side of ``_receiver_cost`` (a spawned process): once ``go`` is set,
    ``msgs`` as evict_path messages, ``per_request`` at a time (one request's
    allocation) at ``rate`` requests a second."""
    import os

    os.environ["XDG_RUNTIME_DIR"] = runtime_dir
    from cp_engine.hooks import channel

    sender = channel.Sender(instance)
    ready.set()
    go.wait()
    t = time.monotonic()
    for i in range(0, len(msgs), per_request):
        for m in msgs[i:i + per_request]:
            sender.send({"op": "evict_path", "ns": m["ns"], "path": channel.hex_ids(m["path"])})
        t += 1.0 / rate
        time.sleep(max(0.0, t - time.monotonic()))
    sender.close()


def _receiver_cost(seconds: float, gap_ms: int, rate: float = 12.0, per_request: int = 3) -> dict:
    """The API server's receiver thread under the soak's eviction traffic: its CPU time
    (the thread's own clock) per eviction message and per request, over a real ipc
    socket from another process. ``per_request`` evict_path messages per request at
    ``rate`` requests a second is what EngineCore sent in the live soak (64 clients,
    40 KV blocks: ~2.7 evictions per request at ~12 requests a second)."""
    import multiprocessing
    import os
    import secrets
    import shutil
    import tempfile

    from cp_engine.hooks import channel, runtime

    pipe = runtime.pipeline()
    index = pipe.unwrapped.index
    rng = random.Random(4)
    paths = [(ns, q) for ns in (f"ns{i}" for i in range(50)) for q in index.paths(ns)[:40]] or [("x", [1])]
    n = max(per_request, int(seconds * rate) * per_request)
    msgs = [{"ns": ns, "path": [int(b) & 0xFFFFFFFFFFFFFFFF for b in p[:rng.randint(1, len(p))]]}
            for ns, p in (rng.choice(paths) for _ in range(n))]
    runtime_dir = tempfile.mkdtemp(prefix="cpov", dir="/tmp")  # short: ipc paths are limited
    old = os.environ.get("XDG_RUNTIME_DIR")
    os.environ["XDG_RUNTIME_DIR"] = runtime_dir
    instance = f"ovh-{secrets.token_hex(4)}"
    recv = channel.Receiver(instance, channel.apply_to_pipeline(pipe), gap_ms=gap_ms).start()
    try:
        channel._local_receivers.pop(instance, None)  # over the socket, as from EngineCore
        clock = time.pthread_getcpuclockid(recv._thread.ident)
        ctx = multiprocessing.get_context("spawn")
        ready, go = ctx.Event(), ctx.Event()
        proc = ctx.Process(target=_send_evictions, args=(instance, runtime_dir, msgs, per_request, rate, ready, go))
        proc.start()
        ready.wait(120)  # the spawned interpreter's start-up is not timed
        c0, t0 = time.clock_gettime(clock), time.monotonic()
        go.set()
        proc.join()
        deadline = time.monotonic() + 10 + gap_ms / 1000
        while recv.received < len(msgs) and time.monotonic() < deadline:
            time.sleep(0.01)
        c1, t1 = time.clock_gettime(clock), time.monotonic()
    finally:
        recv.stop()
        shutil.rmtree(runtime_dir, ignore_errors=True)
        if old is None:
            os.environ.pop("XDG_RUNTIME_DIR", None)
        else:
            os.environ["XDG_RUNTIME_DIR"] = old
    return {"gap_ms": gap_ms, "messages": len(msgs), "received": recv.received, "wakeups": recv.wakeups,
            "thread_cpu_s": round(c1 - c0, 4), "wall_s": round(t1 - t0, 3)}


def _us(xs: list[int]) -> float:
    return round(statistics.median(xs) / 1000, 1) if xs else 0.0


def measure(indexed: int, n: int, tokenizer: Any, model: str, profile: bool, receiver_s: float = 0.0) -> dict:
    from cp_engine.hooks import runtime
    from cp_engine.hooks.vllm.blend_spans import process_inputs_wrapper

    def gate(serving: Any, request: _EngineRequest) -> None:  # the row's wrapper around an identity
        process_inputs_wrapper(lambda r: r, serving, (request,), {})
    _setup(indexed)
    serving = _Serving(tokenizer)
    pipe = runtime.pipeline().unwrapped
    _run(_requests(n // 5, model, "warm-"), serving, gate)  # tokenizer, caches
    rows = _run(_requests(n, model, "timed-"), serving, gate)
    st = Stages()
    _install_stage_timers(st)
    try:
        staged = _run(_requests(n, model, "staged-"), serving, gate, st)
    finally:
        st.undo()
    prof_text = None
    if profile:
        prof = cProfile.Profile()
        _run(_requests(n, model, "profiled-"), serving, gate, profile=prof)
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf)
        stats.sort_stats("tottime").print_stats(30)
        stats.sort_stats("cumulative").print_stats(45)
        prof_text = buf.getvalue()
    failures = _failures()
    if any(failures.values()):
        raise RuntimeError(f"hooks failed or were skipped during the run: {failures}")
    result: dict[str, Any] = {"indexed": indexed, "index_requests": pipe.index.requests,
                              "index_nodes": len(pipe.index), "requests": n, "kinds": {}}
    for kind in KINDS:
        if not rows[kind]:
            continue
        stages: dict[str, list[int]] = {}
        for r in staged[kind]:
            for k, v in r["stages"].items():
                stages.setdefault(k, []).append(v)
        result["kinds"][kind] = {
            "n": len(rows[kind]), "plugin_us_p50": _us([r["plugin_ns"] for r in rows[kind]]),
            "plugin_us_mean": round(statistics.fmean(r["plugin_ns"] for r in rows[kind]) / 1000, 1),
            "plugin_us_p90": round(sorted(r["plugin_ns"] for r in rows[kind])[int(0.9 * len(rows[kind]))] / 1000, 1),
            "gate_us_p50": _us([r["gate_ns"] for r in rows[kind]]),
            # Median over the requests the stage ran in, and the share of requests it ran in.
            "stages_us_p50": {k: _us(v) for k, v in sorted(stages.items())},
            "stages_share": {k: round(len(v) / len(staged[kind]), 3) for k, v in sorted(stages.items())},
        }
    result["evict_apply_us"] = round(_evict_cost(), 1)
    if receiver_s > 0:
        from cp_engine.hooks.channel import DEFAULT_GAP_MS

        # Without batching (a wake-up per message or burst), then with the default window.
        result["receiver"] = [_receiver_cost(receiver_s, gap) for gap in (0, DEFAULT_GAP_MS)]
    if prof_text:
        result["cprofile_top"] = prof_text
    return result


def _tokenizer() -> tuple[Any, str]:
    from transformers import AutoTokenizer

    from cp_engine.devtools.vllm_server import tiny_model_dir

    model = tiny_model_dir()
    return AutoTokenizer.from_pretrained(model), model


def table(data: dict) -> str:
    out = [f"## Plugin CPU time per request in the API server (engine-free, {data['requests']} requests "
           "per size, soak mix)", ""] + ([f"Note: {data['note']}", ""] if data.get("note") else []) + [
           "| indexed requests | index nodes | kind | n | plugin µs p50 | mean | p90 | request_gate µs p50 |",
           "|---|---|---|---|---|---|---|---|"]
    for run in data["runs"]:
        for kind, k in run["kinds"].items():
            out.append(f"| {run['indexed']:,} | {run['index_nodes']:,} | {kind} | {k['n']} | {k['plugin_us_p50']} | "
                       f"{k['plugin_us_mean']} | {k['plugin_us_p90']} | {k['gate_us_p50']} |")
    out += ["", "Applying one eviction message (receiver thread): " +
            ", ".join(f"{r['evict_apply_us']} µs at {r['indexed']:,}" for r in data["runs"]) + "."]
    recv_rows = [(r["indexed"], x) for r in data["runs"] for x in r.get("receiver", [])]
    if recv_rows:
        out += ["", "The receiver thread under the soak's eviction traffic (3 evict_path messages per request, "
                    "12 requests a second, over ipc from another process; the thread's own CPU clock, idle polls "
                    "included). Gap 0 is the thread without batching; the other row has the default window. An idle "
                    "poll of `none` means the thread sleeps until a message or a wake-up byte arrives:", "",
                "| indexed requests | gap (ms) | idle poll (ms) | messages | wake-ups with messages | "
                "thread CPU µs / message | µs / request |", "|---|---|---|---|---|---|---|"]
        for size, x in recv_rows:
            per_msg = 1e6 * x["thread_cpu_s"] / max(1, x["received"])
            out.append(f"| {size:,} | {x['gap_ms']} | {x.get('idle_poll_ms', 'none')} | {x['received']} | "
                       f"{x['wakeups']} | {per_msg:.1f} | {3 * per_msg:.0f} |")
    out += ["",
            "Stage breakdown: median µs over the requests a stage ran in (wall clock around the "
            "stage's function; the share of requests it ran in when not all). Stages nest: "
            "`rewrite: total` holds the other `rewrite:` rows, `stage: total` the other `stage:` rows; "
            "every request's arguments are read and tested first (`read arguments`, `pass-through test`).", ""]
    kinds = [k for k in KINDS if any(k in r["kinds"] for r in data["runs"])]
    head = [f"{r['indexed']:,} {k}" for r in data["runs"] for k in kinds if k in r["kinds"]]
    out += ["| stage | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    names = sorted({s for r in data["runs"] for k in r["kinds"].values() for s in k["stages_us_p50"]})

    def cell(k: dict, s: str) -> str:
        if s not in k["stages_us_p50"]:
            return "–"
        share = k["stages_share"][s]
        return f"{k['stages_us_p50'][s]}" + (f" ({100 * share:.0f} %)" if share < 1 else "")

    for s in names:
        cells = [cell(r["kinds"][k], s) for r in data["runs"] for k in kinds if k in r["kinds"]]
        out.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot(data: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    kinds = [k for k in KINDS if any(k in r["kinds"] for r in data["runs"])]
    width = 0.8 / max(1, len(data["runs"]))
    for j, run in enumerate(data["runs"]):
        ax.bar([i + j * width for i in range(len(kinds))], [run["kinds"][k]["plugin_us_p50"] for k in kinds],
               width, label=f"{run['indexed']:,} indexed")
    ax.set_xticks([i + width * (len(data["runs"]) - 1) / 2 for i in range(len(kinds))], kinds)
    ax.set_ylabel("plugin CPU µs per request (p50)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1k indexed, 500 requests: overhead_micro_quick")
    ap.add_argument("--indexed", default=None, help="comma-separated index sizes (default 1000,100000)")
    ap.add_argument("--requests", type=int, default=None, help="timed requests per size (default 3000)")
    ap.add_argument("--profile", action="store_true", help="add cProfile's top functions to the JSON")
    ap.add_argument("--out", help="result name or .json path")
    ap.add_argument("--note", help="a line stored with the result (e.g. what a baseline run measured)")
    ap.add_argument("--receiver-seconds", type=float, default=None,
                    help="seconds of eviction traffic per receiver setting (default 8, 2 with --quick; 0: skip)")
    args = ap.parse_args(argv)
    from cp_engine.hooks import runtime

    prov = provenance("benchmarks.micro.overhead", argv)
    sizes = [int(x) for x in (args.indexed or ("1000" if args.quick else "1000,100000")).split(",")]
    n = args.requests or (500 if args.quick else 3000)
    tokenizer, model = _tokenizer()
    data: dict[str, Any] = {"requests": n, "runs": []}
    if args.note:
        data["note"] = args.note
    for size in sizes:
        try:
            run = measure(size, n, tokenizer, model, args.profile,
                          args.receiver_seconds if args.receiver_seconds is not None else (2.0 if args.quick else 8.0))
        finally:
            runtime.reset_for_tests()  # the process-wide pipeline and config were this run's
        data["runs"].append(run)
        print(f"indexed {size}: " + ", ".join(f"{k} {v['plugin_us_p50']} µs" for k, v in run["kinds"].items()),
              file=sys.stderr, flush=True)
        if run.get("cprofile_top"):
            print(run["cprofile_top"], file=sys.stderr)
    write_result(args.out or ("overhead_micro_quick" if args.quick else "overhead_micro"), data,
                 table=table, plot=plot, prov=prov)
    return 0


if __name__ == "__main__":
    sys.exit(main())
