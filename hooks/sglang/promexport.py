"""cp_engine counters on SGLang's own ``/metrics``.

SGLang serves ``/metrics`` from a private ``CollectorRegistry`` holding only a
multiprocess collector (``sglang.srt.utils.common.add_prometheus_middleware``), so a
collector on prometheus_client's default registry is not shown there. With metrics
enabled, ``attach_to_server`` swaps the app behind the ``/metrics`` mount of SGLang's
FastAPI app for one serving a registry with the same multiprocess collector plus
cp_engine's families (``hooks.metrics``). Idempotent; without ``--enable-metrics``
there is no mount and nothing changes.
"""
from __future__ import annotations

import sys
from typing import Any

from .. import metrics

__all__ = ["attach_to_server", "CpEngineFamilies"]

_MARK = "_cp_engine_metrics"


class CpEngineFamilies:
    """Collector yielding only the ``cp_engine_*`` families of the default registry."""

    def collect(self):
        from prometheus_client import REGISTRY

        for fam in REGISTRY.collect():
            if fam.name.startswith("cp_engine_"):
                yield fam

    def describe(self):
        return []


def attach_to_server(app: Any = None) -> bool:
    """Add cp_engine's families to the ``/metrics`` mount of ``app`` (default: SGLang's)."""
    if not metrics.export_prometheus():
        return False
    if app is None:
        server = sys.modules.get("sglang.srt.entrypoints.http_server")
        app = getattr(server, "app", None)
    if app is None:
        return False
    from prometheus_client import CollectorRegistry, make_asgi_app, multiprocess

    for route in list(getattr(app, "routes", [])):
        if getattr(route, "path", None) != "/metrics" or not hasattr(route, "app"):
            continue
        if getattr(route, _MARK, False):
            return True
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # what SGLang serves
        registry.register(CpEngineFamilies())
        route.app = make_asgi_app(registry=registry)
        setattr(route, _MARK, True)
        return True
    return False
