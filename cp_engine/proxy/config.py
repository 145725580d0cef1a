"""Options of the rewrite proxy and their command-line form.

Contract: ``parse_args(argv)`` returns a validated ``ProxyConfig`` or exits with
argparse's usage error (status 2) naming the bad option; ``add_arguments(parser)``
adds the same options to another parser (the ``cp-engine proxy`` subcommand).
The upstream must be an ``http://`` or ``https://`` URL with a host; requests go to it
with the client's path appended (so ``--upstream http://host:8000`` serves
``/v1/chat/completions`` from ``http://host:8000/v1/chat/completions``).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Sequence
from urllib.parse import urlsplit

DEFAULT_PORT = 8001
DEFAULT_CACHE_TOKENS = 200_000
DEFAULT_MAX_BODY_MB = 32
DEFAULT_MAX_CONCURRENCY = 256


@dataclass(frozen=True)
class ProxyConfig:
    upstream: str
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    # The upstream's prefix-cache size: the index forgets its least recently sent
    # block paths beyond it (no eviction events reach a proxy).
    upstream_cache_tokens: int = DEFAULT_CACHE_TOKENS
    max_body_bytes: int = DEFAULT_MAX_BODY_MB * 1024 * 1024
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    connect_timeout_s: float = 10.0
    # Longest wait for the upstream's next bytes (its answer headers included):
    # a non-streamed answer arrives only once generation is done.
    read_timeout_s: float = 600.0

    @property
    def upstream_base(self) -> str:
        """The upstream URL without a trailing slash (the client's path is appended)."""
        return self.upstream.rstrip("/")


def check_upstream(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--upstream must be an http:// or https:// URL with a host, got {url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"--upstream must not carry a query or fragment, got {url!r}")
    return url


def _positive(kind: type):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--upstream", required=True, help="the OpenAI-compatible server to forward to, "
                        "e.g. http://127.0.0.1:8000")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=_positive(int), default=DEFAULT_PORT,
                        help=f"port to listen on (default {DEFAULT_PORT})")
    parser.add_argument("--upstream-cache-tokens", type=_positive(int), default=DEFAULT_CACHE_TOKENS,
                        help="the upstream's prefix-cache size in tokens; the context index forgets its "
                        f"least recently sent block paths beyond it (default {DEFAULT_CACHE_TOKENS})")
    parser.add_argument("--max-body-mb", type=_positive(float), default=DEFAULT_MAX_BODY_MB,
                        help=f"largest request body accepted, larger ones get 413 (default {DEFAULT_MAX_BODY_MB})")
    parser.add_argument("--max-concurrency", type=_positive(int), default=DEFAULT_MAX_CONCURRENCY,
                        help=f"requests in flight at once, more get 503 (default {DEFAULT_MAX_CONCURRENCY})")
    parser.add_argument("--connect-timeout", type=_positive(float), default=10.0,
                        help="seconds to connect to the upstream before a 504 (default 10)")
    parser.add_argument("--read-timeout", type=_positive(float), default=600.0,
                        help="seconds the upstream may stay silent before a 504 (default 600)")
    return parser


def from_args(ns: argparse.Namespace) -> ProxyConfig:
    return ProxyConfig(upstream=check_upstream(ns.upstream), host=ns.host, port=ns.port,
                       upstream_cache_tokens=ns.upstream_cache_tokens,
                       max_body_bytes=int(ns.max_body_mb * 1024 * 1024),
                       max_concurrency=ns.max_concurrency, connect_timeout_s=ns.connect_timeout,
                       read_timeout_s=ns.read_timeout)


def parse_args(argv: Sequence[str] | None = None, prog: str = "python -m cp_engine.proxy") -> ProxyConfig:
    parser = add_arguments(argparse.ArgumentParser(prog=prog, description="cp_engine rewrite proxy"))
    ns = parser.parse_args(argv)
    try:
        return from_args(ns)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # parser.error exits; keeps type checkers content
