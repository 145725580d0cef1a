"""Every counter the hooks increment is documented: help text in ``metrics.COUNTERS``.

The scan reads the source of ``hooks/`` (no engine needed): each ``metrics.inc`` /
``record_failure`` call must name its counter with a string literal, and each such name
must have help text. A new ``metrics.inc("something_new")`` without an entry fails here.
"""
from __future__ import annotations

import ast
import os

from cp_engine.hooks import metrics

HOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "hooks")


def _incremented() -> dict[str, list[str]]:
    """counter name -> places it is incremented; non-literal names are reported as such."""
    found: dict[str, list[str]] = {}
    for root, _, files in os.walk(HOOKS):
        for fname in files:
            if not fname.endswith(".py") or fname == "metrics.py":
                continue
            path = os.path.join(root, fname)
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call):
                    continue
                fn = node.func
                name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
                owner = fn.value.id if isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name) else None
                where = f"{os.path.relpath(path, HOOKS)}:{node.lineno}"
                if name == "inc" and owner == "metrics":
                    arg = node.args[0] if node.args else None
                    key = arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else "<non-literal>"
                    found.setdefault(key, []).append(where)
                elif name == "record_failure":
                    found.setdefault("hook_failures", []).append(where)
    return found


def test_every_incremented_counter_has_help_text():
    found = _incremented()
    assert "<non-literal>" not in found, f"name counters with a literal: {found['<non-literal>']}"
    missing = {k: v for k, v in found.items() if not metrics.COUNTERS.get(k, "").strip()}
    assert not missing, f"counters without help text in hooks/metrics.py COUNTERS: {missing}"


def test_the_scan_sees_the_counters_of_every_layer():
    # Guards the scan itself: a regex or AST change that finds nothing would pass vacuously.
    found = _incremented()
    for name in ("requests_rewritten", "queue_pops", "evictions_sent", "channel_dropped",
                 "channel_malformed", "cache_resets_applied", "queue_reorders", "hook_failures"):
        assert name in found, name


def test_exported_families_carry_the_help_text():
    from prometheus_client.core import CounterMetricFamily  # noqa: F401  (ships with vLLM)

    metrics.inc("queue_pops")
    fams = {f.name: f for f in metrics._Collector().collect()}
    assert fams["cp_engine_queue_pops"].documentation == metrics.COUNTERS["queue_pops"]
    assert all(fams[f"cp_engine_{n}"].documentation == h for n, h in metrics.COUNTERS.items())


def test_counter_keys_do_not_depend_on_label_order_or_value_type():
    """No label, one label (the request path's short cut) and several (sorted) each
    name one counter however the labels are passed."""
    name = "hook_failures"
    bare, one, two = metrics.value(name), metrics.value(name, hook="t_one"), metrics.value(name, hook="t_two", why="x")
    seven = metrics.value(name, hook="7")
    metrics.inc(name)
    metrics.inc(name, 2, hook="t_one")
    metrics.inc(name, 3, hook="t_two", why="x")
    metrics.inc(name, 4, why="x", hook="t_two")
    metrics.inc(name, 5, hook=7)
    assert metrics.value(name) == bare + 1
    assert metrics.value(name, hook="t_one") == one + 2
    assert metrics.value(name, why="x", hook="t_two") == two + 7
    assert metrics.value(name, hook="7") == metrics.value(name, hook=7) == seven + 5  # counted as its string
    assert (name, {"hook": "t_two", "why": "x"}) in [(n, lbl) for n, lbl, _ in metrics.snapshot()]
