"""The live blend benchmarks' engine-free parts: prompt rendering and spans, send
rounds, /metrics deltas, the span wire forms, server plans, and the quality sweep's
orders, F1 and paired intervals. No server runs."""
from __future__ import annotations

import argparse
import random

import pytest

from benchmarks.blend import bench_blend_engine as eng
from benchmarks.blend import bench_blend_quality as qual
from benchmarks.blend.prompts import Tokenizer, agent_prompts, block_segments, rounds, waves
from benchmarks.blend.server_io import Server, TokenRequest, computed_tokens, counters, delta, span_xargs
from cp_engine.request_hints import read_spans


@pytest.fixture(scope="module")
def tok():
    from cp_engine.devtools.vllm_server import tiny_model_dir

    return Tokenizer(tiny_model_dir())


# ---------------------------------------------------------------- prompts and spans

def test_every_block_occurrence_is_marked_and_the_rest_is_kept():
    text = "Sys. alpha beta. Then gamma. alpha beta. End"
    segs = block_segments(text, ["alpha beta.", "gamma."])
    assert "".join(s.text for s in segs) == text
    assert [s.text for s in segs if s.block] == ["alpha beta.", "gamma.", "alpha beta."]


def test_spans_point_exactly_at_each_blocks_own_ids(tok):
    blocks = ["The river Avon flows through Bath.", "abc", "def ghi", "Bath has Roman baths  "]
    msgs = [{"role": "system", "content": "Answer."},
            {"role": "user", "content": "\n\n".join(blocks) + "\n\nWhere?"}]
    r = tok.blocks(msgs, blocks)
    assert len(r.spans) == len(blocks)
    for (s, e), b in zip(r.spans, blocks):
        assert r.ids[s:e] == tok.encode(b)  # the block's ids wherever it sits
    # the text is kept whole: decoding the ids gives the rendered prompt back
    assert tok.tok.decode(r.ids) == tok.text(msgs)
    # and the hint reader accepts these spans as sent
    assert read_spans({"cp_spans": span_xargs(r.spans)}, len(r.ids)) == tuple(r.spans)


def test_agent_prompts_mark_the_suffix_not_the_dynamic_segment(tok):
    w = agent_prompts(3, 4, width=2)
    assert len(w["plain"]) == 12 and w["prefix"] is None
    msgs, suffix = w["plain"][5]
    content = msgs[-1]["content"]
    state, memory = content.split("Memory and history:\n")
    assert all(b in memory for b in suffix) and not any(b in state for b in suffix)
    r = tok.blocks(msgs, suffix)
    assert [tok.tok.decode(r.ids[s:e]) for s, e in r.spans] == list(suffix)
    # the suffix keeps its order and grows by one block a turn within a session
    by_session = {}
    for (s, t), (_, sfx) in zip(w["order"], w["plain"]):
        by_session.setdefault(s, []).append(sfx)
    for turns in by_session.values():
        for a, b in zip(turns, turns[1:]):
            assert b[:len(a)] == a and len(b) == len(a) + 1


def test_rounds_keep_each_sessions_turns_in_order_and_apart():
    rng = random.Random(3)
    sessions = [[None] * rng.randint(1, 6) for _ in range(11)]
    order = waves(sessions, 4)
    assert sorted(order) == sorted((s, t) for s, ts in enumerate(sessions) for t in range(len(ts)))
    rs = rounds(order)
    assert [i for r in rs for i in r] == list(range(len(order)))
    where = {}
    for k, r in enumerate(rs):
        assert len({order[i][0] for i in r}) == len(r)  # a session at most once per round
        for i in r:
            where[order[i]] = k
    for (s, t), k in where.items():
        if t:
            assert where[(s, t - 1)] < k


# ---------------------------------------------------------------- metrics and the wire

METRICS_BEFORE = """# HELP vllm:prompt_tokens_by_source_total Number of prompt tokens by source.
vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="local_compute"} 100.0
vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="local_cache_hit"} 50.0
vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="external_kv_transfer"} 0.0
vllm:prompt_tokens_total{engine="0",model_name="m"} 150.0
vllm:request_prefill_time_seconds_sum{engine="0",model_name="m"} 1.5
"""
METRICS_AFTER = """vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="local_compute"} 400.0
vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="local_cache_hit"} 50.0
vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="external_kv_transfer"} 900.0
vllm:prompt_tokens_total{engine="0",model_name="m"} 1350.0
vllm:request_prefill_time_seconds_sum{engine="0",model_name="m"} 4.0
cp_engine_blend_recomputed_tokens_total 120.5
cp_engine_blend_hits_total 7
cp_engine_blend_fallbacks_total{reason="step_cap"} 2
cp_engine_blend_fallbacks_total{reason="no_full_block"} 1
"""


