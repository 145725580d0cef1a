"""Store keys (cp_engine.blend.keys): entries never match across models, layouts or scopes."""
import dataclasses

import pytest

from cp_engine.blend.keys import BlockKey, KVLayout, Scope, block_key, model_fingerprint, token_digest

LAYOUT = KVLayout(model="tiny", fingerprint="f0", dtype="float32", num_layers=4, num_kv_heads=2, head_dim=64,
                  block_size=16, rope="neox/rot64of64/default-theta10000/abc")
IDS = [5, 6, 7, 8]


def test_same_block_same_key_and_ids_ride_along():
    a, b = block_key(LAYOUT, Scope(), IDS), block_key(LAYOUT, Scope(), tuple(IDS))
    assert a == b and hash(a) == hash(b) and a.lookup == b.lookup
    assert a.token_ids == tuple(IDS) and a.layout == LAYOUT and len(a) == 4


@pytest.mark.parametrize("change", [
    dict(model="other"), dict(fingerprint="f1"), dict(dtype="bfloat16"), dict(num_layers=5),
    dict(num_kv_heads=1), dict(head_dim=128), dict(block_size=32), dict(rope="neox/rot64of64/linear/def"),
    dict(extra=(("tp", "1/2"),)),
])
def test_any_layout_change_is_another_namespace(change):
    assert block_key(dataclasses.replace(LAYOUT, **change), Scope(), IDS) != block_key(LAYOUT, Scope(), IDS)


def test_scopes_never_share():
    keys = {block_key(LAYOUT, s, IDS).namespace for s in
            [Scope(), Scope(tenant="t1"), Scope(tenant="t2"), Scope(cache_salt="s"), Scope("t1", "s")]}
    assert len(keys) == 5
    # length-prefixed parts: moving a character between fields changes the key
    assert block_key(LAYOUT, Scope("ab", "c"), IDS) != block_key(LAYOUT, Scope("a", "bc"), IDS)


def test_token_digest_is_order_and_length_exact():
    assert token_digest([1, 2]) != token_digest([2, 1])
    assert token_digest([1, 2]) != token_digest([1, 2, 0])
    assert token_digest([256]) != token_digest([1, 0])  # ids are 8-byte fields, not bytes
    with pytest.raises(ValueError):
        token_digest([[1, 2]])
    with pytest.raises(ValueError):
        token_digest([1.5])
    with pytest.raises(ValueError, match="at least one token"):
        block_key(LAYOUT, Scope(), [])


def test_layout_validation_and_make():
    with pytest.raises(ValueError, match="num_layers"):
        dataclasses.replace(LAYOUT, num_layers=0)
    with pytest.raises(ValueError, match="fingerprint"):
        dataclasses.replace(LAYOUT, fingerprint="")
    fields = {f.name: getattr(LAYOUT, f.name) for f in dataclasses.fields(LAYOUT) if f.name != "extra"}
    made = KVLayout.make(extra={"tp": "0/2", "kv_cache_dtype": "auto"}, **fields)
    assert made.extra == (("kv_cache_dtype", "auto"), ("tp", "0/2"))
    assert isinstance(block_key(made, Scope(), IDS), BlockKey)


def test_model_fingerprint_sees_config_and_weights(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 5000)
    (tmp_path / "README.md").write_text("ignored")
    first = model_fingerprint(str(tmp_path))
    (tmp_path / "README.md").write_text("changed")
    assert model_fingerprint(str(tmp_path)) == first
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 4999 + b"\x01")
    second = model_fingerprint(str(tmp_path))
    assert second != first
    (tmp_path / "config.json").write_text('{"hidden_size": 9}')
    assert model_fingerprint(str(tmp_path)) not in (first, second)
