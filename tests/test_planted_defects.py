"""Proof that the verdicts mean something: every porting bug of docs/porting-bugs.md that a port
can have ("row N" below is bug #N there), planted in the correct port (tests/planted_defects.py),
is flagged by the suite at the right tap or by the right check, and a planted defect that is
harmless on a fixture (tiled B/C with g = 1 or g = h) is not flagged there. (Porting bug #12 is
about the reference, not a port: tests/test_transformers_runner.py.) The correct port's side of
each check is tests/test_no_false_alarms.py (and tests/test_port.py).

Variants run through the port's own code paths with each sub-op jitted separately (see
tests/planting.py: one whole-forward compile per variant would cost minutes); the first test
checks that path against the port's jitted forward. Each test prints one `PLANTED` line: defect,
fixture, where it was flagged, measured RMS ratio (run with -s to see the table)."""

from __future__ import annotations

import numpy as np
import pytest

from equiv.compare import compare_tap
from equiv.fixtures import fixture_dir
from equiv.layerwise import format_ratio, run_layerwise
from equiv.mamba2.port import Mamba2Port
from tests.planted_checkpoints import (
    numpy_forward_fp64,
    write_d_hdim_checkpoint,
    write_strong_decay_checkpoint,
)
from tests.planted_defects import DEFECTS, decay_from_chunk_start, plant

CHUNK = 16


@pytest.fixture(scope="module")
def trio():
    """name or path -> (correct port model, reference fp32, oracle fp64), loaded once per module."""
    from equiv.references import load_reference

    cache = {}

    def get(name):
        if name not in cache:
            path = fixture_dir(name) if isinstance(name, str) else name
            cache[name] = (Mamba2Port().load(path),
                           load_reference("transformers", path, "float32", threads=1),
                           load_reference("transformers", path, "float64", threads=1))
        return cache[name]

    return get


def _ids(vocab, b=2, l=2 * CHUNK + 5, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (b, l)).astype(np.int32)


def _report(defect, fixture, where, ratio):
    print(f"\nPLANTED | {defect} | {fixture} | {where} | {format_ratio(ratio)}")


def _flagged_at(trio, fixture, defect, tap, mask=None, ids=None, mode="accumulated", label=None):
    """run_layerwise on the planted model: divergent, first divergence at `tap`, every tap before it
    passing; returns the result."""
    base, ref, oracle = trio(fixture)
    planted = plant(base, defect)
    ids = _ids(base.cfg.vocab_size) if ids is None else ids
    r = run_layerwise(planted, ref, oracle, ids, mask, mode=mode)
    assert planted.traced, f"{defect}: the broken function was never traced"
    fd = r.first_divergence
    assert r.verdict == "divergent" and fd is not None, f"{defect} on {fixture}: not flagged"
    assert fd.tap == tap, f"{defect} on {fixture}: first divergence {fd.explanation}, expected {tap}"
    assert all(t.verdict == "pass" for t in r.taps[:fd.index]), fd.explanation
    _report(planted.defect.name, label or fixture, f"{mode} {fd.tap}", fd.ratio)
    return r


def _failing(result):
    return {t.name for t in result.taps if t.verdict == "fail"}


def test_planting_path_without_a_defect_is_the_port(trio):
    """The un-jitted path with per-op jits and no defect: equal to the port's jitted forward up to
    float32 rounding, and equivalent by the suite."""
    base, ref, oracle = trio("tiny-g2")
    correct = plant(base, None)
    ids = _ids(base.cfg.vocab_size)
    got, want = correct.forward(ids)["logits"], base.forward(ids)["logits"]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    r = run_layerwise(correct, ref, oracle, ids)
    assert r.verdict == "equivalent", r.explanations


# ---------------------------------------------------------------------------------------------
# rows 1-3: flagged by the layer-wise diff at the op itself