def test_metric_deltas_give_vllms_uncached_plus_blends_recomputed_tokens():
    d = delta(counters(METRICS_BEFORE), counters(METRICS_AFTER))
    assert d["local_compute"] == 300 and d["external"] == 900 and d["prompt"] == 1200
    assert d["blend_recomputed"] == 120.5 and d["blend_hits"] == 7
    assert d["prefill_s"] == pytest.approx(2.5)
    assert computed_tokens(d) == 420.5
    assert d["blend:cp_engine_blend_fallbacks"] == 3  # labelled samples summed by name


def test_counters_read_names_without_the_total_suffix_and_missing_ones_as_zero():
    c = counters('vllm:prompt_tokens_by_source{source="local_compute"} 12\n')
    assert c["local_compute"] == 12 and c["blend_recomputed"] == 0


def test_span_wire_forms_and_the_request_body():
    spans = [(3, 9), (9, 20)]
    assert span_xargs(spans, "pairs") == [[3, 9], [9, 20]]
    assert span_xargs(spans, "flat") == [3, 9, 9, 20]
    with pytest.raises(ValueError):
        span_xargs(spans, "csv")
    srv = Server("http://h:1/", "m")
    body = srv.body(TokenRequest([1, 2, 3], spans, "salt-1", 0, {"x": 1}), 4)
    assert body == {"model": "m", "prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0.0,
                    "vllm_xargs": {"x": 1, "cp_spans": [[3, 9], [9, 20]]}, "cache_salt": "salt-1"}
    plain = srv.body(TokenRequest([1, 2]), 1)
    assert "vllm_xargs" not in plain and "cache_salt" not in plain


def _engine_args(**kw):
    base = dict(arms=list(eng.BASE_ARMS), ratios=[0.0, 0.15], mode=None, ratio_xarg=None, store_depths=[0])
    base.update(kw)
    return argparse.Namespace(**base)


def test_engine_server_plan_one_server_per_ratio_each_with_its_plain_clock():
    plans = eng.server_plan(_engine_args())
    assert [p["env"]["CP_ENGINE_BLEND_RATIO"] for p in plans] == ["0", "0.15"]
    assert plans[0]["arms"] == ["plain", "prefix", "blend-order", "blend-aligned"]
    assert plans[1]["arms"] == ["plain", "blend-order", "blend-aligned"]
    one = eng.server_plan(_engine_args(ratio_xarg="cp_blend_ratio", mode="deviation"))
    assert len(one) == 1 and one[0]["ratios"] == [0.0, 0.15]
    assert one[0]["env"] == {"CP_ENGINE_BLEND": "1", "CP_ENGINE_BLEND_MODE": "deviation",
                             "CP_ENGINE_BLEND_STORE_DEPTH": "0"}  # named even at 0: the flag's default is 8
    deep = eng.server_plan(_engine_args(ratio_xarg="cp_blend_ratio", store_depths=[0, 2]))
    assert deep[0]["env"] == {"CP_ENGINE_BLEND": "1", "CP_ENGINE_BLEND_STORE_DEPTH": "2"}


def test_arm_labels_name_the_store_depth_only_when_it_is_not_zero():
    assert eng.arm_label({"arm": "plain", "ratio": None}) == "plain"
    assert eng.arm_label({"arm": "blend-order", "ratio": 0.05, "store_depth": 0}) == "blend-order@0.05"
    assert eng.arm_label({"arm": "blend-order", "ratio": 0.0, "store_depth": 1}) == "blend-order@0 d1"


