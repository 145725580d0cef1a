"""cp_engine.kernels on the CPU: packing, the NumPy reference against a plain-Python
oracle (hypothesis), tiling paths, bounded memory, and backend selection."""
from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cp_engine.kernels as K
import cp_engine.kernels.reference as R
from cp_engine.kernels import BackendUnavailable, pack_lists, pack_pair, topk_overlap
from kernel_oracle import as_pairs, oracle_partners, oracle_topk, pairs_of

METRICS = ("overlap", "distance")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---------------------------------------------------------------- packing

def test_pack_remaps_64bit_ids_and_pads():
    big = 2**64 - 5  # BLAKE2b-64 ids use the full unsigned range
    p = pack_lists([[big, 7, big], [], [7]])
    assert p.ids.dtype == np.int32 and p.ids.shape == (3, 3)
    assert p.ids.tolist() == [[1, 0, 1], [-1, -1, -1], [0, -1, -1]]
    assert p.vocab.tolist() == [7, big]
    assert p.lengths.tolist() == [3, 0, 1]
    # the repeated id keeps only its first position in the set view
    assert p.set_ids.tolist() == [[1, 0, -1], [-1, -1, -1], [0, -1, -1]]
    assert p.set_sizes.tolist() == [2, 0, 1]
    assert p.weights.tolist() == [[1, 1, 1], [0, 0, 0], [1, 0, 0]]


def test_pack_negative_ids_stay_distinct():
    p = pack_lists([[-1, 1, -2]])
    assert len(set(p.ids[0].tolist())) == 3


def test_pack_weights_mapping_and_lists():
    p = pack_lists([[10, 20], [20]], weights={10: 5, 20: 7})
    assert p.weights.tolist() == [[5, 7], [7, 0]]
    p = pack_lists([[10, 20], [20]], weights=[[3, 4], [9]])
    assert p.weights.tolist() == [[3, 4], [9, 0]]
    with pytest.raises(ValueError):
        pack_lists([[10, 20]], weights=[[3]])
    with pytest.raises(ValueError):
        pack_lists([[10]], weights=[[0]])


def test_pack_pair_shares_one_id_space():
    q, c = pack_pair([[5, 6]], [[6], [9, 5]])
    assert q.vocab is c.vocab
    assert q.ids.tolist() == [[0, 1]] and c.ids.tolist() == [[1, -1], [2, 0]]


def test_raw_queries_need_raw_or_packed_candidates_alike():
    with pytest.raises(TypeError, match="both"):
        topk_overlap([[1, 2]], pack_lists([[1], [2]]), 1, backend="numpy")


def test_dense_array_input_is_taken_as_ids():
    q = np.array([[0, 1, -1], [2, -1, -1]])
    c = np.array([[1, 0], [2, 2]])
    r = topk_overlap(q, c, 2, backend="numpy")
    assert r.indices.tolist() == [[0, -1], [1, -1]]
    assert r.scores.tolist() == [[2, 0], [1, 0]]
    with pytest.raises(ValueError):
        pack_lists(np.array([[-1, 3]]))  # padding must come after the ids


# ---------------------------------------------------------------- reference vs oracle

def _lists(max_n=10, max_len=8, vocab=12):
    block = st.integers(0, vocab - 1).map(lambda v: v * 0x9E3779B97F4A7C15 % 2**64)  # spread over 64 bits
    return st.lists(st.lists(block, max_size=max_len), max_size=max_n)


@settings(max_examples=150, deadline=None)
@given(q=_lists(), c=_lists(), k=st.integers(0, 6), metric=st.sampled_from(METRICS))
def test_reference_matches_oracle(q, c, k, metric):
    r = topk_overlap(q, c, k, metric=metric, backend="numpy")
    assert r.indices.shape == (len(q), k) and r.backend == "numpy"
    assert as_pairs(r) == oracle_topk(q, c, k, metric)


@settings(max_examples=80, deadline=None)
@given(q=_lists(max_n=12, vocab=6), k=st.integers(1, 5), metric=st.sampled_from(METRICS), data=st.data())
def test_reference_self_join_exclude_self(q, k, metric, data):
    exclude = data.draw(st.booleans())
    r = topk_overlap(q, None, k, metric=metric, exclude_self=exclude, backend="numpy")
    assert as_pairs(r) == oracle_topk(q, q, k, metric, exclude_self=exclude)


@settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_token_weights(data):
    # overlap: Σ query weight over shared blocks.
    q = data.draw(_lists(max_n=6, vocab=5))
    c = data.draw(_lists(max_n=8, vocab=5))
    w = [data.draw(st.lists(st.integers(1, 500), min_size=len(r), max_size=len(r))) for r in q]
    r = topk_overlap(q, c, 4, metric="overlap", query_weights=w, backend="numpy")
    assert as_pairs(r) == oracle_topk(q, c, 4, "overlap", weights=w)




# ---------------------------------------------------------------- partner_candidates

_table = st.lists(st.integers(1, 9), min_size=12, max_size=12)


