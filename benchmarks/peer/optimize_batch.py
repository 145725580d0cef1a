"""Run the peer's (ContextPilot 0.5.0) client-side batch pipeline on text requests.

Runs INSIDE benchmarks/.peer-venv (never imported by cp_engine or its tests):

    .peer-venv/bin/python peer/optimize_batch.py IN.json OUT.json

IN.json: ``{"docs": [[str, ...], ...], "queries": [str, ...], "system": str | null}``.
OUT.json: ``{"messages": [...], "order": [...], "seconds": float, "peer": str}`` where
``messages[j]`` is the peer's chat for input request ``order[j]``, in its execution
order: the public ``contextpilot.optimize_batch`` call, unchanged.
"""
from __future__ import annotations

import contextlib
import json
import logging
import sys
import time


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    spec = json.loads(open(argv[1]).read())
    logging.disable(logging.WARNING)
    import contextpilot

    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the peer prints progress banners
        messages, order = contextpilot.optimize_batch(
            spec["docs"], spec["queries"], system_instruction=spec.get("system"))
    out = {"messages": messages, "order": [int(i) for i in order],
           "seconds": time.perf_counter() - t0, "peer": "contextpilot " + contextpilot.__version__}
    with open(argv[2], "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
