"""Block identity and configuration parsing."""
import subprocess
import sys

from hypothesis import given, strategies as st

from cp_engine.blocks import block_id, estimate_tokens, short_label, token_lengths
from cp_engine.config import FLAGS, Config, load_config, markdown_table


@given(st.text())
def test_equal_text_equal_id_and_64_bits(text):
    a, b = block_id(text), block_id(str(text))
    assert a == b and 0 <= a < 2**64


def test_ids_stable_across_processes_and_hash_seeds():
    code = "from cp_engine.blocks import block_id; print(block_id('hello world'), block_id(('x', 1)))"
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"PYTHONHASHSEED": seed, "PATH": ""}, cwd=None).stdout
        for seed in ("1", "2", "3")
    }
    assert len(outs) == 1
    assert outs.pop().split()[0] == str(block_id("hello world"))


def test_distinct_texts_distinct_ids_and_int_passthrough():
    assert block_id("a") != block_id("b")
    assert block_id(12345) == 12345
    assert block_id(-1) != block_id(2**64 - 1)
    assert block_id(True) != block_id(1)
    assert block_id("x") == block_id(b"x")  # utf-8 bytes and text name the same block
    assert len(short_label(block_id("a"))) == 8


def test_token_lengths_validation():
    assert token_lengths(["abcd" * 10]) == [10]
    assert estimate_tokens("") == 1
    try:
        token_lengths(["a"], [1, 2])
    except ValueError as exc:
        assert "1 blocks" in str(exc)
    else:
        raise AssertionError("length mismatch accepted")


def test_config_defaults_and_overrides():
    assert load_config({}) == Config()
    cfg = load_config({"CP_ENGINE_DEDUP": "0", "CP_ENGINE_DISABLE": "true", "CP_ENGINE_INDEX_MAX_NODES": "50"})
    assert (cfg.dedup, cfg.disable, cfg.index_max_nodes) == (False, True, 50)
    assert cfg.active_features() == []


def test_bad_flag_values_fall_back_with_warning():
    cfg = load_config({"CP_ENGINE_REORDER": "maybe", "CP_ENGINE_INDEX_MAX_NODES": "-3",
                       "CP_ENGINE_KERNEL_BACKEND": "cuda"})
    assert cfg.reorder is True and cfg.index_max_nodes == Config().index_max_nodes
    assert cfg.kernel_backend == "auto"
    assert len(cfg.warnings) == 3 and all(w.startswith("CP_ENGINE_") for w in cfg.warnings)


def test_every_flag_documented_in_table():
    table = markdown_table()
    for flag in FLAGS:
        assert f"`{flag.env}`" in table
