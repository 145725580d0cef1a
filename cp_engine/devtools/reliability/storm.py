"""Eviction storm: a KV cache of a few dozen blocks, many overlapping
requests, and after every request a check of the index against the engine.

Command line: ``python -m benchmarks.reliability.storm --n 1000``.

Each request is a ``/v1/completions`` call with 3-5 context blocks drawn from a pool of
``POOL`` documents (~300 tokens each, so one request fills a third of the 40-block
cache and every few requests evict earlier ones). Requests go one at a time, so each
check sees a settled engine:

1. before request ``i`` the index view (``/cp_engine/index``) gives the indexed paths;
   the plugin renders the blocks (``echo`` shows the order) and the *claim* is the
   longest rendered prefix the index held, in blocks and in real tokens (``/tokenize``
   of the echoed prompt up to the end of the last claimed block);
2. the engine's answer is ``cached_tokens`` (vLLM's prefix-cache hit for that very
   request). A claim is *stale* when the engine reused fewer tokens than the claim's
   full KV blocks: ``deficit = floor(claim_tokens / 128) * 128 - cached_tokens``;
3. the view's invariants (no negative reference count, no unowned or leaked node,
   no child with more references than its parent) hold after every request.

Staleness bound (documented in ``docs/reliability.md``): ``deficit <= STALE_BOUND``
(one KV block). Evictions arrive asynchronously but within the same engine step that
caused them, before the next request; what remains is attribution at block
granularity with estimated token ends (``cp_ends``): an evicted KV block that
straddles two context blocks is charged to the later one.
"""
from __future__ import annotations

import random
import sys
import time
from typing import Any

import requests

from cp_engine.blocks import block_id

KV_BLOCK = 128
STALE_BOUND = KV_BLOCK
POOL = 14
INVARIANTS = ("refs_negative", "unowned", "child_over_parent", "unreachable")
_VOCAB = ("river", "stone", "lamp", "orbit", "cedar", "violet", "harbor", "signal", "meadow", "copper",
          "glacier", "lantern", "quartz", "willow", "ember", "falcon", "prairie")


def documents(seed: int, n: int = POOL, words: int = 110) -> list[str]:
    rng = random.Random(seed)
    return [f"Storm document {seed}-{d}: " + " ".join(rng.choice(_VOCAB) + str(rng.randrange(100)) for _ in range(words))
            for d in range(n)]


def _hex(text: str) -> str:
    return format(block_id(text) & 0xFFFFFFFFFFFFFFFF, "016x")


def claimed(paths: list[list[str]], rendered: list[str]) -> int:
    """Leading blocks of ``rendered`` (hex ids) that the indexed ``paths`` hold."""
    best = 0
    for path in paths:
        k = 0
        while k < len(path) and k < len(rendered) and path[k] == rendered[k]:
            k += 1
        best = max(best, k)
    return best


def _view(session: requests.Session, url: str) -> dict:
    r = session.get(url + "/cp_engine/index", timeout=30)
    r.raise_for_status()
    return r.json()


def _tokens(session: requests.Session, url: str, model: str, text: str) -> int:
    r = session.post(url + "/tokenize", json={"model": model, "prompt": text}, timeout=30)
    r.raise_for_status()
    return int(r.json()["count"])


def run_storm(url: str, model: str, n: int, seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Send ``n`` requests one at a time, checking after each; returns the summary."""
    rng = random.Random(seed)
    docs = documents(seed)
    session = requests.Session()
    rows: list[dict] = []
    broken: list[dict] = []
    errors = 0
    t0 = time.monotonic()
    view = _view(session, url)
    for i in range(n):
        # Overlapping sets: a few "hot" documents recur so claims are frequent.
        k = rng.randint(3, 5)
        chosen = rng.sample(docs[:6], 2) + rng.sample(docs[6:], k - 2) if rng.random() < 0.7 else rng.sample(docs, k)
        rng.shuffle(chosen)
        paths = view.get("paths", {}).get("completion", [])
        body = {"model": model, "prompt": f"Question {i}: which document mentions a harbor?", "max_tokens": 1,
                "temperature": 0.0, "echo": True, "context_blocks": chosen}
        r = session.post(url + "/v1/completions", json=body, timeout=300)
        if r.status_code != 200:
            errors += 1
            rows.append({"i": i, "status": r.status_code})
            view = _view(session, url)
            continue
        j = r.json()
        echoed = j["choices"][0]["text"]
        pos = {d: echoed.find(d) for d in chosen}
        order = sorted(chosen, key=pos.__getitem__)
        rendered = [_hex(d) for d in order]
        claim = claimed(paths, rendered)
        cached = int((j["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        claim_tokens = deficit = 0
        if claim:
            last = order[claim - 1]
            claim_tokens = _tokens(session, url, model, echoed[: pos[last] + len(last)])
            deficit = max(0, (claim_tokens // KV_BLOCK) * KV_BLOCK - cached)
        view = _view(session, url)
        bad = {k2: view[k2] for k2 in INVARIANTS if view[k2] != 0}
        if view["nodes"] > view["max_nodes"]:
            bad["nodes_over_limit"] = view["nodes"]
        if bad:
            broken.append({"i": i, **bad})
        rows.append({"i": i, "claim_blocks": claim, "claim_tokens": claim_tokens, "cached": cached,
                     "deficit": deficit, "prompt_tokens": j["usage"]["prompt_tokens"], "nodes": view["nodes"],
                     "refs_min": view["refs_min"]})
        if progress and (i + 1) % 100 == 0:
            print(f"{i + 1}/{n} {time.monotonic() - t0:.0f}s", file=sys.stderr, flush=True)
    ok_rows = [r for r in rows if "deficit" in r]
    deficits = [r["deficit"] for r in ok_rows]
    claims = [r for r in ok_rows if r["claim_blocks"]]
    metrics = requests.get(url + "/metrics", timeout=30).text
    summary = {
        "requests": n, "seed": seed, "errors": errors, "elapsed_s": round(time.monotonic() - t0, 1),
        "claims": len(claims), "claimed_tokens_total": sum(r["claim_tokens"] for r in claims),
        "cached_tokens_total": sum(r["cached"] for r in ok_rows),
        "stale_claims": sum(1 for d in deficits if d > 0),
        "max_deficit_tokens": max(deficits, default=0), "stale_bound_tokens": STALE_BOUND,
        "over_bound": [r for r in ok_rows if r["deficit"] > STALE_BOUND][:20],
        "invariant_violations": broken[:20], "invariant_violation_count": len(broken),
        "max_nodes_seen": max((r["nodes"] for r in ok_rows), default=0),
        "min_refs_seen": min((r["refs_min"] for r in ok_rows), default=0),
        "evictions_applied": _metric(metrics, "cp_engine_evictions_applied_total"),
        "evicted_nodes": view.get("evicted_nodes"),
    }
    summary["ok"] = (errors == 0 and not broken and not summary["over_bound"]
                     and summary["evictions_applied"] > 0 and summary["claims"] > 0)
    return summary


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            try:
                total += float(line.rsplit(" ", 1)[1])
            except ValueError:
                pass
    return total
