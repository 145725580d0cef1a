"""The Triton kernel against the NumPy reference: interpreter mode on the CPU, compiled
on a CUDA GPU (``-m gpu``).

TRITON_INTERPRET=1 must be set before anything imports triton, and must not leak into
other tests (engine servers inherit the environment). So on a CPU run the single
``test_interpreter_suite`` checks a re-run of this file in a subprocess with
TRITON_INTERPRET=1 (started in the background when the selection is known), where the
``interp`` cases below run; in the parent they are skipped. Exact equality of
indices and scores (integers; the float64 distance is formed in the same order).
Skipped entirely when triton is not installed (see the .venv-kernels CI step).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import warnings

import numpy as np
import pytest

from cp_engine.kernels import pack_lists, pack_pair, partner_candidates, topk_overlap
from early_runs import early_run
from kernel_oracle import as_pairs, oracle_partners, oracle_topk, pairs_of

HAVE_TRITON = importlib.util.find_spec("triton") is not None and importlib.util.find_spec("torch") is not None
IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
METRICS = ("overlap", "distance")

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="triton/torch not installed (use .venv-kernels)")


def _interpreter_broken() -> bool:
    """Triton's interpreter before 3.7 holds every scalar argument as a one-element array
    and takes ``int()`` of it for a loop bound; NumPy releases that refuse ``int()`` of
    a 1-D array (NumPy 2.5 does) make every kernel run fail there. Compiled runs are
    not affected."""
    if not HAVE_TRITON:
        return False
    from importlib.metadata import version

    try:
        with warnings.catch_warnings():  # NumPy releases that still allow it warn instead
            warnings.simplefilter("ignore", DeprecationWarning)
            int(np.zeros(1, dtype=np.int64))
    except TypeError:
        return tuple(int(x) for x in version("triton").split(".")[:2]) < (3, 7)
    return False


INTERPRETER_BROKEN = _interpreter_broken()
interp = pytest.mark.skipif(not IN_INTERPRETER, reason="runs inside test_interpreter_suite's TRITON_INTERPRET=1 subprocess")


def _cuda() -> bool:
    if IN_INTERPRETER or not HAVE_TRITON:
        return False
    import torch

    return torch.cuda.is_available()


def _interpreter_run() -> dict | None:
    if IN_INTERPRETER or not HAVE_TRITON or INTERPRETER_BROKEN:  # the run itself, or nothing to run
        return None
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("CP_ENGINE_KERNEL_BACKEND", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", os.path.abspath(__file__)]
    return {"args": cmd, "env": env, "timeout": 900,
            "cwd": os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))}


# Started in the background when the selection is known (tests/early_runs.py).
interpreter_run = early_run("interpreter_run", _interpreter_run)


@pytest.mark.skipif(IN_INTERPRETER, reason="this is the parent of the interpreter run")
@pytest.mark.skipif(INTERPRETER_BROKEN, reason="Triton < 3.7's interpreter fails under this NumPy (int() of a 1-D array)")
def test_interpreter_suite(interpreter_run):
    out = interpreter_run
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "failed" not in out.stdout, out.stdout[-2000:]


def _random_lists(rng, n, vocab, max_len, min_len=0):
    return [rng.integers(0, vocab, rng.integers(min_len, max_len + 1)).tolist() for _ in range(n)]


def _same(q, c, k, metric):
    """Triton launcher output equals the reference exactly; returns the reference."""
    qp, cp = pack_pair(q, c)
    ref = topk_overlap(qp, cp, k, metric=metric, backend="numpy")
    from cp_engine.kernels import triton_overlap

    idx, scores = triton_overlap.launch(qp, cp, k, metric)
    assert np.array_equal(idx, ref.indices), (idx, ref.indices)
    assert np.array_equal(scores, ref.scores), (scores, ref.scores)
    assert scores.dtype == ref.scores.dtype
    return ref


@interp
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("seed", [0, 1])
def test_random_against_reference(metric, seed):
    rng = np.random.default_rng(seed * 10 + len(metric))
    nq, nc = int(rng.integers(1, 100)), int(rng.integers(65, 200))  # several candidate tiles
    q = _random_lists(rng, nq, 25, 8)
    c = _random_lists(rng, nc, 25, 8)
    k = int(rng.integers(1, 9))
    r = topk_overlap(q, c, k, metric=metric, backend="triton")
    assert r.backend == "triton"
    ref = topk_overlap(q, c, k, metric=metric, backend="numpy")
    assert np.array_equal(r.indices, ref.indices) and np.array_equal(r.scores, ref.scores)


@interp
@pytest.mark.parametrize("metric", METRICS)
def test_self_join_exclude_self_and_split_merge(metric):
    rng = np.random.default_rng(5)
    q = _random_lists(rng, 70, 12, 6)
    qp, _ = pack_pair(q, [])
    ref = topk_overlap(q, None, 5, metric=metric, exclude_self=True, backend="numpy")
    from cp_engine.kernels import triton_overlap

    for splits in (1, 2):  # two candidate ranges exercise the cross-split merge
        idx, scores = triton_overlap.launch(qp, qp, 5, metric, exclude_self=True, splits=splits)
        assert np.array_equal(idx, ref.indices) and np.array_equal(scores, ref.scores)
    assert as_pairs(ref) == oracle_topk(q, q, 5, metric, exclude_self=True)


@interp
@pytest.mark.parametrize("metric", METRICS)
def test_padding_empty_lists_and_duplicates(metric):
    q = [[], [1, 1, 1], [2, 3, 2, 3], [4], [1, 2, 3, 4, 5, 1]]
    c = [[1], [], [3, 2, 3], [1, 1], [2, 3, 9], [5, 4, 3, 2, 1], [4, 4]] * 10  # 70: two tiles
    ref = _same(q, c, 6, metric)
    assert as_pairs(ref) == oracle_topk(q, c, 6, metric)
    _same([[]], [[], []], 2, metric)  # zero-width matrices


@interp
@pytest.mark.parametrize("metric", METRICS)
def test_lists_longer_than_one_tile(metric):
    rng = np.random.default_rng(11)
    q = [rng.permutation(90).tolist()[:70], list(range(66)) + [1, 2]]
    c = [list(range(66)), rng.permutation(90).tolist()[:68], q[0][:40] + [999] * 3, [7]]
    ref = _same(q, c, 3, metric)
    assert as_pairs(ref) == oracle_topk(q, c, 3, metric)


@interp
def test_weights_and_larger_tiles():
    rng = np.random.default_rng(2)
    q = _random_lists(rng, 20, 3, 6, min_len=1)
    c = _random_lists(rng, 90, 3, 6)
    w = [rng.integers(1, 1000, len(r)).tolist() for r in q]
    qp, cp = pack_pair(q, c, query_weights=w)
    ref = topk_overlap(qp, cp, 4, metric="overlap", backend="numpy")
    from cp_engine.kernels import triton_overlap

    idx, scores = triton_overlap.launch(qp, cp, 4, "overlap", block_q=64, block_c=128)
    assert np.array_equal(idx, ref.indices) and np.array_equal(scores, ref.scores)


@interp
def test_weighted_overlap_and_partner_candidates():
    # partner_candidates on the kernel: self-join, exclude_self, per-block token weights,
    # two candidate tiles and a cross-split merge; exact against the reference and oracle.
    rng = np.random.default_rng(4)
    lists = _random_lists(rng, 80, 30, 9)
    table = rng.integers(1, 5000, 30)
    idx, score = partner_candidates(lists, 6, weights=table, backend="triton")
    ref = partner_candidates(lists, 6, weights=table, backend="numpy")
    assert np.array_equal(idx, ref[0]) and np.array_equal(score, ref[1])
    assert pairs_of(idx, score) == oracle_partners(lists, 6, lambda b: int(table[b]))
    from cp_engine.kernels import triton_overlap

    p = pack_lists(lists, weights=table)
    for splits in (1, 2):
        got = triton_overlap.launch(p, p, 6, "overlap", exclude_self=True, splits=splits)
        assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1])
    w = [rng.integers(1, 100, len(r)).tolist() for r in lists[:10]]  # per-position weights
    r = topk_overlap(lists[:10], lists, 4, metric="overlap", query_weights=w, backend="triton")
    assert as_pairs(r) == oracle_topk(lists[:10], lists, 4, "overlap", weights=w)


@interp
def test_launcher_rejects_bad_tiles_and_k():
    from cp_engine.kernels import triton_overlap

    qp, cp = pack_pair([[1]], [[1]])
    with pytest.raises(ValueError):
        triton_overlap.launch(qp, cp, 1, "overlap", block_q=32)
    with pytest.raises(ValueError):
        triton_overlap.launch(qp, cp, triton_overlap.MAX_K + 1, "overlap")


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("n", [1000, 5000])
def test_gpu_matches_reference(metric, n):
    rng = np.random.default_rng(n)
    q = _random_lists(rng, n, 2000, 20, min_len=10)
    r = topk_overlap(q, None, 16, metric=metric, exclude_self=True, backend="triton")
    ref = topk_overlap(q, None, 16, metric=metric, exclude_self=True, backend="numpy")
    assert r.backend == "triton"
    assert np.array_equal(r.indices, ref.indices) and np.array_equal(r.scores, ref.scores)


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
def test_gpu_partner_candidates_weighted():
    rng = np.random.default_rng(7)
    lists = _random_lists(rng, 5000, 2000, 20, min_len=10)
    table = rng.integers(1, 4000, 2000)
    got = partner_candidates(lists, 16, weights=table, backend="triton")
    ref = partner_candidates(lists, 16, weights=table, backend="numpy")
    assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1])


@pytest.mark.skipif(IN_INTERPRETER, reason="needs the real compiler, not the interpreter")
@pytest.mark.parametrize("metric", METRICS)
def test_kernel_compiles_for_h100_without_a_gpu(metric):
    # The interpreter runs code the compiler may reject; compiling to an sm_90 cubin
    # (triton ships ptxas) catches that on a CPU-only machine. No GPU is touched.
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import triton
    from cp_engine.kernels import triton_overlap as T

    sig = {name: "*i32" for name in ("Q", "C", "QW", "QN", "CN", "OUT_IDX")}
    sig.update(OUT_KEY="*fp64", ALPHA="*fp64")  # alpha travels in a buffer: a float argument would be fp32
    sig.update({name: "i32" for name in ("nq", "nc", "Lq", "Lc", "c_per_split", "n_splits")})
    const = dict(METRIC=T.METRIC_CODE[metric], EXCLUDE_SELF=True, K=16, KP=16, BLOCK_Q=64, BLOCK_C=64)
    sig.update({name: "constexpr" for name in const})
    params = list(T._topk_kernel.arg_names)
    src = ASTSource(fn=T._topk_kernel, signature={p: sig[p] for p in params}, constexprs=const)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    assert compiled.asm["cubin"]
