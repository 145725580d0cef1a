"""The proxy's own counters, served as Prometheus text on ``GET /cp_engine/metrics``.

Contract: ``ProxyCounters`` counts what the proxy did with each request it handled
(one outcome each: rewritten, passed through, rewrite failed, or answered by the
proxy itself with an error status) plus upstream failures and rewrites the upstream
refused; the event loop is its only writer, so it takes no lock.
``render(counters, index, in_flight)`` gives the text exposition format (version
0.0.4): counters as ``cp_engine_proxy_<name>_total``, the context index's current
size and bound and the requests in flight as gauges. Every family is always present
(zero before the first request), so a scraper sees the full set at once.
"""
from __future__ import annotations

from collections import Counter

from cp_engine.index import ContextIndex

__all__ = ["CONTENT_TYPE", "ProxyCounters", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# name -> help; each is a counter exported as cp_engine_proxy_<name>_total.
COUNTERS = {
    "requests_rewritten": "Marked requests rewritten by the proxy and forwarded.",
    "requests_passed_through": "Requests forwarded byte-identical (unmarked, other routes, not JSON).",
    "requests_rewrite_failed": "Marked requests whose rewrite failed; their blocks went out plainly.",
    "requests_rejected": "Requests the proxy answered itself with an error, by status (400, 413, 503).",
    "upstream_errors": "Upstream failures answered 502/504 or ended mid-answer, by status.",
    "rewrites_rolled_back": "Rewritten requests not committed to the index: the upstream refused or "
                            "failed them, or the client left before an answer.",
}
# Counters broken down by a ``status`` label.
_BY_STATUS = ("requests_rejected", "upstream_errors")


class ProxyCounters:
    def __init__(self) -> None:
        self._plain: Counter[str] = Counter()
        self._by_status: dict[str, Counter[int]] = {name: Counter() for name in _BY_STATUS}

    def inc(self, name: str, status: int | None = None) -> None:
        if name not in COUNTERS:
            raise KeyError(f"unknown proxy counter {name!r}")
        if name in self._by_status:
            if status is None:
                raise ValueError(f"{name} is counted by status")
            self._by_status[name][status] += 1
        else:
            self._plain[name] += 1

    def value(self, name: str, status: int | None = None) -> int:
        if name in self._by_status:
            counts = self._by_status[name]
            return counts[status] if status is not None else sum(counts.values())
        return self._plain[name]

    def statuses(self, name: str) -> list[tuple[int, int]]:
        """``(status, count)`` pairs of a counter kept by status, by status."""
        return sorted(self._by_status[name].items())


def _family(lines: list[str], name: str, kind: str, help_text: str) -> None:
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} {kind}")


def render(counters: ProxyCounters, index: ContextIndex, in_flight: int) -> str:
    lines: list[str] = []
    for name, help_text in COUNTERS.items():
        metric = f"cp_engine_proxy_{name}"
        _family(lines, metric, "counter", help_text)
        if name in _BY_STATUS:
            for status, n in counters.statuses(name):
                lines.append(f'{metric}_total{{status="{status}"}} {n}')
        else:
            lines.append(f"{metric}_total {counters.value(name)}")
    gauges = (
        ("index_requests", "Request paths held by the proxy's context index.", index.requests),
        ("index_tokens", "Estimated block tokens the context index spans (each block once).", index.tokens),
        ("index_max_tokens", "The index's bound, --upstream-cache-tokens.", index.max_tokens or 0),
        ("in_flight", "Requests the proxy is handling now (this scrape included).", in_flight),
    )
    for name, help_text, value in gauges:
        _family(lines, f"cp_engine_proxy_{name}", "gauge", help_text)
        lines.append(f"cp_engine_proxy_{name} {value}")
    return "\n".join(lines) + "\n"
