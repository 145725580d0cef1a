"""End to end on a live SGLang CPU server (real scheduler, real UnifiedRadixCache with the
Rust core, real HTTP path) with SGLang's own cache counters.

The PyPI wheel has no CPU ``sgl_kernel`` and breaks on PyPI's torchvision: the server's
processes get the test stand-ins of ``sglang_support`` through a ``sitecustomize`` on
PYTHONPATH (test-only). cp_engine itself loads the way users get it: the autoload
``.pth`` in site-packages plus the ``sglang.srt.plugins`` entry point. ~60 s.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from sglang_support import build_tiny_model, require_sglang

require_sglang()

pytestmark = pytest.mark.sglang
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM = "Answer from the documents."
BLOCKS = [f"Document {name}: " + (f"{name} facts and figures. " * 12) for name in ("red", "green", "blue")]
MAX_TOTAL_TOKENS = 4096


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _chat(base: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"{base}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def metric(text: str, name: str) -> float:
    """Sum of a metric's samples (all label sets) in a Prometheus exposition."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("sglang_live")
    model = build_tiny_model(str(root / "model"), weights=True)
    shim = root / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        f"import sys\nsys.path.insert(0, {TESTS!r})\nimport sglang_support\n"
        "sglang_support.install_torchvision_standin()\nsglang_support.install_sgl_kernel_standin()\n")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CP_ENGINE_")}
    env.update(PYTHONPATH=str(shim), SGLANG_USE_CPU_ENGINE="1", HF_HUB_OFFLINE="1", TMPDIR=str(root))
    log = open(root / "server.log", "w")
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", model, "--device", "cpu",
           "--attention-backend", "torch_native", "--sampling-backend", "pytorch", "--disable-cuda-graph",
           "--host", "127.0.0.1", "--port", str(port), "--enable-metrics",
           "--max-total-tokens", str(MAX_TOTAL_TOKENS), "--mem-fraction-static", "0.05"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            try:
                if _get(f"{base}/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(1)
        ready = proc.poll() is None and _get(f"{base}/health")[0] == 200
        if not ready:
            log.flush()
            pytest.fail("SGLang server did not start:\n" + (root / "server.log").read_text()[-4000:])
        yield base, root / "server.log"
    finally:
        # Only the process group this fixture started.
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()


def _body(question: str, blocks=None, **extra) -> dict:
    b = {"model": "tiny", "max_tokens": 2, "temperature": 0,
         "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]}
    if blocks is not None:
        b["context_blocks"] = blocks
    b.update(extra)
    return b


def test_plugin_active_in_every_server_process(server):
    _, log = server
    text = log.read_text()
    assert text.count("cp_engine active in SGLang") >= 2  # HTTP/tokenizer + scheduler (+ detokenizer)


def test_reordered_blocks_are_served_from_cache(server):
    base, _ = server
    status, first = _chat(base, _body("Which colour is first?", BLOCKS))
    assert status == 200
    before = metric(_get(f"{base}/metrics")[1], "sglang:cached_tokens_total")
    # Same blocks, another retrieval order and question: the plugin renders them in the
    # order already cached, so SGLang's radix cache serves the whole block prefix.
    status, second = _chat(base, _body("Which colour is last?", [BLOCKS[2], BLOCKS[0], BLOCKS[1]]))
    assert status == 200
    cached = metric(_get(f"{base}/metrics")[1], "sglang:cached_tokens_total") - before
    block_tokens = sum(len(b) for b in BLOCKS)  # one token per character here
    assert cached >= block_tokens, (cached, block_tokens)
    assert second["usage"]["prompt_tokens"] > block_tokens


def test_marks_in_chat_template_kwargs_render_like_the_field(server):
    # What SGLang's router forwards: it drops context_blocks and keeps these kwargs.
    base, _ = server
    question = "Which colour comes in the middle?"
    status, by_field = _chat(base, _body(question, BLOCKS))
    assert status == 200
    before = metric(_get(f"{base}/metrics")[1], "sglang:cached_tokens_total")
    status, by_kwargs = _chat(base, _body(question, chat_template_kwargs={"cp_context_blocks": BLOCKS}))
    assert status == 200
    assert by_kwargs["usage"]["prompt_tokens"] == by_field["usage"]["prompt_tokens"]
    cached = metric(_get(f"{base}/metrics")[1], "sglang:cached_tokens_total") - before
    assert cached >= sum(len(b) for b in BLOCKS), cached  # the same prompt: its blocks come from cache


def test_bad_input_is_a_400_and_the_server_keeps_serving(server):
    base, _ = server
    status, err = _chat(base, _body("q", ["ok", 5]))
    assert status == 400 and "context_blocks[1]" in json.dumps(err)
    status, _ = _chat(base, _body("plain question"))
    assert status == 200


def test_evictions_reach_the_index_and_counters_show_on_metrics(server):
    base, _ = server
    # Distinct blocks, more tokens in total than the KV cache holds: SGLang evicts.
    for i in range(8):
        docs = [f"Request {i} document {k}: " + (f"item {i}-{k} " * 60) for k in range(2)]
        status, _ = _chat(base, _body(f"question {i}", docs))
        assert status == 200
    deadline = time.monotonic() + 30
    text = ""
    while time.monotonic() < deadline:
        text = _get(f"{base}/metrics")[1]
        if metric(text, "cp_engine_evictions_applied_total") > 0:
            break
        time.sleep(0.5)
    assert metric(text, "cp_engine_evictions_applied_total") > 0
    assert metric(text, "cp_engine_requests_rewritten_total") >= 10
    assert metric(text, "cp_engine_requests_rejected_total") >= 1
    assert metric(text, "cp_engine_hook_failures_total") == 0
