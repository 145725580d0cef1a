"""SGLang's router (``sglang-router``, the model gateway) on 127.0.0.1 for tests and
benchmarks, in front of any OpenAI-style workers (docs/scale-out.md).

``SglangRouter(workers, policy)`` runs ``python -m sglang_router.launch_router`` with the
interpreter ``find_sglang_router()`` names (``CP_ENGINE_SGLANG_ROUTER``, else this one
when it imports ``sglang_router``); start and stop are ``Router``'s. It is ready when
every worker is registered and healthy (``GET /workers``): its ``/health`` answers
before its background registration has added any, and requests sent then get 503. Its
metrics exporter gets a free port of its own, so two routers (or a leftover one) do
not collide on the default.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import requests

from .vllm_router import Router, _free_port

SGLANG_ROUTER_ENV = "CP_ENGINE_SGLANG_ROUTER"  # a Python interpreter that imports sglang_router


def find_sglang_router() -> str | None:
    python = os.environ.get(SGLANG_ROUTER_ENV)
    if python:
        return python
    return sys.executable if importlib.util.find_spec("sglang_router") is not None else None


class SglangRouter(Router):
    name = "sglang-router"

    def command(self, binary: str | None, workers: list[str], policy: str) -> list[str]:
        python = binary or find_sglang_router()
        if not python:
            raise RuntimeError("sglang-router not found: install it (`uv pip install sglang-router`) into an "
                               f"environment and set {SGLANG_ROUTER_ENV} to its python")
        return [python, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(self.port),
                "--policy", policy, "--worker-urls", *workers, "--worker-startup-timeout-secs", "60",
                "--disable-retries", "--prometheus-port", str(_free_port()), "--log-level", "warn"]

    def ready(self) -> bool:
        r = requests.get(self.url + "/workers", timeout=2)
        if r.status_code != 200:
            return False
        healthy = {w.get("url") for w in r.json().get("workers", []) if w.get("is_healthy")}
        return set(self.workers) <= healthy
