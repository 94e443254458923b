"""The built-in port against transformers' Mamba2ForCausalLM (torch path, CPU) on every tiny fixture:
every tap within the error budget against the float64 run, cached decode == full forward, chunked
continuation == full, left padding == each sequence alone, jitted == not, no retracing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from equiv.compare import assert_within_budget
from equiv.fixtures import fixture_dir
from equiv.mamba2 import generate as gen
from equiv.mamba2 import model as m
from equiv.mamba2.port import Mamba2Port

TINY = ["tiny-g1", "tiny-g2", "tiny-gh", "tiny-untied", "tiny-dtlimit-bias"]


@pytest.fixture(scope="module", params=TINY)
def trio(request):
    """(port model, reference fp32 runner, oracle fp64 runner) for one fixture."""
    from equiv.references import load_reference

    path = fixture_dir(request.param)
    return (Mamba2Port().load(path), load_reference("transformers", path, "float32"),
            load_reference("transformers", path, "float64"))


def _ids(model, b=2, l=40, seed=0):
    return np.random.default_rng(seed).integers(0, model.cfg.vocab_size, (b, l)).astype(np.int32)


def test_every_tap_within_budget(trio):
    port, ref, oracle = trio
    ids = _ids(port)
    p, r, o = port.forward(ids), ref.run(ids), oracle.run(ids)
    assert sorted(p) == sorted(port.tap_names)  # jit returns dicts key-sorted; order is tap_names
    for name in port.tap_names:
        assert_within_budget(name, p[name], r[name], o[name])


def test_cached_decode_equals_full_forward_across_chunk_boundaries(trio):
    port, ref, oracle = trio
    chunk = port.cfg.chunk_size
    ids = _ids(port, l=2 * chunk + 5)
    full_oracle = oracle.run(ids)["logits"]
    full_ref = ref.run(ids)["logits"]
    for prompt_len in (chunk - 1, chunk, chunk + 1):
        steps = port.step_logits(ids, None, prompt_len)  # (b, l - P + 1, v)
        want = slice(prompt_len - 1, ids.shape[1])
        assert_within_budget(f"step_logits[P={prompt_len}]", steps, full_ref[:, want], full_oracle[:, want])


def test_chunked_continuation_equals_full_forward(trio):
    port, ref, oracle = trio
    cfg, params = port.cfg, port.params
    ids = _ids(port, l=3 * cfg.chunk_size - 3)
    full = oracle.run(ids)["logits"]
    full_ref = ref.run(ids)["logits"]
    with jax.default_matmul_precision("highest"):
        for split in (1, cfg.chunk_size // 2 + 1, cfg.chunk_size + 3):  # unaligned on purpose
            first, cache, _ = m.forward(params, cfg, jnp.asarray(ids[:, :split]))
            second, _, _ = m.forward(params, cfg, jnp.asarray(ids[:, split:]), cache=cache)
            joined = np.concatenate([np.asarray(first), np.asarray(second)], axis=1)
            assert_within_budget(f"continuation@{split}", joined, full_ref, full)


def test_left_padded_batch_equals_reference_padding(trio):
    """transformers zeroes padded positions before in_proj and after the conv; with use_bias the
    in_proj bias of padded positions still reaches the conv window, so 'equal to the sequence alone'
    holds only without bias. The port must match the reference either way."""
    port, ref, oracle = trio
    ids = _ids(port, b=3, l=30, seed=1)
    mask = np.ones_like(ids)
    mask[1, :7] = 0
    mask[2, :19] = 0
    p, r, o = (x["logits"] for x in (port.forward(ids, mask), ref.run(ids, mask), oracle.run(ids, mask)))
    for row, pad in ((0, 0), (1, 7), (2, 19)):
        assert_within_budget(f"padded row {row}", p[row, pad:], r[row, pad:], o[row, pad:])
        if not port.cfg.use_bias:
            alone = port.forward(ids[row:row + 1, pad:])["logits"][0]
            alone_o = oracle.run(ids[row:row + 1, pad:])["logits"][0]
            assert_within_budget(f"padded row {row} vs alone", p[row, pad:], alone, alone_o)


def test_prefill_of_last_position_equals_full_forward(trio):
    """With last_logits_only the last layer's gate, SSD output, gated norm and out_proj run for the
    last position only (model.mixer_last_position): its logits and cache must be the full forward's,
    with and without left padding, across a chunk boundary."""
    port, _, _ = trio
    cfg, params = port.cfg, port.params
    ids = _ids(port, b=3, l=cfg.chunk_size + 7, seed=2)
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :cfg.chunk_size + 1] = 0
    for msk in (None, jnp.asarray(mask)):
        with jax.default_matmul_precision("highest"):
            full, full_cache, _ = m.forward(params, cfg, jnp.asarray(ids), msk)
            last, cache, _ = m.forward(params, cfg, jnp.asarray(ids), msk, last_logits_only=True)
        want = np.asarray(full[:, -1])
        np.testing.assert_allclose(np.asarray(last), want, rtol=0, atol=1e-5 * float(np.abs(want).max()))
        for got, exp in ((cache.conv, full_cache.conv), (cache.ssm, full_cache.ssm)):
            np.testing.assert_allclose(np.asarray(got), np.asarray(exp), rtol=0,
                                       atol=1e-6 * float(np.abs(np.asarray(exp)).max()))


def test_long_prompt_prefill_in_segments_within_budget(trio, monkeypatch):
    """A prompt longer than PREFILL_SEGMENT_CHUNKS chunks is prefilled segment by segment (the
    device's memory): its last logits and the decode after it stay within budget of the reference's
    full forward, with and without left padding, and its cache continues decoding."""
    port, ref, oracle = trio
    cfg = port.cfg
    monkeypatch.setattr(gen, "PREFILL_SEGMENT_CHUNKS", 1)  # 3 segments and a part
    ids = _ids(port, b=2, l=3 * cfg.chunk_size + 5, seed=5)
    mask = np.ones_like(ids)
    mask[1, :cfg.chunk_size + 2] = 0  # padding across the first segment boundary
    for msk in (None, mask):
        prompt_len = ids.shape[1] - 4
        steps = port.step_logits(ids, msk, prompt_len)  # segmented prefill, then 4 cached steps
        want = slice(prompt_len - 1, ids.shape[1])
        full_ref, full_oracle = ref.run(ids, msk)["logits"], oracle.run(ids, msk)["logits"]
        assert_within_budget("segmented prefill + steps", steps, full_ref[:, want], full_oracle[:, want])
    before = gen.TRACES["prefill"]
    gen.prefill(port.params, cfg, jnp.asarray(ids[:, :3 * cfg.chunk_size]))
    assert gen.TRACES["prefill"] - before <= 1  # equal segments share one compiled prefill


def test_jitted_equals_not_jitted():
    port = Mamba2Port().load(fixture_dir("tiny-g2"))
    ids = jnp.asarray(_ids(port, b=1, l=20))
    with jax.default_matmul_precision("highest"):
        jitted = jax.jit(lambda p, i: m.forward(p, port.cfg, i)[0])(port.params, ids)
        with jax.disable_jit():
            eager = m.forward(port.params, port.cfg, ids)[0]
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=0,
                               atol=2e-5 * float(jnp.abs(eager).max()))


def test_generate_does_not_retrace_and_matches_step_logits():
    port = Mamba2Port().load(fixture_dir("tiny-g1"))
    prompt = _ids(port, b=2, l=9, seed=3)
    first = port.generate(prompt, None, 12)
    before = dict(gen.TRACES)
    second = port.generate(_ids(port, b=2, l=9, seed=4), None, 12)
    assert gen.TRACES == before, "the decode loop was traced again for the same shapes"
    assert first.tokens.shape == second.tokens.shape == (2, 12)
    # the on-device loop picks the argmax of the same logits the host-side step path computes
    full = np.concatenate([prompt, first.tokens], axis=1)
    steps = port.step_logits(full, None, prompt.shape[1])[:, :-1]
    np.testing.assert_array_equal(steps.argmax(-1), first.tokens)
    top2 = np.sort(steps, axis=-1)[..., -2:]
    np.testing.assert_allclose(first.margins, top2[..., 1] - top2[..., 0], rtol=1e-4, atol=1e-4)


def test_decode_step_work_is_independent_of_position_and_chunk():
    """O(1) decode: the compiled step is the same program whatever the position or chunk_size."""
    port = Mamba2Port().load(fixture_dir("tiny-g1"))
    cfg = port.cfg
    cache = m.empty_cache(cfg, 1, jnp.float32)
    tok = jnp.zeros((1,), jnp.int32)

    def hlo(c):
        return jax.jit(lambda p, k, t: m.decode_step(p, c, k, t)).lower(port.params, cache, tok).as_text()

    assert hlo(cfg) == hlo(cfg.replace(chunk_size=1)) == hlo(cfg.replace(chunk_size=4096))


def test_out_of_range_tokens_poison_logits_inside_jit():
    """Inside jit we cannot raise; an out-of-range id must give NaN logits from its position on,
    never a silently clamped row. (Inside its chunk the NaN also reaches earlier positions through
    0 * NaN in the chunked form, as in transformers' chunk scan: the sequence is poisoned, loudly.)
    Other sequences of the batch are unaffected."""
    port = Mamba2Port().load(fixture_dir("tiny-g1"))
    ids = jnp.asarray([[1, 2, 3, 4], [1, 2, port.cfg.vocab_size + 5, 4]], jnp.int32)
    logits = np.asarray(jax.jit(lambda p, i: m.forward(p, port.cfg, i)[0])(port.params, ids))
    assert np.isnan(logits[1, 2:]).all()
    assert np.isfinite(logits[0]).all()
