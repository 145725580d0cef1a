"""The replay's summary pairs each order with FCFS by seed."""
import math

from benchmarks.reliability import queue_replay as qr


def _run(order, seed, rps, p99):
    r = {k: 1.0 for k in qr.COMPARED}
    r.update(rps=rps, p99_s=p99)
    return {"order": order, "seed": seed, "rounds": [r, dict(r)]}


def test_ratios_are_paired_by_seed():
    # FCFS varies a lot between seeds; the other order is always 2% faster than FCFS
    # on the same seed, so the paired ratio is exact and its interval has no width.
    runs = []
    for seed, base in enumerate((5.0, 9.0, 13.0)):
        runs += [_run("fcfs", seed, base, 10.0), _run("cache_aware", seed, base * 1.02, 9.0)]
    s = qr.summarize(runs)
    g, lo, hi = s["cache_aware"]["rps_vs_fcfs"]
    assert math.isclose(g, 1.02) and math.isclose(lo, 1.02) and math.isclose(hi, 1.02)
    assert math.isclose(s["cache_aware"]["p99_s_vs_fcfs"][0], 0.9)
    assert s["fcfs"]["rps"] == 9.0 and "rps_vs_fcfs" not in s["fcfs"]
    table = qr.table({"config": {"clients": 4, "rounds": 2, "round_s": 5, "warmup_s": 1, "seeds": 3, "step_ms": 10,
                                 "token_us": 100, "max_wait_s": 2, "orders": ["fcfs", "cache_aware"]},
                      "summary": s})
    assert "| cache_aware | 9.180 (x1.020, 1.020..1.020)" in table


def test_a_seed_without_a_baseline_is_left_out():
    runs = [_run("fcfs", 0, 5.0, 1.0), _run("cache_aware", 0, 5.5, 1.0), _run("cache_aware", 1, 50.0, 1.0),
            _run("fcfs", 2, 4.0, 1.0), _run("cache_aware", 2, 4.4, 1.0)]
    assert math.isclose(qr.summarize(runs)["cache_aware"]["rps_vs_fcfs"][0], 1.1)
