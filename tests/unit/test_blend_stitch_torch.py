"""The worker's stitching (``write_moved``) and the recompute's device-independent parts,
on the torch stand-in decoder of ``benchmarks.blend.torch_decoder`` (a hand-written
model for pure unit tests; the live-engine tests run the real vLLM modules)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks.blend.torch_decoder import Dims, FlashPagedKV, build, prefill  # noqa: E402
from cp_engine.blend.rope import shift_k  # noqa: E402
from cp_engine.hooks.vllm import blend_recompute  # noqa: E402
from cp_engine.hooks.vllm.blend_recompute import DecoderRecompute, RecomputeJob  # noqa: E402
from cp_engine.hooks.vllm.blend_stitch import write_moved  # noqa: E402

DIMS = Dims(64, 128, 3, 4, 2, 16, vocab=500, max_positions=2048)


@pytest.fixture(scope="module")
def engine():
    model = build(DIMS, "cpu", torch.float32, seed=1)
    paged = FlashPagedKV([l.self_attn.attn.layer_name for l in model.model.layers], 64, 16, 2, 16,
                         torch.float32, "cpu")
    return model, paged, DecoderRecompute.from_model(model, paged)


def test_write_moved_places_every_block_rotated_in_one_write_per_layer(engine):
    _, paged, rec = engine
    gen = torch.Generator().manual_seed(0)
    entries = [torch.randn(3, 2, 40, 2, 16, generator=gen) for _ in range(2)]
    slots = paged.slots(range(10, 20), 0, 160)
    writes = []
    real_write = paged.write
    paged.write = lambda name, s, k, v: (writes.append(name), real_write(name, s, k, v))
    try:
        write_moved(paged, rec.rope, slots, [(entries[0], 5, 100, 30), (entries[1], 0, 7, 40)])
    finally:
        del paged.write
    assert writes == list(paged.layer_names)  # one write per layer, both blocks in it
    for layer, name in enumerate(paged.layer_names):
        k, v = paged.read(name, slots[100:130])
        torch.testing.assert_close(k, shift_k(entries[0][layer, 0, 5:35], 95, rec.rope))
        torch.testing.assert_close(v, entries[0][layer, 1, 5:35])
        k, v = paged.read(name, slots[7:47])
        torch.testing.assert_close(k, shift_k(entries[1][layer, 0], 7, rec.rope))


def test_write_moved_refuses_a_move_outside_before_writing(engine):
    _, paged, rec = engine
    slots = paged.slots(range(30, 32), 0, 32)
    before = paged.read(paged.layer_names[0], slots)[0].clone()
    entry = torch.ones(3, 2, 16, 2, 16)
    with pytest.raises(ValueError):
        write_moved(paged, rec.rope, slots, [(entry, 0, 0, 16), (entry, 0, 20, 16)])
    torch.testing.assert_close(paged.read(paged.layer_names[0], slots)[0], before)


@pytest.mark.parametrize("mask_cache", [blend_recompute.MASK_CACHE_BYTES, 0])
def test_recompute_of_every_position_reproduces_the_prefill(engine, monkeypatch, mask_cache):
    """Masks kept for every layer or rebuilt per call: the same K/V as the full forward."""
    monkeypatch.setattr(blend_recompute, "MASK_CACHE_BYTES", mask_cache)
    model, paged, rec = engine
    ids = torch.randint(100, DIMS.vocab, (1, 300), generator=torch.Generator().manual_seed(2))
    slots = paged.slots(range(40, 60), 0, 300)
    prefill(model, paged, ids, slots[None])
    want = [paged.read(n, slots) for n in paged.layer_names]
    for n in paged.layer_names:  # spoil the cache: the recompute must rewrite every slot
        paged.write(n, slots, torch.zeros(300, 2, 16), torch.zeros(300, 2, 16))
    keep = np.arange(0, 300, 3)
    report = rec.run_batch([RecomputeJob(ids[0].tolist(), slots, torch.arange(300), 1,
                                         lambda _dev: keep)])[0]
    assert report.tokens_per_layer == [300, 300, 100]
    # Only the rows kept past the check layer get the last layer's K/V back.
    got = [paged.read(n, slots) for n in paged.layer_names]
    for (k, v), (wk, wv) in zip(got[:2], want[:2]):
        torch.testing.assert_close(k, wk, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(v, wv, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[2][0][keep], want[2][0][keep], atol=1e-4, rtol=1e-4)
    assert not torch.equal(got[2][0][1], want[2][0][1])  # a row narrowed away keeps the spoilt K
    rec.run(ids[0].tolist(), slots, torch.arange(300))
    for (k, v), (wk, wv) in zip([paged.read(n, slots) for n in paged.layer_names], want):
        torch.testing.assert_close(k, wk, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(v, wv, atol=1e-4, rtol=1e-4)


def test_additive_mask_attends_like_the_boolean_mask():
    """The CUDA path's prebuilt mask: aligned rows, and the same attention as the boolean form."""
    from cp_engine.hooks.vllm.blend_recompute import additive_mask

    pos = torch.tensor([3, 4, 9, 20])
    allowed = torch.arange(21)[None, :] <= pos[:, None]
    mask = additive_mask(allowed, torch.float32, torch.device("cpu"))
    assert mask.shape == (4, 21) and mask.stride(0) == 32
    q, k, v = (torch.randn(1, 2, n, 8, generator=torch.Generator().manual_seed(n)) for n in (4, 21, 21))
    F = torch.nn.functional
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=allowed))
