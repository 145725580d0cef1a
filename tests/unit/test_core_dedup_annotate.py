"""Dedup, annotation and the online pipeline: properties that must always hold."""
import pytest
from hypothesis import given, settings, strategies as st

from cp_engine.annotate import (ANNOTATION_HEAD, labels_for, numbered_labels, parse_annotation,
                                render_annotation)
from cp_engine.blocks import block_id, short_label
from cp_engine.config import Config
from cp_engine.dedup import Deduplicator
from cp_engine.pipeline import ContextPipeline, InvalidBlocks

words = st.sampled_from(["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"])
block_texts = st.lists(words.map(lambda w: f"Document about {w}."), max_size=10)


@given(st.lists(st.integers(0, 2**64 - 1), max_size=30))
def test_annotation_recovers_original_order(ids):
    labels = labels_for(ids)
    text = "blocks...\n\n" + render_annotation([labels[b] for b in ids]) + "\n\nquestion"
    recovered = parse_annotation(text)
    by_label = {v: k for k, v in labels.items()}
    assert [by_label[lab] for lab in recovered] == list(dict.fromkeys(ids))


@given(st.lists(st.integers(0, 40), max_size=30), st.randoms())
def test_numbered_annotation_recovers_original_order(ids, rnd):
    rendered = list(ids)
    rnd.shuffle(rendered)
    labels = numbered_labels(rendered)
    assert sorted(labels.values(), key=int) == [str(n) for n in range(1, len(set(ids)) + 1)]
    recovered = parse_annotation(render_annotation([labels[b] for b in ids]) + "\n\nquestion 12")
    by_label = {v: k for k, v in labels.items()}
    assert [by_label[lab] for lab in recovered] == list(dict.fromkeys(ids))


def test_labels_lengthen_on_collision():
    a = 0x1234567800000001
    b = 0x1234567800000002
    labels = labels_for([a, b])
    assert labels[a] != labels[b] and len(labels[a]) == 16
    assert labels_for([a])[a] == short_label(a, 4)
    c, d = 0x1234000000000001, 0x1234ffff00000001  # same first 4 hex digits only
    e = 0x5678000000000001
    both = labels_for([c, d, e])
    assert (both[c], both[d], both[e]) == (short_label(c, 8), short_label(d, 8), short_label(e, 4))


def test_rendering_is_compact():
    # Sent on every request and never cached: keep labels and ranking short.
    ids = [block_id(f"block {i}") for i in range(15)]
    labels = labels_for(ids)
    annotation = render_annotation([labels[b] for b in ids])
    assert all(len(lab) == 4 for lab in labels.values())
    assert "[Doc" not in annotation
    assert len(annotation) <= len(ANNOTATION_HEAD) + 2 + 5 * len(ids)
    numbered = render_annotation(list(numbered_labels(ids[::-1]).values()))
    assert len(numbered) <= len(ANNOTATION_HEAD) + 2 + 3 * len(ids)
    p = pipe()
    p.commit(0, p.prepare(["x", "y"]))
    prep = p.prepare(["y", "x"])  # aligned to the recorded order: x first, annotated
    assert prep.context_text == "[1] x\n\n[2] y\n\n" + ANNOTATION_HEAD + " 2 1."


@given(st.lists(st.lists(st.integers(0, 20), max_size=8), max_size=6))
def test_dedup_never_drops_a_first_occurrence(turns):
    d = Deduplicator()
    seen = set()
    for ids in turns:
        flags = d.mark("conv", ids)
        for b, full in zip(ids, flags):
            if b not in seen:
                assert full, "first occurrence replaced by a reference"
                seen.add(b)
            else:
                assert not full


def test_dedup_bounds_and_tenants():
    d = Deduplicator(max_conversations=2, max_blocks=3)
    d.mark(("t1", "c"), [1, 2, 3, 4])
    assert d.mark(("t2", "c"), [1], commit=False) == [True]  # other tenant sees nothing
    assert d.mark(("t1", "c"), [1, 4], commit=False) == [True, False]  # 1 was forgotten (bound 3)
    d.mark(("t1", "x"), [9])
    d.mark(("t1", "y"), [9])
    assert len(d) == 2


def pipe(**cfg):
    return ContextPipeline(Config(**cfg))


