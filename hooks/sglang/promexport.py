"""cp_engine counters on SGLang's own ``/metrics``.

SGLang serves ``/metrics`` from a private ``CollectorRegistry`` holding only a
multiprocess collector (``sglang.srt.utils.common.add_prometheus_middleware``), so a
collector on prometheus_client's default registry is not shown there. With metrics
enabled, ``swap_metrics_route`` (row ``metrics_route`` of ``hooks/sglang/table.py``)
swaps the app behind the ``/metrics`` mount of SGLang's FastAPI app for one serving a
registry with the same multiprocess collector plus cp_engine's families
(``hooks.metrics``), and its undo puts SGLang's app back. Idempotent; without
``--enable-metrics`` there is no mount and nothing changes.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

from .. import metrics

__all__ = ["attach_to_server", "swap_metrics_route", "CpEngineFamilies"]

_MARK = "_cp_engine_original_app"  # on the route while swapped: SGLang's own app


class CpEngineFamilies:
    """Collector yielding only the ``cp_engine_*`` families of the default registry."""

    def collect(self):
        from prometheus_client import REGISTRY

        for fam in REGISTRY.collect():
            if fam.name.startswith("cp_engine_"):
                yield fam

    def describe(self):
        return []


def swap_metrics_route(app: Any) -> Callable[[], None] | None:
    """Row ``metrics_route``: serve SGLang's multiprocess collector plus cp_engine's
    families behind ``app``'s ``/metrics`` mount; returns the undo (the original app
    back), None when there is no mount (metrics off)."""
    from prometheus_client import CollectorRegistry, make_asgi_app, multiprocess

    for route in list(getattr(app, "routes", [])):
        if getattr(route, "path", None) != "/metrics" or not hasattr(route, "app"):
            continue
        original = getattr(route, _MARK, None)
        if original is None:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # what SGLang serves
            registry.register(CpEngineFamilies())
            original = route.app
            route.app = make_asgi_app(registry=registry)
            setattr(route, _MARK, original)

        def undo(route: Any = route) -> None:
            first = getattr(route, _MARK, None)
            if first is not None:
                route.app = first
                delattr(route, _MARK)

        return undo
    return None


def attach_to_server(app: Any = None) -> bool:
    """Add cp_engine's families to the ``/metrics`` mount of ``app`` (default: SGLang's)."""
    if not metrics.export_prometheus():
        return False
    if app is None:
        server = sys.modules.get("sglang.srt.entrypoints.http_server")
        app = getattr(server, "app", None)
    return app is not None and swap_metrics_route(app) is not None
