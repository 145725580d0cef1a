"""Unit tests of the engine-neutral hook plumbing (no engine needed)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cp_engine.config import Config
from cp_engine.hooks import bootstrap, faults, ledger, metrics
from cp_engine.marking import InvalidBlocks, fallback_messages, find_marks
from cp_engine import request_hints
from cp_engine.hooks.wrapping import bind_args, is_wrapped, unwrap_method, wrap_method
from cp_engine.pipeline import ContextPipeline


def test_ledger_version_ranges():
    v = ledger.Versions("0.27.0", "0.33")
    assert v.admits("0.27.0") and v.admits("0.32.0")
    assert v.admits("0.33.4rc1+cpu")
    assert not v.admits("0.26.9") and not v.admits("0.34.0")
    assert not v.admits("garbage") and not v.admits(None)
    row = ledger.Row("r", "x.y:Owner.attr", "method", "pkg.mod:fn", "why", "never")
    table = ledger.Table("vllm", v, (row,))
    assert table.row("r") is row and row.module == "x.y" and row.path == ("Owner", "attr")
    assert "`x.y:Owner.attr`" in table.as_markdown() and "0.27.0–0.33" in table.as_markdown()


def test_fault_switch_raise_and_hang(monkeypatch):
    monkeypatch.setenv("CP_ENGINE_FAULT", "a, b:hang=0.01")
    with pytest.raises(faults.InjectedFault):
        faults.check_fault("a")
    faults.check_fault("b")  # sleeps briefly, returns
    faults.check_fault("c")
    monkeypatch.setenv("CP_ENGINE_FAULT", "")
    faults.check_fault("a")  # switch re-read when the variable changes
    # Every way of changing os.environ is seen at the next call, non-ASCII included.
    os.environ["CP_ENGINE_FAULT"] = "a,é"
    try:
        for hook in ("a", "é"):
            with pytest.raises(faults.InjectedFault):
                faults.check_fault(hook)
        os.environ.update(CP_ENGINE_FAULT="c")
        faults.check_fault("a")
        with pytest.raises(faults.InjectedFault):
            faults.check_fault("c")
    finally:
        del os.environ["CP_ENGINE_FAULT"]
    faults.check_fault("c")  # unset: no fault


def test_guarded_swallows_counts_and_call_guarded_defaults(monkeypatch):
    before = metrics.value("hook_failures", hook="unit_hook")
    with faults.guarded("unit_hook"):
        raise ValueError("boom")
    assert metrics.value("hook_failures", hook="unit_hook") == before + 1
    monkeypatch.setenv("CP_ENGINE_FAULT", "unit_hook2")
    assert faults.call_guarded("unit_hook2", lambda: 1, default="dflt") == "dflt"
    monkeypatch.delenv("CP_ENGINE_FAULT")
    assert faults.call_guarded("unit_hook2", lambda x: x + 1, 1) == 2
    with pytest.raises(KeyboardInterrupt):  # only Exception is swallowed
        with faults.guarded("unit_hook"):
            raise KeyboardInterrupt


def test_stall_breaker_switches_a_hook_off_after_one_slow_call(monkeypatch):
    from cp_engine.hooks import runtime

    monkeypatch.setenv("CP_ENGINE_HOOK_STALL_S", "0.05")
    monkeypatch.setenv("CP_ENGINE_FAULT", "unit_stall:hang=0.1")
    runtime.reset_for_tests()
    calls = []

    @faults.stall_watched("unit_stall")
    def hook(x):
        faults.check_fault("unit_stall")
        calls.append(x)
        return x * 2

    @faults.stall_watched("unit_quick")
    def quick():
        faults.check_fault("unit_quick")
        return "ok"

    try:
        assert hook(2) == 4 and calls == [2]  # the stalled call itself completes
        assert faults.switched_off("unit_stall") and metrics.value("hook_stalls", hook="unit_stall") == 1
        failures = metrics.value("hook_failures", hook="unit_stall")
        skipped = metrics.value("hook_calls_skipped", hook="unit_stall")
        assert faults.call_guarded("unit_stall", hook, 3, default="plain") == "plain"
        assert calls == [2]  # switched off: the body never ran again
        assert metrics.value("hook_calls_skipped", hook="unit_stall") == skipped + 1
        assert metrics.value("hook_failures", hook="unit_stall") == failures  # a skip is no failure
        assert quick() == "ok" and not faults.switched_off("unit_quick")  # per hook
        monkeypatch.setenv("CP_ENGINE_HOOK_STALL_S", "0")  # 0: the breaker never trips
        runtime.reset_for_tests()
        assert not faults.switched_off("unit_stall") and hook(1) == 2
        assert not faults.switched_off("unit_stall")
    finally:
        monkeypatch.delenv("CP_ENGINE_FAULT")
        monkeypatch.delenv("CP_ENGINE_HOOK_STALL_S")
        runtime.reset_for_tests()


def test_metrics_merge_and_labels():
    metrics.inc("evictions_applied", 2)
    base = metrics.value("evictions_applied")
    metrics.merge([("evictions_applied", {}, 3), ("hook_failures", {"hook": "remote"}, 1)])
    assert metrics.value("evictions_applied") == base + 3
    assert metrics.value("hook_failures", hook="remote") >= 1
    metrics.inc("requests_rewritten", hook=object())  # odd label values never raise


def test_find_marks_canonical_field_and_header():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    assert find_marks({}, msgs) is None
    assert find_marks({"context_blocks": []}, msgs) is None  # empty = unmarked
    m = find_marks({"context_blocks": ["a", "b"], "conversation_id": "c1"}, msgs)
    assert m.blocks == ["a", "b"] and m.conversation_id == "c1" and m.source == "field"
    m = find_marks({"context_blocks": ["a"]}, msgs, headers={"x-cp-conversation-id": "h1"})
    assert m.conversation_id == "h1"
    for bad in ("abc", [1], ["a", None], {"a": 1}):
        with pytest.raises(InvalidBlocks):
            find_marks({"context_blocks": bad}, msgs)
    for bad_conv in (1.5, ["x"], "", "x" * 1000, True):
        with pytest.raises(InvalidBlocks):
            find_marks({"context_blocks": ["a"], "conversation_id": bad_conv}, msgs)


def test_find_marks_content_parts():
    msgs = [{"role": "user", "content": [
        {"type": "text", "text": "doc A", "cp_block": True},
        {"type": "text", "text": "doc B", "cp_block": True},
        {"type": "text", "text": "question?"}]}]
    m = find_marks(None, msgs)
    assert m.blocks == ["doc A", "doc B"] and m.source == "parts"
    assert m.messages[0]["content"] == "question?"
    assert msgs[0]["content"][0]["cp_block"] is True  # input not mutated
    with pytest.raises(InvalidBlocks):
        find_marks(None, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}, "cp_block": True}]}])


def test_fallback_rendering_matches_flags_off_pipeline():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    m = find_marks({"context_blocks": ["b1", "b2", "b3"]}, msgs)
    off = ContextPipeline(Config(reorder=False, dedup=False, annotate=False))
    rewritten, _ = off.rewrite_messages(msgs, m.blocks)
    assert fallback_messages(m) == rewritten


def test_xargs_roundtrip():
    pipe = ContextPipeline(Config())
    prep = pipe.prepare(["x" * 400, "y" * 800], namespace="ns")
    xa = request_hints.build_xargs(prep, "chatcmpl-1", base_offset=10)
    assert set(xa) == set(request_hints.INDEX_KEYS)
    assert all(len(p) == 16 for p in xa[request_hints.PATH])
    assert xa[request_hints.ENDS] == sorted(xa[request_hints.ENDS]) and xa[request_hints.ENDS][0] > 10
    h = request_hints.read_hints(xa)
    assert h.path == tuple(b & (2**64 - 1) for b in prep.index_path()) and h.request_id == "chatcmpl-1"
    assert request_hints.read_hints({}) is None and request_hints.read_hints({request_hints.PATH: ["zz"]}) is None
    assert request_hints.read_hints({request_hints.PATH: "abc"}) is None


class _Target:
    def method(self, a, b=2, *, c=3):
        return (a, b, c)


def test_wrap_unwrap_idempotent_and_bind_by_name():
    seen = []

    def wrapper(wrapped, instance, args, kwargs):
        seen.append(bind_args(wrapped, args, kwargs).arguments["b"])
        return wrapped(*args, **kwargs)

    orig = _Target.__dict__["method"]
    assert wrap_method(_Target, "method", wrapper) is True
    assert wrap_method(_Target, "method", wrapper) is False  # never double-wrapped
    assert _Target().method(1, c=4) == (1, 2, 4) and seen == [2]
    assert _Target().method(1, b=5) == (1, 5, 3) and seen == [2, 5]
    assert unwrap_method(_Target, "method") and _Target.__dict__["method"] is orig
    assert not is_wrapped(_Target, "method") and not unwrap_method(_Target, "method")


def test_bootstrap_idempotent_and_fail_open(monkeypatch):
    calls = []
    bootstrap.register_adapter("unit_ok", lambda: calls.append(1) or True)
    assert bootstrap.activate("unit_ok") == "patched"
    assert bootstrap.activate("unit_ok", source="entry_point") == "patched"
    assert calls == [1]

    def broken():
        raise RuntimeError("adapter exploded")

    bootstrap.register_adapter("unit_bad", broken)
    before = metrics.value("hook_failures", hook="bootstrap.unit_bad")
    assert bootstrap.activate("unit_bad") == "failed"
    assert metrics.value("hook_failures", hook="bootstrap.unit_bad") == before + 1
    monkeypatch.setenv("CP_ENGINE_DISABLE", "1")
    bootstrap.register_adapter("unit_off", lambda: calls.append(2) or True)
    assert bootstrap.activate("unit_off") == "skipped" and calls == [1]


def _run(code: str, env: dict) -> str:
    full = {k: v for k, v in os.environ.items() if not k.startswith("CP_ENGINE_")}
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full,
                          timeout=60, check=True).stdout.strip()


def test_instance_id_inherited_by_children_not_by_strangers():
    code = ("import os, subprocess, sys\n"
            "from cp_engine.hooks import runtime\n"
            "me = runtime.instance_id()\n"
            "child = subprocess.run([sys.executable, '-c', 'from cp_engine.hooks import runtime; "
            "print(runtime.instance_id())'], capture_output=True, text=True).stdout.strip()\n"
            "print(me, child, os.environ['CP_ENGINE_INSTANCE'])")
    me, child, env_value = _run(code, {}).split()
    assert me == child and env_value.startswith(me + "@")
    # A value left by an unrelated process (pid 1 is no ancestor we inherit from) is not adopted.
    stranger = _run("from cp_engine.hooks import runtime; print(runtime.instance_id())",
                    {"CP_ENGINE_INSTANCE": "abc-1@999999"})
    assert stranger != "abc-1"


def test_pth_line_is_one_import_line_and_honours_disable():
    from cp_engine.hooks import autoload

    assert "\n" not in autoload.PTH_LINE and autoload.PTH_LINE.startswith("import ")
    out = _run(autoload.PTH_LINE + "\nimport sys; print('wrapt.importer' in sys.modules, "
               "'cp_engine.hooks.autoload' in sys.modules)", {"CP_ENGINE_DISABLE": "1"})
    assert out == "False False"
    out = _run(autoload.PTH_LINE + "\nimport sys; print('cp_engine.hooks.autoload' in sys.modules, "
               "any(k.startswith('vllm') for k in sys.modules))", {})
    assert out == "True False"  # hooks registered; no engine imported by us


def test_runtime_pipeline_serialises_calls_across_threads():
    import threading

    from cp_engine.hooks import runtime

    runtime.reset_for_tests()
    pipe = runtime.pipeline()
    assert isinstance(pipe.unwrapped, ContextPipeline) and pipe is runtime.pipeline()
    errors = []

    def writer(t):
        try:
            for i in range(200):
                prep = pipe.prepare([f"doc {t}-{i % 7}", f"doc shared {i % 5}"], namespace="ns")
                pipe.commit(f"r{t}-{i}", prep)
                if i % 10 == 0:
                    pipe.evict(f"r{t}-{i - 5}", from_token=3)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not errors
    runtime.reset_for_tests()


class _WordTokenizer:
    """Pure-unit stand-in: one token per whitespace-separated word."""

    def encode(self, text, add_special_tokens=True):
        return text.split()


def test_token_ratio_sampling_and_scale():
    from cp_engine.hooks.tokenratio import TokenRatio

    ratio = TokenRatio(warmup=2, every=3)
    assert ratio.scale() == 1.0
    ratio.observe(_WordTokenizer(), "ab " * 100)  # 3 chars per token -> 4/3 real per estimated
    assert abs(ratio.scale() - 4 / 3) < 1e-9
    ratio.observe(None, "x")  # no tokenizer: ignored
    ratio.observe(object(), "x y")  # broken tokenizer: ignored, never raises
    assert abs(ratio.scale() - 4 / 3) < 1e-9


@pytest.mark.vllm
def test_cp_ends_track_real_token_positions_with_a_real_tokenizer():
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from cp_engine.devtools.vllm_server import tiny_model_dir
    from cp_engine.marking import prefix_tokens
    from cp_engine.hooks.tokenratio import TokenRatio

    tok = AutoTokenizer.from_pretrained(tiny_model_dir())
    pipe = ContextPipeline(Config())
    msgs = [{"role": "system", "content": "You answer from documents."}, {"role": "user", "content": "Why?"}]
    blocks = [" ".join(f"word{i}_{j} river signal" for j in range(60)) for i in range(4)]
    ratio = TokenRatio()
    for _ in range(3):
        out, prep = pipe.rewrite_messages(msgs, blocks)
        ratio.observe(tok, prep.context_text)
    xa = request_hints.build_xargs(prep, "r", prefix_tokens(out), scale=ratio.scale())
    text = tok.apply_chat_template(out, tokenize=False)
    end_of_context = text.index(prep.context_text) + len(prep.context_text)
    real = len(tok(text[:end_of_context], add_special_tokens=False)["input_ids"])
    unscaled = request_hints.build_xargs(prep, "r", prefix_tokens(out))[request_hints.ENDS][-1]
    assert abs(xa[request_hints.ENDS][-1] - real) <= 0.1 * real, (xa[request_hints.ENDS][-1], real, unscaled)
    assert abs(unscaled - real) > 0.1 * real  # the fixed 4-chars estimate alone would be off


def test_locked_pipeline_keeps_each_method_locked_and_fault_checked_after_caching(monkeypatch):
    from cp_engine.hooks.runtime import LockedPipeline

    pipe = LockedPipeline(ContextPipeline())
    assert pipe.prepare is pipe.prepare  # cached after the first lookup
    assert pipe.index is pipe.unwrapped.index  # attributes are never wrapped
    held = []
    original = ContextPipeline.reset

    def spying_reset(self):
        held.append(pipe._call_lock._is_owned())
        return original(self)

    monkeypatch.setattr(ContextPipeline, "reset", spying_reset)
    pipe2 = LockedPipeline(ContextPipeline())
    pipe2._call_lock = pipe._call_lock
    pipe2.reset()
    pipe2.reset()
    assert held == [True, True]
    faults.reset_breaker()
    monkeypatch.setenv("CP_ENGINE_FAULT", "index")
    with pytest.raises(faults.InjectedFault):
        pipe.prepare(["a block"])
    monkeypatch.setenv("CP_ENGINE_FAULT", "")
    assert pipe.prepare(["a block"]).block_ids