def test_engine_summary_ratios_against_plain_and_the_same_servers_clock():
    data = {"workloads": [{"name": "w", "kind": "rag", "arms": [
        {"arm": "plain", "server": "A", "computed_tokens": 1000, "wall_s": 10.0, "prefill_sum_s": 8.0, "ratio": None},
        {"arm": "plain", "server": "B", "computed_tokens": 1000, "wall_s": 12.0, "prefill_sum_s": 9.0, "ratio": None},
        {"arm": "blend-order", "server": "B", "computed_tokens": 250, "wall_s": 4.0, "prefill_sum_s": 3.0,
         "ratio": 0.0}]}]}
    eng.summarize(data)
    blend = data["workloads"][0]["arms"][2]
    assert blend["plain_over_arm"] == 4.0
    assert blend["wall_plain_over_arm"] == 3.0 and blend["prefill_plain_over_arm"] == 3.0
    (t,) = eng.targets(data)
    assert t["best"] == 4.0 and t["goal"] == 3.0 and t["arm"] == "blend-order@0"


def test_interleaved_rounds_run_every_arm_once_per_round_odd_rounds_reversed():
    plan = {"arms": ["plain", "blend-order"], "ratios": [0.0, 0.15]}
    runs = eng.interleaved(plan, [0, 8], 3)
    one = [("plain", None, 0, None), ("blend-order", 0.0, 0, None), ("blend-order", 0.0, 8, None),
           ("blend-order", 0.15, 0, None), ("blend-order", 0.15, 8, None)]
    assert [r[1:] for r in runs] == one + one[::-1] + one
    assert [r[0] for r in runs] == [0] * 5 + [1] * 5 + [2] * 5
    assert eng.interleaved(plan, [0], 0) == eng.interleaved(plan, [0], 1)
    # a carry setting per blend run; plain is run once
    runs = eng.interleaved({"arms": ["plain", "blend-order"], "ratios": [0.05]}, [8], 1, [True, False])
    assert [r[1:] for r in runs] == [("plain", None, 0, None), ("blend-order", 0.05, 8, True),
                                     ("blend-order", 0.05, 8, False)]
    assert eng.arm_label({"arm": "blend-order", "ratio": 0.05, "store_depth": 8, "carry": False}) == \
        "blend-order@0.05 d8 no-carry"


def test_wall_ratios_use_the_plain_arm_of_the_same_round_and_report_the_median():
    def arm(name, rnd, wall):
        return {"arm": name, "server": "S", "computed_tokens": 100 if name == "plain" else 40,
                "prompt_tokens": 100, "blend_recomputed": 0, "blend_hits": 0, "wall_s": wall, "prefill_sum_s": 0.0, "ratio": None if name == "plain" else 0.15, "round": rnd}
    data = {"repeats": 3, "model": "m", "note": "", "workloads": [{"name": "w", "kind": "rag", "arms": [
        arm("plain", 0, 10.0), arm("blend-order", 0, 5.0),
        arm("blend-order", 1, 4.0), arm("plain", 1, 12.0),  # a slower round: its own clock
        arm("plain", 2, 9.0), arm("blend-order", 2, 9.0)]}]}
    eng.summarize(data)
    walls = [a["wall_plain_over_arm"] for a in data["workloads"][0]["arms"] if a["arm"] != "plain"]
    assert walls == [2.0, 3.0, 1.0]
    assert list(data["workloads"][0]["wall_rounds"]) == ["blend-order@0.15 [S]"]  # the clock is not an arm
    rounds = data["workloads"][0]["wall_rounds"]["blend-order@0.15 [S]"]
    assert rounds == {"rounds": 3, "median": 2.0, "min": 1.0, "max": 3.0}
    text = eng.table(data)
    assert "S, round 2" in text and "median 2.00× over 3 rounds" in text


# ---------------------------------------------------------------- quality sweep

def test_measured_order_is_a_seeded_permutation_that_moves_the_first_document():
    for i in range(50):
        o = qual.measured_order(10, 0, i)
        assert sorted(o) == list(range(10)) and o[0] != 0
        assert o == qual.measured_order(10, 0, i)
    assert qual.measured_order(1, 0, 0) == [0]
    assert len({tuple(qual.measured_order(10, 0, i)) for i in range(20)}) > 1


