"""Talking to a live vLLM server for the blend benchmarks: token-id prompts with exact
block spans, and exact token counts from ``/metrics`` deltas.

Contract:
- ``counters(text)`` reads the Prometheus text of ``/metrics`` into the counters the
  benchmarks need (``COUNTERS``: vLLM's prompt tokens by source, prefill time, and every
  ``cp_engine_blend_*`` counter), summing over label sets and accepting names with or
  without Prometheus' ``_total`` suffix; ``delta(before, after)`` subtracts two reads;
  ``computed_tokens(d)`` = vLLM's ``local_compute`` prompt tokens + the connector's
  ``cp_engine_blend_recomputed_tokens_total`` (docs/blend-design.md, "Counting").
- ``TokenRequest``: token ids, optional ``[start, end)`` spans (sent as
  ``vllm_xargs.cp_spans``), a ``cache_salt`` and the caller's tag. ``send_batch`` posts
  them to ``/v1/completions`` with N threads in list order, greedy, and returns one
  ``Completion`` per request in input order; an HTTP error raises with the body.
- ``span_xargs(spans, fmt)`` is the wire form: ``"pairs"`` ``[[s, e], ...]`` (the hint's
  contract, ``cp_engine.request_hints.read_spans``) or ``"flat"`` ``[s0, e0, s1, e1, ...]``
  (vLLM's own ``vllm_xargs`` type admits only lists of scalars; ``read_spans`` reads both).
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

import requests

from cp_engine.devtools.vllm_server import parse_metrics

# logical name -> (metric base name without _total, required labels)
COUNTERS = {
    "prompt": ("vllm:prompt_tokens", {}),
    "local_compute": ("vllm:prompt_tokens_by_source", {"source": "local_compute"}),
    "local_cache_hit": ("vllm:prompt_tokens_by_source", {"source": "local_cache_hit"}),
    "external": ("vllm:prompt_tokens_by_source", {"source": "external_kv_transfer"}),
    "prefill_s": ("vllm:request_prefill_time_seconds_sum", {}),
    "requests_prefill": ("vllm:request_prefill_time_seconds_count", {}),
    "blend_recomputed": ("cp_engine_blend_recomputed_tokens", {}),
    "blend_reused": ("cp_engine_blend_reused_tokens", {}),
    "blend_stored": ("cp_engine_blend_stored_tokens", {}),
    "blend_hits": ("cp_engine_blend_hits", {}),
    "blend_misses": ("cp_engine_blend_misses", {}),
    "blend_evictions": ("cp_engine_blend_evictions", {}),
    "blend_load_failures": ("cp_engine_blend_load_failures", {}),
}
BLEND_PREFIX = "cp_engine_blend_"


def served_model(model: str | None, quick: bool) -> str:
    """The model folder to serve: ``model`` if given, else the tiny test model for a
    quick run, else Qwen2.5-0.5B from the offline wheel (built on first use)."""
    if model:
        return model
    if quick:
        from cp_engine.devtools.vllm_server import tiny_model_dir

        return tiny_model_dir()
    from benchmarks.quality.models import model_dir

    return model_dir("qwen0.5b")


def _base(key: str) -> tuple[str, str]:
    name, _, labels = key.partition("{")
    if name.endswith("_total"):
        name = name[: -len("_total")]
    return name, labels


def counters(text: str) -> dict[str, float]:
    """The ``COUNTERS`` (0 when absent) plus every ``cp_engine_blend_*`` sample summed by
    base name (under ``blend:<name>``), from one ``/metrics`` text."""
    samples = parse_metrics(text)
    out = {k: 0.0 for k in COUNTERS}
    for key, value in samples.items():
        name, labels = _base(key)
        for logical, (want, need) in COUNTERS.items():
            if name == want and all(f'{k}="{v}"' in labels for k, v in need.items()):
                out[logical] += value
        if name.startswith(BLEND_PREFIX):
            out["blend:" + name] = out.get("blend:" + name, 0.0) + value
    return out


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    keys = set(before) | set(after)
    return {k: round(after.get(k, 0.0) - before.get(k, 0.0), 6) for k in sorted(keys)}


def computed_tokens(d: dict[str, float]) -> float:
    """Prompt tokens the server computed: vLLM's uncached + blend's recomputed."""
    return d.get("local_compute", 0.0) + d.get("blend_recomputed", 0.0)


def span_xargs(spans: Sequence[tuple[int, int]], fmt: str = "pairs") -> list:
    if fmt == "pairs":
        return [[int(s), int(e)] for s, e in spans]
    if fmt == "flat":
        return [int(x) for s, e in spans for x in (s, e)]
    raise ValueError(f"span format must be pairs or flat, not {fmt!r}")


@dataclass
class TokenRequest:
    ids: list[int]
    spans: list[tuple[int, int]] | None = None
    salt: str | None = None
    tag: Any = None
    xargs: dict = field(default_factory=dict)


@dataclass
class Completion:
    tag: Any
    text: str
    prompt_tokens: int
    cached_tokens: int
    latency_s: float


class Server:
    """A running server: its URL (no ``/v1``) and the model id it serves."""

    def __init__(self, url: str, model: str, span_format: str = "pairs"):
        self.url, self.model, self.span_format = url.rstrip("/"), model, span_format

    def metrics_text(self) -> str:
        r = requests.get(self.url + "/metrics", timeout=60)
        r.raise_for_status()
        return r.text

    def counters(self) -> dict[str, float]:
        return counters(self.metrics_text())

    def alive(self) -> bool:
        """Whether the server still answers ``/health`` with 200."""
        try:
            return requests.get(self.url + "/health", timeout=30).status_code == 200
        except requests.RequestException:
            return False

    def reset(self) -> None:
        """Empty vLLM's prefix cache and ask the KV connector to drop its own cache
        (``reset_external``; needs ``VLLM_SERVER_DEV_MODE=1``)."""
        last = None
        for _ in range(40):
            last = requests.post(self.url + "/reset_prefix_cache", params={"reset_external": "true"}, timeout=120)
            if last.status_code == 200:
                return
            time.sleep(0.5)  # refused while requests still hold blocks
        raise RuntimeError(f"could not reset the caches: {last.status_code} {last.text[:300]}")

    def body(self, req: TokenRequest, max_tokens: int) -> dict:
        body: dict = {"model": self.model, "prompt": list(req.ids), "max_tokens": max_tokens, "temperature": 0.0}
        xargs = dict(req.xargs)
        if req.spans:
            xargs["cp_spans"] = span_xargs(req.spans, self.span_format)
        if xargs:
            body["vllm_xargs"] = xargs
        if req.salt:
            body["cache_salt"] = req.salt
        return body

    def complete(self, req: TokenRequest, max_tokens: int, session: requests.Session | None = None) -> Completion:
        t0 = time.perf_counter()
        r = (session or requests).post(self.url + "/v1/completions", json=self.body(req, max_tokens), timeout=3600)
        if r.status_code != 200:
            raise RuntimeError(f"completion failed with {r.status_code}: {r.text[:500]}")
        doc = r.json()
        usage = doc.get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}
        return Completion(req.tag, doc["choices"][0].get("text") or "", int(usage.get("prompt_tokens") or 0),
                          int(details.get("cached_tokens") or 0), time.perf_counter() - t0)

    def send_batch(self, reqs: Sequence[TokenRequest], max_tokens: int, concurrency: int) -> list[Completion]:
        local = threading.local()

        def one(req: TokenRequest) -> Completion:
            if not hasattr(local, "s"):
                local.s = requests.Session()
            return self.complete(req, max_tokens, local.s)

        if concurrency <= 1:
            return [one(r) for r in reqs]
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            return list(pool.map(one, reqs))

    def probe_span_format(self, ids: Sequence[int]) -> str:
        """The span wire form this server's API accepts: ``pairs`` if it validates, else
        ``flat`` (vLLM's unpatched ``vllm_xargs`` type refuses nested lists)."""
        probe = TokenRequest(list(ids), [(0, min(2, len(ids) - 1) or 1)], salt="cp-bench-probe")
        for fmt in ("pairs", "flat"):
            self.span_format = fmt
            try:
                self.complete(probe, 1)
                return fmt
            except RuntimeError as exc:
                if "vllm_xargs" not in str(exc) and "cp_spans" not in str(exc):
                    raise
        raise RuntimeError("the server accepts neither span wire form")
