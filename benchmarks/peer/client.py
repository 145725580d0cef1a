"""Run the peer's batch plan in its own venv (benchmarks/peer/run_peer.py), cached on disk.

``peer_plan(contexts)`` returns the dict written by run_peer.py (``contexts``, ``order``,
``seconds``, ``peak_rss_mb``, ...), or None with a printed reason when the peer venv
is missing or the run fails. Results are cached in benchmarks/.cache/peer_<digest>.json
keyed by the workload's content hash, so a rerun does not repeat a 4.5-minute plan.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common.workloads import CACHE, contexts_digest

HERE = Path(__file__).resolve().parent
PEER_PY = HERE.parent / ".peer-venv" / "bin" / "python"
RUNNER = HERE / "run_peer.py"
SETUP_HINT = "bash benchmarks/peer/setup_peer.sh"


def peer_available() -> bool:
    return PEER_PY.exists()


def cache_path(contexts) -> Path:
    return CACHE / f"peer_{contexts_digest(contexts)}.json"


def cached_plan(contexts) -> dict | None:
    path = cache_path(contexts)
    if path.exists():
        try:
            return json.loads(path.read_text()) | {"cached": True}
        except ValueError:
            return None
    return None


def peer_plan(contexts, timeout: float = 1800, use_cache: bool = True) -> dict | None:
    if use_cache and (hit := cached_plan(contexts)) is not None:
        return hit
    if not peer_available():
        print(f"[peer] skipped: no peer venv ({SETUP_HINT} creates it)", file=sys.stderr)
        return None
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        src, dst = Path(tmp) / "in.json", Path(tmp) / "out.json"
        src.write_text(json.dumps(contexts))
        try:
            proc = subprocess.run(
                [str(PEER_PY), str(RUNNER), str(src), str(dst)],
                capture_output=True, text=True, timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            print(f"[peer] timed out after {timeout:.0f} s", file=sys.stderr)
            return None
        if proc.returncode != 0 or not dst.exists():
            tail = (proc.stderr or "").strip().splitlines()[-5:]
            print(f"[peer] failed (rc={proc.returncode}): " + " | ".join(tail), file=sys.stderr)
            return None
        result = json.loads(dst.read_text())
    _check(result, contexts)
    cache_path(contexts).write_text(json.dumps(result))
    return result | {"cached": False}


def _check(result: dict, contexts) -> None:
    """The peer's plan must be a valid plan of these requests, or its numbers mean nothing."""
    n = len(contexts)
    if sorted(result["order"]) != list(range(n)):
        raise ValueError("peer order is not a permutation of the requests")
    for i, ctx in enumerate(result["contexts"]):
        if ctx is None or sorted(ctx) != sorted(contexts[i]):
            raise ValueError(f"peer context {i} is not a permutation of request {i}")