@pytest.mark.parametrize("fixture", ["tiny-g2", "tiny-g1", "tiny-gh"])
def test_tiled_bc_flagged_at_ssm_only_when_1_lt_g_lt_h(trio, fixture):
    """Row 1. tile == repeat_interleave when g = 1 or g = h: there the planted port is correct and
    must pass, which shows the check tests the expansion order and nothing else."""
    base, ref, oracle = trio(fixture)
    planted = plant(base, "tiled_bc")
    ids = _ids(base.cfg.vocab_size)
    if fixture != "tiny-g2":
        r = run_layerwise(planted, ref, oracle, ids)
        assert planted.traced["mixer_ssm"]
        assert r.verdict == "equivalent", r.explanations
        _report("tiled_bc", fixture, "not flagged (tile == repeat here)", max(t.ratio for t in r.taps))
        return
    correct = plant(base, None).forward(ids)["logits"]
    assert not np.allclose(planted.forward(ids)["logits"], correct, atol=1e-3)
    _flagged_at(trio, fixture, "tiled_bc", "layers.0.mixer.ssm")
    iso = _flagged_at(trio, fixture, "tiled_bc", "layers.0.mixer.ssm", mode="isolated")
    assert _failing(iso) == {"layers.0.mixer.ssm", "layers.1.mixer.ssm"}  # judged op by op: only the SSM


@pytest.mark.parametrize("fixture", ["tiny-g2", "tiny-gh", "tiny-g1"])
def test_gated_norm_over_d_inner_flagged_at_gated_norm_when_g_gt_1(trio, fixture):
    """Row 2; with g = 1 the whole d_inner *is* the group, so the planted port is correct there."""
    if fixture == "tiny-g1":
        base, ref, oracle = trio(fixture)
        planted = plant(base, "gated_norm_over_d_inner")
        r = run_layerwise(planted, ref, oracle, _ids(base.cfg.vocab_size))
        assert planted.traced and r.verdict == "equivalent", r.explanations
        return
    _flagged_at(trio, fixture, "gated_norm_over_d_inner", "layers.0.mixer.gated_norm")
    iso = _flagged_at(trio, fixture, "gated_norm_over_d_inner", "layers.0.mixer.gated_norm", mode="isolated")
    assert _failing(iso) == {"layers.0.mixer.gated_norm", "layers.1.mixer.gated_norm"}


def test_norm_before_gate_flagged_at_gated_norm(trio):
    """Row 3."""
    _flagged_at(trio, "tiny-g2", "norm_before_gate", "layers.0.mixer.gated_norm")


# ---------------------------------------------------------------------------------------------
# row 4: the dt clamp, in prefill (layer-wise) and in decode (step logits vs the oracle)


@pytest.mark.parametrize("defect", ["dt_limit_skipped_in_prefill", "dt_limit_upper_only"])
def test_dt_clamp_defects_in_prefill_flagged_at_ssm(trio, defect):
    _flagged_at(trio, "tiny-dtlimit-bias", defect, "layers.0.mixer.ssm")


PROMPT = 2 * CHUNK + 5  # prefill at the layer-wise tests' length: the same compiled sub-ops


def _decode_check(model, ref, oracle, ids, prompt_len=PROMPT):
    """Teacher-forced cached decode vs the float64 oracle's full forward (tests/test_port.py)."""
    want = slice(prompt_len - 1, ids.shape[1])
    return compare_tap(f"step_logits[P={prompt_len}]", model.step_logits(ids, None, prompt_len),
                       ref.run(ids)["logits"][:, want], oracle.run(ids)["logits"][:, want])


def test_dt_clamp_skipped_in_decode_caught_by_decode_check(trio):
    base, ref, oracle = trio("tiny-dtlimit-bias")
    planted = plant(base, "dt_limit_skipped_in_decode")
    ids = _ids(base.cfg.vocab_size, l=PROMPT + 12)
    assert run_layerwise(planted, ref, oracle, ids[:, :PROMPT]).verdict == "equivalent"  # prefill is right
    correct = _decode_check(plant(base, None), ref, oracle, ids)
    assert correct.verdict == "pass", correct.reason
    res = _decode_check(planted, ref, oracle, ids)
    assert res.verdict == "fail", res.reason
    assert planted.traced["ssd_step"]
    _report("dt_limit_skipped_in_decode", "tiny-dtlimit-bias", "decode step_logits vs oracle", res.ratio)


# ---------------------------------------------------------------------------------------------
# rows 5 and 7: chunked prefill with a cache vs the full forward


SPLIT = CHUNK + 3  # unaligned; both calls get SPLIT tokens, so one compiled shape serves both


def _continuation_checks(model, ref, oracle, ids, split=SPLIT):
    """(first call, second call) of a split prefill, each vs the full forward's logits there."""
    got, r, o = model.continuation_logits(ids, split), ref.run(ids)["logits"], oracle.run(ids)["logits"]
    return (compare_tap(f"prefill[:{split}]", got[:, :split], r[:, :split], o[:, :split]),
            compare_tap(f"continuation[{split}:]", got[:, split:], r[:, split:], o[:, split:]))


