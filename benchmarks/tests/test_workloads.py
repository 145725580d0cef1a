"""Benchmark workload builders and baselines: deterministic, respect k, correct bound."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks.common import workloads as W
from benchmarks.planner.baselines import arrival, greedy_trie


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    # Builders cache on disk: point them at a temp dir so tests never read stale files.
    monkeypatch.setattr(W, "CACHE", tmp_path)


def test_synthetic_is_deterministic_and_prefix_stable():
    a = W.synthetic(60, corpus=200, seed=3)
    W.CACHE.joinpath(next(p.name for p in W.CACHE.iterdir())).unlink()  # force a rebuild
    b = W.synthetic(60, corpus=200, seed=3)
    assert a.contexts == b.contexts
    # Request i does not depend on N, so smaller N is a prefix of larger N.
    assert W.synthetic(20, corpus=200, seed=3).contexts == a.contexts[:20]
    assert W.synthetic(60, corpus=200, seed=4).contexts != a.contexts


def test_synthetic_respects_k_and_corpus():
    wl = W.synthetic(200, corpus=50, k_min=3, k_max=7, seed=1)
    sizes = {len(c) for c in wl.contexts}
    assert sizes <= set(range(3, 8)) and len(sizes) > 1
    for ctx in wl.contexts:
        assert len(set(ctx)) == len(ctx), "blocks within a request are distinct"
        assert all(0 <= b < 50 for b in ctx)


def test_synthetic_popularity_is_skewed():
    wl = W.synthetic(400, corpus=500, seed=0)
    counts = sorted((sum(b in c for c in wl.contexts) for b in range(500)), reverse=True)
    # Zipf s=1: the most popular doc appears far more often than the median one.
    assert counts[0] > 10 * max(1, counts[250])


def test_synthetic_rejects_bad_k():
    with pytest.raises(ValueError):
        W.synthetic(5, corpus=10, k_min=5, k_max=11)


def test_bound_counts_unique_over_total():
    ctxs = [[1, 2, 3], [2, 3, 4], [1]]
    assert W.bound(ctxs) == pytest.approx(1 - 4 / 7)
    # Token-weighted: block 4 is heavy, so the bound drops.
    assert W.bound(ctxs, {1: 1, 2: 1, 3: 1, 4: 10}) == pytest.approx(1 - 13 / 16)
    assert W.bound([]) == 0.0
    wl = W.Workload("t", ctxs, tokens={1: 2, 2: 2, 3: 2, 4: 2})
    assert wl.bound() == wl.bound(weighted=True) == pytest.approx(1 - 4 / 7)
    assert wl.summary()["unique_blocks"] == 4


def test_session_dedup_bound():
    ctxs = [[1, 2], [2, 3], [1, 4], [5]]
    # Session 0 = requests 0,1 (block 2 repeats), session 1 = requests 2,3 (nothing repeats).
    assert W.session_dedup_bound(ctxs, [[0, 1], [2, 3]]) == pytest.approx(1 / 7)


def test_dump_writes_list_of_int_lists(tmp_path):
    wl = W.synthetic(10, corpus=40, seed=0)
    data = json.loads(W.dump(wl).read_text())
    assert data == wl.contexts and all(isinstance(b, int) for c in data for b in c)


@pytest.mark.parametrize("planner", [arrival, greedy_trie])
def test_baselines_return_valid_plans(planner):
    ctxs = W.synthetic(80, corpus=60, seed=2).contexts + [[], [7, 7, 8]]
    plan = planner(ctxs)
    assert sorted(plan.order) == list(range(len(ctxs)))
    for i, ctx in enumerate(ctxs):
        assert sorted(plan.contexts[i]) == sorted(ctx)


def test_greedy_shares_the_most_frequent_block_first():
    plan = greedy_trie([[1, 2, 3], [3, 4], [5, 3], [9]])
    assert [plan.contexts[i][0] for i in range(3)] == [3, 3, 3]
    # Depth-first: the three requests under block 3 run back to back.
    pos = {r: k for k, r in enumerate(plan.order)}
    assert sorted(pos[r] for r in range(3)) in ([0, 1, 2], [1, 2, 3])


def test_greedy_beats_arrival_in_simulation():
    from cp_engine.sim import simulate

    ctxs = W.synthetic(150, corpus=300, seed=5).contexts
    g, a = greedy_trie(ctxs), arrival(ctxs)
    hit = lambda p: simulate([p.contexts[i] for i in p.order]).hit_ratio  # noqa: E731
    assert hit(g) > hit(a)


# bm25s imports numba, whose llvmlite objects make vLLM's Triton kernel registration
# (a scan of every module in sys.modules) raise in any later test of the same process:
# the HotpotQA builder runs in a child interpreter.
_CHILD = "CP_TEST_WORKLOADS_CHILD"


def _ran_in_child(request) -> bool:
    """In the parent: run this test again in a child interpreter (passing or skipping as
    it does) and return True; in the child, False (the test goes on)."""
    if os.environ.get(_CHILD):
        return False
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                           f"{__file__}::{request.node.name}"], env={**os.environ, _CHILD: "1"},
                          cwd=request.config.rootpath, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    if " skipped" in proc.stdout:
        pytest.skip(f"in the child interpreter: {proc.stdout.strip().splitlines()[-1]}")
    return True


def test_hotpotqa_builder(monkeypatch, request):
    real_cache = request.config.rootpath / "benchmarks" / ".cache"
    if not (real_cache / "lce" / W.HOTPOT_MEMBER).exists():
        pytest.skip("HotpotQA not fetched (python -m benchmarks.common.workloads fetches it)")
    if _ran_in_child(request):
        return
    pytest.importorskip("bm25s")
    monkeypatch.setattr(W, "CACHE", real_cache)  # reuse the fetched data and its BM25 cache
    wl = W.hotpotqa(30, k=4, seed=0)
    assert len(wl.contexts) == 30 and all(len(c) == 4 == len(set(c)) for c in wl.contexts)
    assert all(b in wl.texts and wl.tokens[b] >= 1 for c in wl.contexts for b in c)
    assert W.hotpotqa(30, k=4, seed=0).contexts == wl.contexts
    assert 0.0 <= wl.bound() < 1.0
    chat = W.memory_chat(sessions=3, turns=(2, 3), k=4, seed=0)
    assert len(chat.sessions) == 3 and all(2 <= len(s) <= 3 for s in chat.sessions)
    assert sorted(i for s in chat.sessions for i in s) == list(range(len(chat.contexts)))
    # Turns of one session retrieve overlapping paragraphs: that is what dedup removes.
    assert chat.meta["dedup_bound"] > 0
    assert chat.meta["dedup_bound"] == pytest.approx(W.session_dedup_bound(chat.contexts, chat.sessions), abs=1e-4)


def test_squad_builder(monkeypatch, request):
    real_cache = request.config.rootpath / "benchmarks" / ".cache"
    if not (real_cache / "lce" / W.SQUAD_MEMBER).exists():
        pytest.skip("SQuAD not fetched (W.squad fetches it with pip)")
    if _ran_in_child(request):  # bm25s in a child interpreter, as for HotpotQA
        return
    pytest.importorskip("bm25s")
    tmp = W.CACHE  # the test's private cache (no stale retrieval), the fetched data linked in
    (tmp / "lce").symlink_to(real_cache / "lce")
    wl = W.squad(300, k=5, seed=0)
    assert len(wl.contexts) == 300 and all(len(c) == 5 == len(set(c)) for c in wl.contexts)
    assert wl.meta["corpus_size"] == 1204 and len(wl.meta["answers"]) == 300
    assert all(b in wl.texts and wl.tokens[b] >= 1 for c in wl.contexts for b in c)
    assert W.squad(300, k=5, seed=0).contexts == wl.contexts  # from the cache
    assert W.squad(300, k=5, seed=1).contexts != wl.contexts
    # A small corpus asked about again and again: blocks recur across requests.
    assert wl.bound() > 0.3
    with pytest.raises(ValueError, match="11,873|11873"):
        W.squad(20_000, k=5, seed=9)
