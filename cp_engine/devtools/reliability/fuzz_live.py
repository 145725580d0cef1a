"""Bounded request fuzzer against a live server on 127.0.0.1 (command line:
``python -m benchmarks.reliability.fuzz_live``).

``run`` sends ``n`` payloads from ``payloads.py`` (seeded) with ``workers``
concurrent clients, and checks: no "crash" (every answer is a 200
with choices or a 4xx JSON error; a 5xx, a non-JSON body or a dropped connection is a
crash), ``/health`` answers 200 every ``health_every`` payloads and at the end, and
the index view (``/cp_engine/index``, when served) reports no broken invariant and at
most ``max_nodes`` nodes. ``summary["ok"]`` only when all of that holds.
"""
from __future__ import annotations

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
