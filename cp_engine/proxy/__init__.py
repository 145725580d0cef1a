"""Rewrite proxy: the plugin's request rewrite in front of any OpenAI-compatible server.

For servers cp_engine cannot patch (a managed endpoint, llama.cpp, a vLLM image you do
not own): ``cp-engine proxy --upstream URL`` listens on 127.0.0.1, rewrites requests
that mark context blocks exactly as the in-server plugin does, and forwards everything
to the upstream server (``docs/proxy.md``).

Modules: ``config`` (options and the command line), ``app`` (the aiohttp server and
its one catch-all route), ``rewrite`` (marked body → rewritten body + pending commit),
``forward`` (the upstream client and its 502/504 mapping), ``relay`` (the upstream's
answer back to the client, settling the commit), ``errors`` (the proxy's own JSON
error answers), ``counters`` (its own counters, ``GET /cp_engine/metrics``). Needs the
``proxy`` extra (aiohttp).
"""
from __future__ import annotations

from .config import ProxyConfig

__all__ = ["ProxyConfig"]
