"""Run the engine benchmark's GPU-server path on CPU: two servers started first, then
``--url-off`` / ``--url-on`` against them (what the GPU command in
results/engine.md does with hand-started ``vllm serve`` processes).

    python -m benchmarks.engine.remote_check                 # tiny model, --quick --targets-only, ~8 min on 2 cores
    python -m benchmarks.engine.remote_check --out F.json    # where the engine benchmark writes its results

Exit status: the engine benchmark's.
"""
from __future__ import annotations

import argparse
import subprocess
import sys

from benchmarks.engine.servers import SERVER_ENV
from benchmarks.common.live import start_server
from cp_engine.devtools.vllm_server import tiny_model_dir


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/cp_engine_remote_check.json")
    args = ap.parse_args(argv)
    model = tiny_model_dir()
    server_args = ["--max-model-len", "8192"]
    with start_server(model, SERVER_ENV["off"], server_args) as off, \
            start_server(model, SERVER_ENV["on"], server_args) as on:
        return subprocess.run([sys.executable, "-m", "benchmarks.engine", "--quick", "--targets-only",
                               "--url-off", off.url, "--url-on", on.url, "--out", args.out]).returncode


if __name__ == "__main__":
    sys.exit(main())