@settings(max_examples=50, deadline=None)
@given(st.lists(block_texts, min_size=1, max_size=4))
def test_pipeline_round_trip_multi_turn(turn_blocks):
    """Every block's text is in the prompt the model sees, in full, exactly once per
    conversation; references only point to blocks shown in full earlier; the
    annotation states the original order."""
    p = pipe()
    history = [{"role": "system", "content": "sys"}]
    for t, blocks in enumerate(turn_blocks):
        messages = history + [{"role": "user", "content": f"question {t}"}]
        out, prep = p.rewrite_messages(messages, blocks, conversation_id="c")
        p.commit(("req", t), prep)
        prompt = "\n".join(m["content"] for m in out)
        for text in blocks:
            assert text in prompt
        shown = "\n".join(m["content"] for m in out if m["role"] == "user")
        ids = [block_id(x) for x in blocks]
        labels = labels_for(ids)
        for b in set(ids):
            assert f"[Doc {labels[b]}]\n" in shown  # shown in full somewhere in the prompt
        last = out[-1]["content"]
        if len(set(ids)) > 1 and list(dict.fromkeys(prep.block_ids)) != list(dict.fromkeys(ids)):
            assert parse_annotation(last) == [labels[b] for b in dict.fromkeys(ids)]
        else:  # sent in the original order: nothing to state
            assert parse_annotation(last) == []
        assert sorted(prep.order) == list(range(len(blocks)))
        history = out[:-1] + [messages[-1], {"role": "assistant", "content": f"answer {t}"}]


def test_history_replay_makes_previous_prompt_a_prefix():
    p = pipe()
    m1 = [{"role": "user", "content": "Q1"}]
    out1, prep1 = p.rewrite_messages(m1, ["d1", "d2"], conversation_id="c")
    p.commit(1, prep1)
    m2 = m1 + [{"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
    out2, prep2 = p.rewrite_messages(m2, ["d2", "d3"], conversation_id="c")
    assert out2[0] == out1[0]
    assert prep2.full == [False, True] or prep2.full == [True, False]
    assert prep2.tokens_saved >= 0
    assert "d2" not in out2[-1]["content"].replace("[Doc", "")  # d2's text not repeated


def test_reorder_aligns_with_indexed_prefix():
    p = pipe()
    out1, prep1 = p.rewrite_messages([{"role": "user", "content": "q"}], ["a", "b", "c"])
    p.commit(1, prep1)
    out2, prep2 = p.rewrite_messages([{"role": "user", "content": "q2"}], ["c", "b", "a"])
    assert prep2.block_ids == prep1.block_ids
    ctx1 = prep1.context_text.split(ANNOTATION_HEAD)[0]
    assert out2[0]["content"].startswith(ctx1)


def _popular_first_pipeline():
    """A pipeline whose index has seen "c" often and "a" never: it would move c first."""
    p = pipe()
    for i in range(3):
        _, prep = p.rewrite_messages([{"role": "user", "content": f"warm {i}"}], ["c", f"x{i}"])
        p.commit(f"w{i}", prep)
    return p


def test_turn_after_unshared_history_keeps_retrieval_order_without_annotation():
    p = _popular_first_pipeline()
    first, _ = p.rewrite_messages([{"role": "user", "content": "fresh"}], ["a", "b", "c"])
    assert ANNOTATION_HEAD in first[0]["content"]  # no history: reordered and annotated
    history = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
               {"role": "user", "content": "Q2"}]
    out, prep = p.rewrite_messages(history, ["a", "b", "c"], conversation_id="conv")
    # Nothing was recorded behind this history: reordering cannot create a shared prefix.
    assert prep.order == [0, 1, 2] and not prep.reordered
    assert ANNOTATION_HEAD not in out[-1]["content"]


def test_second_request_behind_the_same_history_is_aligned():
    p = _popular_first_pipeline()
    history = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
               {"role": "user", "content": "Q2"}]
    _, prep1 = p.rewrite_messages(history, ["a", "b", "c"])
    p.commit("fork-1", prep1)
    _, prep2 = p.rewrite_messages(history, ["b", "c", "a"])  # same state, another sample
    assert prep2.block_ids == prep1.block_ids  # aligned to the first fork's path


def test_flags_off_render_plain_and_keep_everything():
    p = pipe(reorder=False, dedup=False, annotate=False)
    out, prep = p.rewrite_messages([{"role": "user", "content": "q"}], ["b", "a", "b"], conversation_id="c")
    assert out[0]["content"] == "b\n\na\n\nb\n\nq"
    assert prep.order == [0, 1, 2]


def test_over_limit_passes_blocks_through_in_order():
    p = pipe(max_blocks_per_request=2)
    out, prep = p.rewrite_messages([{"role": "user", "content": "q"}], ["z", "y", "x"])
    assert out[0]["content"] == "z\n\ny\n\nx\n\nq" and prep.order == [0, 1, 2]