@pytest.mark.parametrize("defect", ["continuation_zero_state", "continuation_drops_conv_window"])
def test_forward_with_cache_that_forgets_it_caught_by_continuation(trio, defect):
    """Row 5 (the correct port passes this check in tests/test_port.py)."""
    base, ref, oracle = trio("tiny-g2")
    planted = plant(base, defect)
    first, second = _continuation_checks(planted, ref, oracle, _ids(base.cfg.vocab_size, l=2 * SPLIT))
    assert first.verdict == "pass", first.reason  # no cache yet: nothing to forget
    assert second.verdict == "fail", second.reason
    assert planted.traced
    _report(defect, "tiny-g2", f"continuation at {SPLIT} vs full forward", second.ratio)


def test_initial_state_decay_from_chunk_start_caught_by_unaligned_split(trio):
    """Row 7: harmless without an initial state (a plain prefill, and the split's first call, pass);
    caught by the continuation of a split prefill at an unaligned offset."""
    base, ref, oracle = trio("tiny-g2")
    planted = plant(base, decay_from_chunk_start(SPLIT % CHUNK))
    first, second = _continuation_checks(planted, ref, oracle, _ids(base.cfg.vocab_size, l=2 * SPLIT))
    assert first.verdict == "pass", first.reason
    assert second.verdict == "fail", second.reason
    assert planted.traced["ssd_chunked"]
    _report(planted.defect.name, "tiny-g2", f"split prefill at {SPLIT}", second.ratio)


# ---------------------------------------------------------------------------------------------
# row 6: left padding


@pytest.mark.parametrize("defect,tap", [("padding_unmasked_before_in_proj", "layers.0.mixer.in_proj"),
                                        ("padding_unmasked_after_conv", "layers.0.mixer.conv")])
def test_unmasked_left_padding_flagged_by_padded_batch(trio, defect, tap):
    base, ref, oracle = trio("tiny-g2")
    ids = _ids(base.cfg.vocab_size)
    mask = np.ones_like(ids)
    mask[1, :11] = 0
    assert run_layerwise(plant(base, defect), ref, oracle, ids).verdict == "equivalent"  # no padding
    _flagged_at(trio, "tiny-g2", defect, tap, mask=mask, ids=ids)


# ---------------------------------------------------------------------------------------------
# row 8: per-head-dim D in the step (a mamba_ssm-format checkpoint: the torch runner can't load it)


def test_d_has_hdim_mishandled_in_step_caught_by_decode_vs_fp64(trio, tmp_path):
    """The float64 side is numpy_forward_fp64 (validated here against transformers' float64 run on
    tiny-g2); the float32 'reference' whose error sets the budget is the port's own full forward."""
    g2, _, g2_oracle = trio("tiny-g2")
    ids = _ids(g2.cfg.vocab_size)
    want = g2_oracle.run(ids)["logits"]
    rel = np.abs(numpy_forward_fp64(g2.cfg, g2.params, ids) - want).max() / np.abs(want).max()
    assert rel < 1e-10, f"the numpy float64 oracle disagrees with transformers' float64 run: {rel:.2e}"

    base = Mamba2Port().load(write_d_hdim_checkpoint(fixture_dir("tiny-g2"), tmp_path / "d-hdim"))
    assert base.format == "mamba_ssm" and base.cfg.d_has_hdim
    assert base.params["layers"][0]["D"].shape == (8, 16)
    ids = _ids(base.cfg.vocab_size, l=PROMPT + 12)
    oracle = numpy_forward_fp64(base.cfg, base.params, ids)
    assert np.abs(oracle - numpy_forward_fp64(g2.cfg, g2.params, ids)).max() > 0.1  # D (h, p) matters
    correct, planted = plant(base, None), plant(base, "d_hdim_per_head_in_step")
    full = correct.forward(ids, taps=False)["logits"]
    prefill = compare_tap("full", planted.forward(ids, taps=False)["logits"], full, oracle)
    assert prefill.verdict == "pass", prefill.reason  # the forward handles D (h, p); only the step is wrong
    want = slice(PROMPT - 1, ids.shape[1])
    ok = compare_tap("decode", correct.step_logits(ids, None, PROMPT), full[:, want], oracle[:, want])
    assert ok.verdict == "pass", ok.reason
    res = compare_tap("decode", planted.step_logits(ids, None, PROMPT), full[:, want], oracle[:, want])
    assert res.verdict == "fail", res.reason
    assert planted.traced["ssd_step"]
    _report("d_hdim_per_head_in_step", "tiny-g2 as mamba_ssm D_has_hdim", "decode vs numpy fp64 forward",
            res.ratio)