@settings(max_examples=150, deadline=None)
@given(lists=st.lists(st.lists(st.integers(0, 11), max_size=8), max_size=14), k=st.integers(0, 6),
       table=_table, kind=st.sampled_from(["none", "mapping", "table", "float"]))
def test_partner_candidates_matches_oracle(lists, k, table, kind):
    weights = {"none": None, "mapping": dict(enumerate(table)), "table": np.array(table),
               "float": [float(x) for x in table]}[kind]
    idx, score = K.partner_candidates(lists, k, weights=weights, backend="numpy")
    assert idx.shape == score.shape == (len(lists), k) and idx.dtype == score.dtype == np.int64
    assert pairs_of(idx, score) == oracle_partners(lists, k, None if kind == "none" else table.__getitem__)
    assert all(i not in row.tolist() for i, row in enumerate(idx))


@pytest.mark.parametrize("pair_budget,dense_limit", [(1, 0), (9, 0), (1, 10**6), (50, 10**6)])
def test_partner_candidates_tiles(monkeypatch, pair_budget, dense_limit):
    # Many small query tiles, both reductions (dense bincount, sorted), with weights.
    monkeypatch.setattr(R, "DENSE_LIMIT", dense_limit)
    monkeypatch.setattr(R, "PAIR_BUDGET", pair_budget)
    rng = np.random.default_rng(pair_budget + dense_limit)
    lists = [rng.integers(0, 30, rng.integers(0, 14)).tolist() for _ in range(90)]
    table = rng.integers(1, 1000, 30)
    idx, score = K.partner_candidates(lists, 7, weights=table, backend="numpy")
    assert pairs_of(idx, score) == oracle_partners(lists, 7, lambda b: int(table[b]))


def test_partner_candidates_rejects_bad_weights():
    with pytest.raises(ValueError):
        K.partner_candidates([[1, 2], [2]], 1, weights=[1.0, 1.5, 2.0])  # not whole numbers
    with pytest.raises(ValueError):
        K.partner_candidates([[1, 2], [2]], 1, weights=np.array([1, 1]))  # block 2 not covered
    with pytest.raises(ValueError):
        K.partner_candidates([[1, 2], [2]], 1, weights=np.array([1, 0, 3]))  # not positive


@pytest.mark.parametrize("pair_budget,dense_limit", [(1, 0), (7, 0), (40, 10**6), (1, 10**6)])
@pytest.mark.parametrize("metric", METRICS)
def test_reference_tiling_paths(monkeypatch, pair_budget, dense_limit, metric):
    # Tiny budgets force many query tiles and the sparse (sorted) reduction.
    monkeypatch.setattr(R, "DENSE_LIMIT", dense_limit)
    rng = np.random.default_rng(pair_budget * 7 + dense_limit)
    q = [rng.integers(0, 15, rng.integers(0, 12)).tolist() for _ in range(40)]
    c = [rng.integers(0, 15, rng.integers(0, 12)).tolist() for _ in range(55)]
    qp, cp = pack_pair(q, c)
    idx, scores = R.topk_numpy(qp, cp, 5, metric, pair_budget=pair_budget)
    got = topk_overlap(qp, cp, 5, metric=metric, backend="numpy")
    assert np.array_equal(idx, got.indices) and np.array_equal(scores, got.scores)
    assert as_pairs(got) == oracle_topk(q, c, 5, metric)


def test_empty_inputs_and_k_larger_than_candidates():
    r = topk_overlap([], [[1]], 3, backend="numpy")
    assert r.indices.shape == (0, 3)
    r = topk_overlap([[1, 2]], [], 3, metric="distance", backend="numpy")
    assert r.indices.tolist() == [[-1, -1, -1]] and r.scores.tolist() == [[1.0, 1.0, 1.0]]
    r = topk_overlap([[1, 2], []], [[2, 1], [3]], 4, backend="numpy")
    assert r.indices.tolist() == [[0, -1, -1, -1], [-1, -1, -1, -1]]
    assert r.scores.tolist() == [[2, 0, 0, 0], [0, 0, 0, 0]]
    assert topk_overlap([[1]], [[1]], 0, backend="numpy").indices.shape == (1, 0)


def test_distance_formula_worked_example():
    # A=[1,2,3,4], B=[3,1,9]: shared {1,3}, max size 4, |0-1| + |2-0| = 3.
    r = topk_overlap([[1, 2, 3, 4]], [[3, 1, 9]], 1, metric="distance", backend="numpy")
    assert r.scores[0, 0] == pytest.approx(1 - 2 / 4 + 0.001 * 3 / 2, abs=1e-15)


def test_ties_go_to_lower_candidate_index():
    c = [[9], [1, 2], [2, 1], [1, 2, 7]]
    r = topk_overlap([[1, 2]], c, 3, backend="numpy")
    assert r.indices.tolist() == [[1, 2, 3]]
    r = topk_overlap([[1, 2]], c, 3, metric="distance", backend="numpy")
    assert r.indices.tolist() == [[1, 2, 3]]  # d: 0, 0.002, 1/3