def test_f1_and_paired_interval_against_plain():
    f1, preds = qual.score(["Answer: Paris.", "no", "the Beatles"], ["Paris", "yes", "Beatles"])
    assert preds == ["Paris", "no", "the Beatles"] and f1 == [1.0, 0.0, 1.0]
    plain = {"ids": [0, 1, 2, 3], "f1": [1.0, 0.0, 1.0, 0.5], "computed_tokens": 400, "prompt_tokens": 400}
    worse = {"ids": [0, 1, 2, 3], "f1": [0.0, 0.0, 1.0, 0.5], "computed_tokens": 100, "prompt_tokens": 400}
    rows = {r["arm"]: r for r in qual.summarize({"plain": plain, "blend@0": worse, "same": dict(plain)})}
    assert rows["blend@0"]["df1_vs_plain"][0] == -25.0 and rows["blend@0"]["paired_n"] == 4
    lo, hi = rows["blend@0"]["df1_vs_plain"][1:]
    assert lo <= -25.0 <= hi and hi <= 0.0
    assert rows["same"]["df1_vs_plain"] == [0.0, 0.0, 0.0]
    assert rows["blend@0"]["computed_plain_over_arm"] == 4.0
    assert "df1_vs_plain" not in rows["plain"]


def test_quality_arms_in_priority_order_and_their_per_request_settings():
    arms = qual.default_arms([0.0, 0.05, 0.15, 1.0], ["first_tokens", "deviation"], 0.15, 0.15)
    assert arms == ["plain", "blend@0.15", "blend@1", "blend@0", "prefix", "peer", "blend@0.05",
                    "first_tokens@0.15", "deviation@0.15"]
    assert qual.arm_xargs("plain") is None and qual.arm_xargs("prefix") is None
    assert qual.arm_xargs("blend@0.05") == {"cp_blend_ratio": 0.05, "cp_blend_mode": "both", "cp_blend_store_depth": 0}
    assert qual.arm_xargs("deviation@0.15") == {"cp_blend_ratio": 0.15, "cp_blend_mode": "deviation",
                                                "cp_blend_store_depth": 0}
    assert qual.arm_xargs("blend@0.05:d2") == {"cp_blend_ratio": 0.05, "cp_blend_mode": "both",
                                               "cp_blend_store_depth": 2}
    assert [qual.store_depth(a) for a in ("plain", "blend@0", "blend@0:d1", "blend@0.15:d3")] == [0, 0, 1, 3]
    assert qual.arm_xargs("blend@0.05:d8:nocarry") == {"cp_blend_ratio": 0.05, "cp_blend_mode": "both",
                                                       "cp_blend_store_depth": 8, "cp_blend_carry": False}
    assert qual.store_depth("blend@0.05:nocarry") == 0
    assert qual.arm_xargs("blend@0.05:d8:carry")["cp_blend_carry"] is True
    from cp_engine.blend.settings import check_settings

    for arm in arms + ["blend@0.05:nocarry", "blend@0:d2:nocarry"]:
        check_settings(qual.arm_xargs(arm))  # every arm's settings pass the server's check


def test_the_suffix_layout_moves_every_document_and_carries_all_but_the_first(tok):
    from types import SimpleNamespace

    from cp_engine.blend.leads import lead_digests
    from cp_engine.blend.plan import plan_reuse

    texts = {i: f"Paragraph {i} is about the town number {i} and its river." for i in range(12)}
    wl = SimpleNamespace(meta={"answers": ["a", "b", "c"]}, queries=["Where?", "Who?", "When?"],
                         texts=texts, contexts=[[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]])
    qs = qual.Questions(wl, tok, layout="suffix")
    assert qs.shuffled == qs.docs  # the order holds in both passes
    assert qual.chunk_prompts(qs, "prefix", [0]) == (None, None) and qual.chunk_prompts(qs, "peer", [0]) == (None, None)
    for i in range(3):
        warm, measured = qs.warm[i], qs.measured[i]
        assert [warm.ids[s:e] for s, e in warm.spans] == [measured.ids[s:e] for s, e in measured.spans]
        assert warm.spans[0][0] != measured.spans[0][0]  # shifted by the state's new length
        stored = {tuple(warm.ids[s:e]): lead for (s, e), lead in zip(warm.spans, lead_digests(warm.ids, warm.spans))}
        plan = plan_reuse(measured.ids, measured.spans, 0, 16, stored.__contains__, ratio=0.05,
                          key_of=tuple, lead_of=stored.get)
        assert [b.carried for b in plan.blocks] == [False, True, True, True]
    assert qual.state_docs(qs.docs, 0, 1, 3) == [texts[8], texts[9], texts[10]]
    with pytest.raises(ValueError):
        qual.Questions(wl, tok, layout="sideways")