# ---------------------------------------------------------------------------------------------
# row 9: bf16 SSM state over a long decode


def test_bf16_ssm_state_drifts_over_a_long_decode(trio):
    base, ref, oracle = trio("tiny-g1")
    ids = _ids(base.cfg.vocab_size, l=PROMPT + 200, seed=9)
    planted = plant(base, "bf16_ssm_state")
    correct = _decode_check(plant(base, None), ref, oracle, ids)
    assert correct.verdict == "pass", correct.reason
    res = _decode_check(planted, ref, oracle, ids)  # 200 cached steps
    assert res.verdict == "fail", res.reason
    assert planted.traced["decode_step"]
    _report("bf16_ssm_state", "tiny-g1", "200-step decode step_logits vs oracle", res.ratio)


# ---------------------------------------------------------------------------------------------
# row 10: segsum as a cumsum difference, on a long strongly decaying model


@pytest.fixture(scope="module")
def strong_decay(tmp_path_factory):
    return write_strong_decay_checkpoint(tmp_path_factory.mktemp("ckpt") / "strong-decay")


def test_cumsum_difference_segsum_flagged_at_ssm_on_long_strong_decay(trio, strong_decay):
    base, ref, oracle = trio(strong_decay)
    ids = _ids(base.cfg.vocab_size, b=1, l=1000, seed=10)
    correct = run_layerwise(plant(base, None), ref, oracle, ids)
    assert correct.verdict == "equivalent", correct.explanations
    _report("(correct port)", "strong-decay l=1000", "not flagged, layers.0.mixer.ssm",
            correct.tap("layers.0.mixer.ssm").ratio)
    _flagged_at(trio, strong_decay, "segsum_cumsum_difference", "layers.0.mixer.ssm", ids=ids,
                label="strong-decay l=1000")


# ---------------------------------------------------------------------------------------------
# row 11 and extras: flagged by the layer-wise diff


@pytest.mark.parametrize("defect,tap", [
    ("tf32_matmuls", "layers.0.mixer.in_proj"),
    ("softplus_missing", "layers.0.mixer.ssm"),
    ("a_positive", "layers.0.mixer.ssm"),
    ("conv_not_causal", "layers.0.mixer.conv"),
])
def test_other_defects_flagged_at_their_op(trio, defect, tap):
    assert defect in DEFECTS
    _flagged_at(trio, "tiny-g1", defect, tap)


def test_the_main_job_fails_the_cancellation_segsum_on_the_trained_fixture():
    """Porting bug #10 on trained-bytes: inside the accumulated null there (~2.8x, like a correct
    independent port's 3.0047x), so the accumulated budget cannot tell them apart; the main job
    still fails it, through isolated mode at the SSD (~5x > 2). Golden reference: torch-free."""
    from equiv.check import check_fixture, reference_loader
    from equiv.families import family as get_family

    path = fixture_dir("trained-bytes")

    class PlantedPort:
        name = "builtin+segsum_cumsum_difference"

        def load(self, checkpoint_dir, dtype="float32"):
            return plant(Mamba2Port().load(checkpoint_dir, dtype), "segsum_cumsum_difference")

    golden = reference_loader(get_family("mamba2"), True, path.parent / "golden")
    outcome = check_fixture("trained-bytes", path, PlantedPort(), golden, progress=lambda _m: None)
    assert outcome.verdict == "fail", outcome.error
    fd = outcome.layerwise["isolated"].first_divergence
    assert fd is not None and fd.tap.endswith("mixer.ssm") and fd.ratio > 2.0, fd
    _report("segsum_cumsum_difference", "trained-bytes (main job)", f"isolated {fd.tap}", fd.ratio)
    acc = outcome.layerwise["accumulated"]
    _report("segsum_cumsum_difference", "trained-bytes (main job)", "accumulated worst ssm",
            max(t.ratio for t in acc.taps if t.name.endswith("mixer.ssm")))