def test_memory_stays_bounded_by_tiles(monkeypatch):
    # 3,000 × 3,000 pairs: an N×M float64 matrix would be 72 MB; with tiles capped the
    # reference must stay far below it (the tile budget, not N×M, bounds memory).
    monkeypatch.setattr(R, "DENSE_LIMIT", 1 << 16)
    rng = np.random.default_rng(3)
    q = pack_lists(np.sort(rng.integers(0, 400, (3000, 15)), axis=1))
    tracemalloc.start()
    idx, _ = R.topk_numpy(q, q, 8, "distance", exclude_self=True, pair_budget=1 << 15)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert (idx >= 0).all()
    assert peak < 3000 * 3000 * 8 / 4
    # the planner's entry point (weighted overlap) streams the same way
    monkeypatch.setattr(R, "PAIR_BUDGET", 1 << 15)
    lists = np.sort(rng.integers(0, 400, (3000, 15)), axis=1).tolist()
    tracemalloc.start()
    idx, _ = K.partner_candidates(lists, 8, weights=rng.integers(1, 100, 400), backend="numpy")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert (idx >= 0).all() and peak < 3000 * 3000 * 8 / 4


# ---------------------------------------------------------------- backend selection

def test_forced_numpy_and_env_flag(monkeypatch):
    monkeypatch.setenv("CP_ENGINE_KERNEL_BACKEND", "numpy")
    assert topk_overlap([[1]], [[1]], 1).backend == "numpy"
    monkeypatch.setenv("CP_ENGINE_KERNEL_BACKEND", "bogus")  # config falls back to auto
    assert topk_overlap([[1]], [[1]], 1).backend == "numpy"  # tiny problem: auto → numpy
    with pytest.raises(ValueError):
        topk_overlap([[1]], [[1]], 1, backend="cuda")
    with pytest.raises(ValueError):
        topk_overlap([[1]], [[1]], 1, metric="jaccard")


def test_forced_triton_that_cannot_run_raises(monkeypatch):
    monkeypatch.setattr(K.backend, "triton_status", lambda: (False, "no CUDA device"))
    with pytest.raises(BackendUnavailable, match="no CUDA device"):
        topk_overlap([[1]], [[1]], 1, backend="triton")
    monkeypatch.setenv("CP_ENGINE_KERNEL_BACKEND", "triton")
    with pytest.raises(BackendUnavailable):
        topk_overlap([[1]], [[1]], 1)
    # auto never raises: it falls back silently
    monkeypatch.setattr(K.backend, "TRITON_MIN_PAIRS", 1)
    assert topk_overlap([[1]], [[1]], 1, backend="auto").backend == "numpy"


def test_auto_prefers_triton_only_above_threshold(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(K.backend, "triton_status", lambda: (True, "pretend CUDA"))
    monkeypatch.setattr(K.backend, "_auto_failed", [])
    assert K.backend.choose_backend("auto", K.backend.TRITON_MIN_PAIRS - 1) == ("numpy", False)
    assert K.backend.choose_backend("auto", K.backend.TRITON_MIN_PAIRS) == ("triton", False)
    assert K.backend.choose_backend("auto", K.backend.TRITON_MIN_PAIRS, k=K.MAX_K + 1) == ("numpy", False)
    with pytest.raises(BackendUnavailable):
        K.backend.choose_backend("triton", 10, k=K.MAX_K + 1)


def test_auto_triton_failure_falls_back_once(monkeypatch, caplog):
    import types

    def broken_launch(*args, **kwargs):
        raise RuntimeError("simulated kernel failure")

    fake = types.SimpleNamespace(launch=broken_launch)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("CP_ENGINE_KERNEL_BACKEND", raising=False)
    monkeypatch.setitem(sys.modules, "cp_engine.kernels.triton_overlap", fake)
    monkeypatch.setattr(K, "triton_overlap", fake, raising=False)
    monkeypatch.setattr(K.backend, "triton_status", lambda: (True, "pretend CUDA"))
    monkeypatch.setattr(K.backend, "TRITON_MIN_PAIRS", 1)
    monkeypatch.setattr(K.backend, "_auto_failed", [])
    q = [[1, 2], [2, 3]]
    with caplog.at_level("WARNING", logger="cp_engine.kernels"):
        first = topk_overlap(q, None, 2)
        second = topk_overlap(q, None, 2)
    assert first.backend == second.backend == "numpy"
    assert as_pairs(first) == oracle_topk(q, q, 2, "overlap")
    assert sum("simulated kernel failure" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(RuntimeError, match="simulated"):
        topk_overlap(q, None, 2, backend="triton")  # forced: the error surfaces


def test_import_needs_numpy_only():
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['triton'] = None\n"
        "import cp_engine.kernels as k\n"
        "r = k.topk_overlap([[1, 2]], [[2]], 1)\n"
        "assert r.backend == 'numpy', r.backend\n"
        "ok, why = k.triton_status(); assert not ok and 'torch' in why, why\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("CP_ENGINE_KERNEL_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