@pytest.mark.parametrize("blocks", [None, "text", [1, 2], ["ok", None], {"a": 1}])
def test_invalid_blocks_raise_clear_error(blocks):
    with pytest.raises(InvalidBlocks, match="context_blocks"):
        pipe().rewrite_messages([{"role": "user", "content": "q"}], blocks)


def test_no_user_message_is_invalid_and_input_not_mutated():
    msgs = [{"role": "system", "content": "s"}]
    with pytest.raises(InvalidBlocks, match="user message"):
        pipe().rewrite_messages(msgs, ["a"])
    user = [{"role": "user", "content": [{"type": "text", "text": "q"}]}]
    out, _ = pipe().rewrite_messages(user, ["a"])
    assert user == [{"role": "user", "content": [{"type": "text", "text": "q"}]}]
    assert out[0]["content"][0]["type"] == "text" and out[0]["content"][1] == {"type": "text", "text": "q"}


def test_eviction_feedback_stops_alignment():
    p = pipe()
    _, prep = p.rewrite_messages([{"role": "user", "content": "q"}], ["a", "b", "c"])
    p.commit("r1", prep)
    p.evict_path(prep.namespace, prep.index_path()[:1])
    assert p.index.match_length(prep.index_path(), prep.namespace) == 0


def test_annotation_only_when_the_order_changed():
    p = pipe()
    out1, prep1 = p.rewrite_messages([{"role": "user", "content": "q"}], ["a", "b", "c"])
    assert prep1.order == [0, 1, 2] and ANNOTATION_HEAD not in out1[0]["content"]
    p.commit(1, prep1)
    out2, prep2 = p.rewrite_messages([{"role": "user", "content": "q2"}], ["c", "b", "a"])
    assert prep2.order != [0, 1, 2] and ANNOTATION_HEAD in out2[0]["content"]


def test_without_annotation_blocks_outside_a_conversation_go_unlabelled():
    p = pipe(annotate=False)
    out, prep = p.rewrite_messages([{"role": "user", "content": "q"}], ["b", "a", "b"])
    text = out[0]["content"]
    # Nothing refers to a label: no labels, and the repeat is left out, not referenced.
    assert "[Doc" not in text and text.count("b") == 1 and text.endswith("\n\nq")
    assert sorted(prep.order) == [0, 1, 2] and prep.token_lengths.count(0) == 1
    assert prep.tokens_saved > 0
    # A conversation keeps labels: a later turn's reference must name the block.
    out, prep = p.rewrite_messages([{"role": "user", "content": "q"}], ["b", "a", "b"], conversation_id="c")
    assert "[Doc" in out[0]["content"] and "(shown above)" in out[0]["content"]


def test_unlabelled_requests_share_prefixes_with_batch_rendering():
    import dataclasses

    from cp_engine.api import render_planned
    cfg = dataclasses.replace(Config(), annotate=False)
    p = ContextPipeline(cfg)
    prep = p.prepare(["a", "b", "c"])
    assert prep.context_text == render_planned(["a", "b", "c"], ["a", "b", "c"], annotate=False) == "a\n\nb\n\nc"
    assert render_planned(["a", "b"], ["b", "a"], annotate=True) == f"[1] b\n\n[2] a\n\n{ANNOTATION_HEAD} 2 1."


@settings(max_examples=60, deadline=None)
@given(block_texts.filter(bool), block_texts.filter(bool),
       st.booleans(), st.booleans())
def test_online_and_batch_renderings_agree_and_share_prefixes(first, second, annotate, reorder):
    """Outside a conversation, a request rendered online and the same order rendered by
    the batch API are the same text, for every flag combination; two requests whose
    rendered orders start with the same distinct blocks render that prefix identically."""
    from cp_engine.api import render_planned
    p = pipe(annotate=annotate, reorder=reorder)
    preps = []
    for blocks in (first, second):
        prep = p.prepare(blocks)
        planned = [blocks[i] for i in prep.order]
        assert prep.context_text == render_planned(blocks, planned, annotate=annotate and reorder)
        p.commit(len(preps), prep)
        preps.append(prep)
    a, b = (list(dict.fromkeys(x.block_ids)) for x in preps)
    common = next((n for n, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    if common:
        shared = preps[0].context_text.split("\n\n")[:common]
        assert preps[1].context_text.split("\n\n")[:common] == shared
