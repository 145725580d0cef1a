"""Blend spans of rewritten prompts, with real tokenizers and chat templates (no engine).

The API server's path is rebuilt from its parts: the pipeline renders the blocks, the
rewrite's anchors say where they went, the chat template renders the messages, the
prompt text is cut at the blocks and tokenized piece by piece
(``hooks/vllm/blend_spans._cut``), and the engine-request gate finds each block's span
in the final ids (``spans_for``, ``_gate``). Every span must hold exactly the block's
standalone ids, and the cut ids must read as the same text.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from cp_engine.blend.marks import (Anchor, context_anchor, locate_anchors, read_blend_marks, suffix_anchor,
                                   with_suffix)
from cp_engine.blend.spans import TokenCache, boundary_merges, concatenates_cleanly, encode_cut, locate_spans
from cp_engine.config import Config
from cp_engine.pipeline import ContextPipeline, InvalidBlocks, namespace_of
from cp_engine.request_hints import SCOPE, SPANS, read_spans
from cp_engine.hooks.vllm import blend_spans
from cp_engine.hooks.vllm.blend_spans import REF_KEY, Plan, _cut, _gate, attach, spans_for

QWEN = Path(__file__).resolve().parents[2] / "benchmarks/.cache/models/qwen2.5-coder-0.5b-instruct"

# Blocks chosen so that tokenizing the joined prompt merges across their boundaries:
# sentences ending in "." (".\n\n" is one token for Qwen), a leading space, digits.
BLOCKS = [
    "The Eiffel Tower is in Paris. It was finished in 1889.",
    "Mount Fuji is the highest mountain in Japan.",
    " Leading space: the Nile flows north.",
    "def parse(text):\n    return text.split()",
]
SUFFIX = ["Memory: the user prefers short answers.", "History: step 1 searched the web."]


def _tokenizers():
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from cp_engine.devtools.vllm_server import tiny_model_dir

    out = [("tiny", AutoTokenizer.from_pretrained(tiny_model_dir()))]
    if (QWEN / "tokenizer.json").exists():
        out.append(("qwen2.5", AutoTokenizer.from_pretrained(str(QWEN))))
    return out


@pytest.fixture(scope="module", params=[name for name, _ in _tokenizers()])
def tok(request):
    return dict(_tokenizers())[request.param]


def _enc(tok):
    return lambda s: tok.encode(s, add_special_tokens=False)


SYSTEM = {"role": "system", "content": "Answer from the documents."}


def _chat_plan(pipe, blocks, suffix, keep_order=False):
    messages = [SYSTEM, {"role": "user", "content": "Where is it?"}]
    out, prep = pipe.rewrite_messages(messages, blocks, keep_order=keep_order)
    sfx = suffix_anchor(suffix)
    out[-1] = dict(out[-1], content=with_suffix(out[-1]["content"], sfx))
    anchors = (context_anchor(prep.context_text, prep.order, prep.full, blocks), sfx)
    return out, prep, Plan(anchors, scope="tenant-a")


def _assert_exact(tok, ids, spans, texts):
    assert len(spans) == len(texts)
    for (s, e), text in zip(spans, texts):
        assert list(ids[s:e]) == _enc(tok)(text)
    assert read_spans({SPANS: [list(x) for x in spans]}, len(ids)) == tuple(tuple(x) for x in spans)


@pytest.mark.parametrize("keep_order", [False, True])
def test_chat_prompt_spans_hold_each_blocks_standalone_ids(tok, keep_order):
    pipe = ContextPipeline(Config())
    # the index now prefers another order
    pipe.record("r0", pipe.prepare(BLOCKS[::-1], namespace=namespace_of([SYSTEM])))
    messages, prep, plan = _chat_plan(pipe, BLOCKS, SUFFIX, keep_order=keep_order)
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    whole = _enc(tok)(text)
    shown = [BLOCKS[i] for i in prep.order] + SUFFIX
    if keep_order:
        assert prep.order == list(range(len(BLOCKS))) and "Most relevant" not in prep.context_text
        assert "[1]" not in prep.context_text
    else:
        assert prep.order != list(range(len(BLOCKS)))
    if not keep_order:  # tokenized whole, "[1] The" merges the label's space into the block
        assert None in locate_spans(whole, [_enc(tok)(b) for b in shown])

    cut = _cut(tok, plan, text, add_special=False)
    _assert_exact(tok, cut.ids, cut.spans, shown)
    assert tok.decode(cut.ids) == tok.decode(whole)  # the same text, only cut differently
    # the gate takes the cut's spans when the engine got those ids ...
    assert spans_for(plan, cut.ids) == [list(s) for s in cut.spans]
    # ... and locates the blocks again when the ids moved (e.g. truncated on the left)
    shifted = spans_for(plan, cut.ids[5:])
    assert shifted == [[s - 5, e - 5] for s, e in cut.spans]


def test_completion_prompt_spans_with_special_tokens(tok):
    pipe = ContextPipeline(Config())
    prep = pipe.prepare(BLOCKS)
    sfx = suffix_anchor(SUFFIX)
    text = with_suffix(f"{prep.context_text}\n\nQuestion: where?", sfx)
    plan = Plan((context_anchor(prep.context_text, prep.order, prep.full, BLOCKS), sfx), scope="")
    cut = _cut(tok, plan, text, add_special=True)
    lead = blend_spans._state(tok).lead
    assert lead is not None and cut.ids[:len(lead)] == list(lead)
    _assert_exact(tok, cut.ids, cut.spans, [BLOCKS[i] for i in prep.order] + SUFFIX)
    assert tok.decode(cut.ids) == tok.decode(tok.encode(text))


def test_a_block_is_tokenized_once(tok):
    cache = TokenCache(_enc(tok))
    text = "A: " + BLOCKS[0] + "\n\nB: " + BLOCKS[0]
    at = text.index(BLOCKS[0]), text.rindex(BLOCKS[0])
    ranges = [(a, a + len(BLOCKS[0])) for a in at]
    first = encode_cut(_enc(tok), text, ranges, cache)
    assert (cache.misses, cache.hits, len(cache)) == (1, 1, 1)
    encode_cut(_enc(tok), text, ranges, cache)
    assert (cache.misses, cache.hits) == (1, 3)
    _assert_exact(tok, first.ids, first.spans, [BLOCKS[0]] * 2)


def test_token_cache_is_bounded_by_tokens():
    cache = TokenCache(lambda s: [ord(c) for c in s], max_tokens=10)
    for text in ("abcd", "efgh", "ijkl"):
        cache.ids(text)
    assert cache.tokens <= 10 and len(cache) == 2  # the oldest went
    cache.ids("abcd")
    assert cache.misses == 4
    assert cache.ids("x" * 11).size == 11 and cache.tokens <= 10  # too long to keep


def test_merges_are_detected_where_the_cut_avoids_them(tok):
    # the boundaries boundary_merges flags are exactly where whole-text ids lose a block
    segs_text = ["Intro:\n", BLOCKS[0], "\n\n", BLOCKS[1]]
    from cp_engine.blend.spans import Segment

    segs = [Segment(t, block=i % 2 == 1) for i, t in enumerate(segs_text)]
    merged = boundary_merges(_enc(tok), segs)
    whole = _enc(tok)("".join(segs_text))
    found = locate_spans(whole, [_enc(tok)(BLOCKS[0]), _enc(tok)(BLOCKS[1])])
    assert (None in found) == bool(merged)


def test_a_tokenizer_that_prefixes_a_space_is_never_cut():
    # SentencePiece-style: every encoded text starts a new word, so pieces joined read
    # differently from the text (a space appears at each cut)
    words = {}

    def encode(s):
        out = []
        for w in (" " + s).split(" ")[1:]:
            out.append(words.setdefault("\u2581" + w, len(words)))
        return out

    def decode(ids):
        inv = {v: k for k, v in words.items()}
        return "".join(inv[i] for i in ids).replace("\u2581", " ").lstrip(" ")

    assert not concatenates_cleanly(encode, decode)
    tok = SimpleNamespace(encode=lambda s, add_special_tokens=False: encode(s),
                          decode=lambda ids, skip_special_tokens=False: decode(ids))
    plan = Plan((Anchor("doc one", ((0, 7),)),), scope="")
    assert _cut(tok, plan, "see: doc one", add_special=False) is None


def test_anchors_find_the_last_copy_and_skip_references():
    pipe = ContextPipeline(Config())
    prep = pipe.prepare(["alpha text", "beta text", "alpha text"])  # the repeat is left out
    anchor = context_anchor(prep.context_text, prep.order, prep.full, ["alpha text", "beta text", "alpha text"])
    assert len(anchor.ranges) == 2
    prompt = f"history: {prep.context_text}\n\nnow: {prep.context_text}\n\nq"
    ranges = locate_anchors(prompt, [anchor])
    assert ranges[0][0] > prompt.index("now:")
    assert [prompt[s:e] for s, e in ranges] == [anchor.text[s:e] for s, e in anchor.ranges]
    assert locate_anchors("nothing here", [anchor]) == []


def test_blend_marks_are_checked():
    assert read_blend_marks(None).suffix == [] and read_blend_marks({}).keep_order is None
    assert read_blend_marks({"context_suffix": ["m"], "context_keep_order": True}).keep_order is True
    with pytest.raises(InvalidBlocks, match=r"context_suffix\[1\] is empty"):
        read_blend_marks({"context_suffix": ["m", " "]})
    with pytest.raises(InvalidBlocks, match="context_suffix must be a list"):
        read_blend_marks({"context_suffix": "m"})
    with pytest.raises(InvalidBlocks, match="context_keep_order must be true or false"):
        read_blend_marks({"context_keep_order": 1})
    assert with_suffix("q", suffix_anchor([])) == "q"
    assert with_suffix([{"type": "text", "text": "q"}], suffix_anchor(["m"]))[-1] == {"type": "text", "text": "m"}


def _engine_request(extra, ids):
    from vllm import SamplingParams

    return SimpleNamespace(sampling_params=SamplingParams(extra_args=extra), prompt_token_ids=ids)


def test_gate_drops_a_forged_scope_and_keeps_a_clients_spans(tok):
    pytest.importorskip("vllm")
    request = _engine_request({SCOPE: "victim", SPANS: [[0, 2]], "k": 1}, [1, 2, 3])
    _gate(SimpleNamespace(tokenizer=tok), request)
    assert request.sampling_params.extra_args == {SPANS: [[0, 2]], "k": 1}
    forged_ref = _engine_request({REF_KEY: "0" * 32, SCOPE: "victim"}, [1, 2, 3])
    _gate(SimpleNamespace(tokenizer=tok), forged_ref)
    assert forged_ref.sampling_params.extra_args is None
    plain = _engine_request({"k": 1}, [1])
    before = plain.sampling_params.extra_args
    _gate(SimpleNamespace(tokenizer=tok), plain)
    assert plain.sampling_params.extra_args is before  # untouched


def test_gate_sets_spans_and_scope_of_a_planned_request(tok):
    pytest.importorskip("vllm")
    pipe = ContextPipeline(Config())
    messages, prep, plan = _chat_plan(pipe, BLOCKS[:2], SUFFIX[:1])
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    xargs = attach(plan, {SCOPE: "forged", SPANS: [[0, 1]], "k": 1})
    assert SCOPE not in xargs and SPANS not in xargs and REF_KEY in xargs
    # the engine got vLLM's own ids (no cut): blocks located where they are intact
    whole = _enc(tok)(text)
    request = _engine_request(dict(xargs), whole)
    _gate(SimpleNamespace(tokenizer=tok), request)
    extra = request.sampling_params.extra_args
    assert extra[SCOPE] == "tenant-a" and extra["k"] == 1 and REF_KEY not in extra
    shown = [BLOCKS[i] for i in prep.order] + SUFFIX[:1]
    for s, e in extra.get(SPANS, []):
        assert _enc(tok)(tok.decode(whole[s:e])) == whole[s:e] and tok.decode(whole[s:e]) in shown
    # the plan is used once: the same reference again carries nothing
    again = _engine_request(dict(xargs), whole)
    _gate(SimpleNamespace(tokenizer=tok), again)
    assert SCOPE not in again.sampling_params.extra_args


def test_blend_off_plans_nothing_and_changes_nothing(monkeypatch):
    from cp_engine.hooks import runtime

    monkeypatch.setenv("CP_ENGINE_BLEND", "0")
    runtime.reset_for_tests()
    try:
        plan = blend_spans.make_plan([suffix_anchor(["m"])], "t")
        assert plan is None
        xargs = {"cp_path": ["00"], "k": 1}
        assert attach(None, xargs) == xargs
        monkeypatch.setenv("CP_ENGINE_BLEND", "1")
        runtime.reset_for_tests()
        assert blend_spans.make_plan([suffix_anchor(["m"])], "t") is not None
        assert blend_spans.make_plan([suffix_anchor([])], "t") is None  # no block: no plan
    finally:
        runtime.reset_for_tests()


def test_keep_order_in_a_conversation_keeps_dedup_and_drops_the_annotation():
    pipe = ContextPipeline(Config())
    pipe.record("r0", pipe.prepare(["b doc", "a doc"]))
    first = [{"role": "user", "content": "q1"}]
    _, prep1 = pipe.rewrite_messages(first, ["a doc", "b doc"], conversation_id="c", keep_order=True)
    assert prep1.order == [0, 1] and "Most relevant" not in prep1.context_text
    pipe.commit("r1", prep1)
    second = first + [{"role": "assistant", "content": "x"}, {"role": "user", "content": "q2"}]
    _, prep2 = pipe.rewrite_messages(second, ["b doc", "c doc"], conversation_id="c", keep_order=True)
    assert prep2.order == [0, 1] and prep2.full == [False, True]  # "b doc" was sent: a reference
    assert "(shown above)" in prep2.context_text and "Most relevant" not in prep2.context_text
    anchor = context_anchor(prep2.context_text, prep2.order, prep2.full, ["b doc", "c doc"])
    assert [anchor.text[s:e] for s, e in anchor.ranges] == ["c doc"]
