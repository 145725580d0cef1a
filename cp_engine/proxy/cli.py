"""Entry points: ``cp-engine proxy ...`` (console script) and ``python -m cp_engine.proxy ...``.

Both parse the options of ``config`` and serve until interrupted. Without aiohttp
installed they exit with status 1 and say which extra to install.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from . import config


def _serve(cfg: config.ProxyConfig) -> int:
    try:
        from .app import run
    except ImportError as exc:
        print(f"cp_engine proxy needs aiohttp: pip install 'cp-engine[proxy]' ({exc})", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s [%(name)s] %(message)s")
    run(cfg)
    return 0


def proxy_main(argv: Sequence[str] | None = None) -> int:
    """``python -m cp_engine.proxy``: the proxy's options only."""
    return _serve(config.parse_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """``cp-engine``: one subcommand, ``proxy``."""
    parser = argparse.ArgumentParser(prog="cp-engine", description="cp_engine command line")
    sub = parser.add_subparsers(dest="command", required=True)
    config.add_arguments(sub.add_parser("proxy", help="rewrite proxy in front of an OpenAI-compatible server",
                                        description="cp_engine rewrite proxy"))
    ns = parser.parse_args(argv)
    try:
        cfg = config.from_args(ns)
    except ValueError as exc:
        parser.error(str(exc))
    return _serve(cfg)
