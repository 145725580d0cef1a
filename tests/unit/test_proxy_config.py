"""The proxy's options and entry points, and the token bound of its context index."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from cp_engine.index import ContextIndex
from cp_engine.proxy import cli
from cp_engine.proxy.config import ProxyConfig, parse_args

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_listen_on_loopback_only():
    cfg = parse_args(["--upstream", "http://127.0.0.1:8000/"])
    assert cfg == ProxyConfig(upstream="http://127.0.0.1:8000/")
    assert cfg.host == "127.0.0.1"
    assert cfg.upstream_base == "http://127.0.0.1:8000"


def test_every_option_is_read():
    cfg = parse_args(["--upstream", "https://h/v", "--host", "0.0.0.0", "--port", "9000",
                      "--upstream-cache-tokens", "5000", "--max-body-mb", "0.5", "--max-concurrency", "3",
                      "--connect-timeout", "2", "--read-timeout", "7.5"])
    assert cfg == ProxyConfig(upstream="https://h/v", host="0.0.0.0", port=9000, upstream_cache_tokens=5000,
                              max_body_bytes=512 * 1024, max_concurrency=3, connect_timeout_s=2.0,
                              read_timeout_s=7.5)


@pytest.mark.parametrize("argv, needle", [
    ([], "--upstream"),
    (["--upstream", "127.0.0.1:8000"], "http:// or https://"),
    (["--upstream", "ftp://h"], "http:// or https://"),
    (["--upstream", "http://h?x=1"], "query"),
    (["--upstream", "http://h", "--upstream-cache-tokens", "0"], "must be > 0"),
    (["--upstream", "http://h", "--port", "x"], "--port"),
])
def test_bad_options_exit_2_naming_them(argv, needle, capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    assert needle in capsys.readouterr().err


def test_cp_engine_command_has_the_proxy_subcommand(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["proxy", "--upstream", "nope"])
    assert info.value.code == 2 and "http:// or https://" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([])


def test_console_script_and_extra_are_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["cp-engine"] == "cp_engine.proxy.cli:main"
    assert any(d.startswith("aiohttp") for d in project["project"]["optional-dependencies"]["proxy"])
    assert not any(d.startswith("aiohttp") for d in project["project"]["dependencies"])
    assert "cp_engine.proxy" in project["tool"]["setuptools"]["packages"]


def test_python_dash_m_runs_the_same_parser():
    out = subprocess.run([sys.executable, "-m", "cp_engine.proxy", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--upstream-cache-tokens" in out.stdout and "--upstream" in out.stdout


# -- the index's token bound (no eviction events reach a proxy) ---------------------------

def test_shared_prefix_tokens_count_once():
    index = ContextIndex(max_tokens=1000)
    index.record("r1", [1, 2, 3], token_lengths=[100, 50, 10])
    index.record("r2", [1, 2, 4], token_lengths=[100, 50, 20])
    assert index.tokens == 180
    index.forget(["r1"])
    assert index.tokens == 170
    index.evict_path([1, 2])
    assert index.tokens == 100 and index.requests == 1  # r2's head stays claimed by r2


def test_over_the_bound_the_oldest_requests_are_forgotten():
    index = ContextIndex(max_tokens=250)
    index.record("old", [1, 2], token_lengths=[100, 100])
    index.record("mid", [1, 3], token_lengths=[100, 40])
    assert index.tokens == 240
    index.record("new", [5], token_lengths=[60])
    assert index.requests == 2 and index.tokens == 200  # "old" gone: its block 2 freed, block 1 kept by "mid"
    assert index.match_length([1, 3]) == 2 and index.match_length([1, 2]) == 1
    index.record("huge", [7], token_lengths=[400])  # larger than the cache: nothing can stay
    assert index.requests == 0 and index.tokens == 0


def test_without_a_token_bound_nothing_changes():
    index = ContextIndex()
    for i in range(50):
        index.record(i, [i, i + 1], token_lengths=[1000, 1000])
    assert index.requests == 50 and index.tokens == 100 * 1000  # 50 paths of two distinct nodes
    with pytest.raises(ValueError):
        ContextIndex(max_tokens=0)


def test_the_core_never_imports_the_proxy():
    for path in sorted((ROOT / "cp_engine").glob("*.py")) + sorted((ROOT / "hooks").rglob("*.py")):
        text = path.read_text()
        assert "cp_engine.proxy" not in text and "from .proxy" not in text, path