def test_every_arms_cache_salt_passes_vllms_own_check_and_is_fresh():
    protocol = pytest.importorskip("vllm.entrypoints.generate.base.protocol")
    arms = qual.default_arms([0.0, 0.15, 1.0], ["first_tokens", "deviation"], 0.15, 0.15) + ["x" * 300, "a/b\\c\0d"]
    for arm in arms:
        protocol.validate_cache_salt(qual.arm_salt(arm))
    assert qual.arm_salt("blend@0.15") != qual.arm_salt("blend@0.15")
    assert qual.arm_salt("blend@0.15") != qual.arm_salt("blend@1")


def test_chunks_merge_per_question_and_plain_over_arm_uses_the_chunks_both_ran():
    arms: dict = {}
    row = lambda ids, f1, computed: {"ids": ids, "f1": f1, "predictions": ["x"] * len(ids),  # noqa: E731
                                     "computed_tokens": computed, "prompt_tokens": 100 * len(ids)}
    qual.add_chunk(arms, "plain", 0, row([0, 1], [1.0, 0.0], 200))
    qual.add_chunk(arms, "plain", 1, row([2, 3], [1.0, 1.0], 200))
    qual.add_chunk(arms, "blend@0", 0, row([0, 1], [1.0, 1.0], 50))
    assert arms["plain"]["ids"] == [0, 1, 2, 3] and set(arms["plain"]["chunks"]) == {"0", "1"}
    rows = {r["arm"]: r for r in qual.summarize(arms)}
    assert rows["plain"]["computed_tokens"] == 400 and rows["plain"]["computed_per_question"] == 100
    assert rows["blend@0"]["computed_plain_over_arm"] == 4.0  # chunk 0 only: 200 / 50
    assert rows["blend@0"]["paired_n"] == 2 and rows["blend@0"]["df1_vs_plain"][0] == 50.0


def test_the_flat_wire_form_reads_back_as_the_same_spans():
    spans = [(3, 9), (9, 20), (25, 26)]
    assert read_spans({"cp_spans": span_xargs(spans, "flat")}, 30) == tuple(spans)
    assert read_spans({"cp_spans": [3, 9, 9]}, 30) is None  # odd length: not pairs
    assert read_spans({"cp_spans": [9, 3]}, 30) is None  # an empty or reversed span stays refused


def test_quality_note_names_only_the_arms_that_ran():
    from benchmarks.blend.bench_blend_quality import run_note

    note = run_note({"plain": {}, "blend@0.15": {}}, 0.15, have_peer=True)
    assert "mode arms" not in note and "peer ran" not in note and "peer available, not run" in note
    assert note.endswith("arms run: plain, blend@0.15.")
    note = run_note({"plain": {}, "peer": {}, "deviation@0.15": {}}, 0.15, have_peer=True)
    assert "mode arms at ratio 0.15" in note and "peer ran" in note


def test_a_depth_arm_primes_a_chain_that_stitches_each_primer_and_puts_the_documents_last():
    class BlocksOnly:  # a tokenizer stand-in: a prompt is just its blocks
        def blocks(self, messages, blocks):
            return list(blocks)

    class Chunk:
        docs = [["a", "b"], ["b", "c"], ["d", "e"], ["f", "a"], ["g", "h"]]
        qs = [f"q{i}" for i in range(5)]
        system, tok = "S", BlocksOnly()

        def __len__(self):
            return len(self.docs)

    qs = Chunk()
    # chunk [0, 1] retrieved a, b, c: the primers come from later questions, skipping those
    assert qual.primer_docs(qs, [0, 1], 3) == ["d", "e", "f"]
    chain, warm = qual.primed_warm(qs, [0, 1], 2)
    assert chain == [["d", "e"], ["e", "f"]]  # F=d, P0=e stored exactly; P0 stitched, P1=f stored at depth 1
    assert warm == [["f", "a", "b"], ["f", "b", "c"]]  # each question's documents behind the last primer
    chain1, warm1 = qual.primed_warm(qs, [0, 1], 1)
    assert chain1 == [["d", "e"]] and warm1 == [["e", "a", "b"], ["e", "b", "c"]]
    with pytest.raises(ValueError):
        qual.primer_docs(qs, [0, 1, 2, 3, 4], 1)
