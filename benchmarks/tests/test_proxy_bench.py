"""The proxy benchmarks' own logic, without servers: workloads, log and metric parsing,
the comparisons and tables written into the results."""
from __future__ import annotations

from benchmarks.proxy import llamacpp, vllm_ab
from benchmarks.proxy.llama_server import parse_processed

# Lines as llama.cpp (llama-context.cpp) and llama-cpp-python (llama.py) print them.
LOG = """Llama.generate: 212 prefix-match hit, remaining 37 prompt tokens to eval
llama_perf_context_print:        load time =     151.27 ms
llama_perf_context_print: prompt eval time =      88.50 ms /    37 tokens (    2.39 ms per token,   418.08 tokens per second)
llama_perf_context_print:        eval time =      30.02 ms /     3 runs   (   10.01 ms per token,    99.93 tokens per second)
"""


def test_parse_processed_reads_llamacpps_counts():
    assert parse_processed(LOG) == (37, 212, 88.5)
    no_hit = LOG.splitlines(keepends=True)[1:]
    assert parse_processed("".join(no_hit)) == (37, 0, 88.5)  # no prefix line: nothing reused
    assert parse_processed("Llama.generate: 5 prefix-match hit\n") is None  # not finished yet


def test_overlap_sequence_changes_order_always_and_members_every_second_request():
    seq = llamacpp.overlap_sequence(12, 5, 12, seed=3)
    assert len(seq) == 12 and all(len(blocks) == 5 and len(set(blocks)) == 5 for blocks, _ in seq)
    for t in range(1, 12):
        prev, cur = seq[t - 1][0], seq[t][0]
        assert len(set(prev) - set(cur)) == (1 if t % 2 == 0 else 0)
    assert sum(seq[t - 1][0] != seq[t][0] for t in range(1, 12)) >= 10  # reordered (a shuffle may repeat)
    assert seq == llamacpp.overlap_sequence(12, 5, 12, seed=3)


def test_chat_body_marks_or_renders_blocks():
    marked = llamacpp.chat_body("m", ["a doc", "b doc"], "Q?", True, 4)
    assert marked["context_blocks"] == ["a doc", "b doc"] and marked["messages"][-1]["content"] == "Q?"
    plain = llamacpp.chat_body("m", ["a doc", "b doc"], "Q?", False, 4)
    assert "context_blocks" not in plain
    text = plain["messages"][-1]["content"]
    assert text.index("a doc") < text.index("b doc") < text.index("Q?")


def test_llamacpp_table_and_ratio():
    arm = lambda ev, ms: {"requests": 2, "prompt_tokens": 1000, "evaluated_tokens": ev, "reused_tokens": 1000 - ev,
                          "prompt_eval_ms": ms, "per_request": [{"evaluated": ev // 2}] * 2}
    doc = {"config": {"llama_cpp_python": "0.3.36", "model": "m.gguf", "requests": 2, "k": 5, "pool": 12,
                      "upstream_cache_tokens": 1000}, "arms": {"direct": arm(900, 900.0), "proxy": arm(300, 300.0)}}
    llamacpp.summarize(doc)
    assert doc["direct_over_proxy"] == {"evaluated_tokens": 3.0, "prompt_eval_ms": 3.0}
    text = llamacpp.table(doc)
    assert "| proxy | 2 | 1,000 | 300 | 700 | 300 |" in text and "3.00×" in text


def test_kv_cache_tokens_from_vllms_cache_config_info():
    text = ('# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n'
            'vllm:cache_config_info{block_size="128",cache_dtype="auto",num_gpu_blocks="4096"} 1.0\n')
    assert vllm_ab.kv_cache_tokens(text) == 4096 * 128


def test_vllm_ab_gap_against_the_plugin():
    arm = lambda rec: {"prompt_tokens": 1000, "cached_tokens": 1000 - rec, "recomputed_tokens": rec,
                       "hit_ratio": 0.1, "wall_s": 1.0}
    doc = {"workload": "w", "bound_tokens": 0.4, "config": {"model_name": "tiny", "concurrency": 8, "vllm": "x"},
           "arms": {"off": arm(1000), "proxy": arm(820), "on": arm(800)}}
    vllm_ab.summarize(doc)
    assert doc["proxy_vs_on"] == {"recomputed_gap": 0.025, "within_target": True}
    assert doc["arms"]["proxy"]["recomputed_off_over_arm"] == 1.22
    assert "+2.50% (within the ±5% target)" in vllm_ab.table(doc)
    doc["arms"]["proxy"] = arm(900)
    vllm_ab.summarize(doc)
    assert doc["proxy_vs_on"]["within_target"] is False
