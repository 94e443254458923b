"""The error budget must separate rounding from defects (docs/architecture.md; docs/porting-bugs.md #10).

Must-show: on a long, strongly decaying sequence, `ssd_chunked`'s error against the float64 oracle
is within 2x the error of transformers' float32 chunk scan, and the same code with mamba2-jax
1.1.2's segment sum (a difference of cumulative sums) fails the same budget. Then unit tests of
`compare_tap`'s edge cases.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from equiv.compare import FLOOR_ULPS, BudgetExceeded, assert_within_budget, compare_tap, ulp_at
from equiv.mamba2 import ssd
from tests.planted_ssd import ssd_chunked_cumsum_difference

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:triton.*")

# ---------------------------------------------------------------------------------------------
# must-show: l = 1000, chunk 256, strong decay


@functools.cache
def long_strong_decay():
    """b=1, l=1000, h=8, p=32, n=32, g=1; A in [-16, -1]; dt = softplus(N(-1, 1)), so A * dt
    reaches -10 and beyond on many steps (the regime where cumsum differences cancel). Returns the
    inputs, the float64 oracle and transformers' float32 chunk scan (the torch reference)."""
    import torch

    torch.set_num_threads(1)
    from equiv_reference.mamba2 import ssd_oracles

    rng = np.random.default_rng(0)
    b, l, h, p, n, g = 1, 1000, 8, 32, 32, 1
    f32 = np.float32
    kw = dict(
        x=rng.standard_normal((b, l, h, p)).astype(f32),
        dt=(rng.standard_normal((b, l, h)) - 1.0).astype(f32),
        A=-rng.uniform(1.0, 16.0, size=h).astype(f32),
        B=rng.standard_normal((b, l, g, n)).astype(f32),
        C=rng.standard_normal((b, l, g, n)).astype(f32),
        dt_softplus=True,
    )
    oracle = ssd_oracles.ssd_oracle_fp64(**kw)
    reference = ssd_oracles.transformers_chunk_scan(**kw, chunk_size=256)
    assert ssd_oracles.transformers_chunk_scan_provenance()["torch_fallback"]
    return kw, oracle, reference


def _chunked_fp32(kw):
    run = jax.jit(lambda **a: ssd.ssd_chunked(**a, chunk_size=256, return_final_states=True),
                  static_argnames=("dt_softplus",))
    y, state = run(**kw)
    return np.asarray(y), np.asarray(state)


def test_chunked_within_2x_of_torch_fp32_on_long_strong_decay():
    kw, oracle, reference = long_strong_decay()
    dA = np.asarray(ssd.discretize_dt(kw["dt"], dt_softplus=True)) * kw["A"]
    assert dA.min() < -10.0, "the inputs must reach A * dt <= -10 for this test to mean anything"
    y, state = _chunked_fp32(kw)
    res = assert_within_budget("ssd_chunked y (l=1000, chunk 256)", y, reference[0], oracle[0], budget=2.0)
    res_state = assert_within_budget("ssd_chunked final state", state, reference[1], oracle[1], budget=2.0)
    print(f"\nssd_chunked vs float64 oracle: RMS err {res.err_port:.3g}, transformers fp32 RMS err "
          f"{res.err_ref:.3g}, ratio {res.ratio:.2f}; max err {res.max_err_port:.3g} vs "
          f"{res.max_err_ref:.3g}, ratio {res.ratio_max:.2f} (state ratio {res_state.ratio:.2f})")


def test_cumsum_difference_segsum_fails_the_budget():
    kw, oracle, reference = long_strong_decay()
    run = jax.jit(lambda **a: ssd_chunked_cumsum_difference(**a, chunk_size=256),
                  static_argnames=("dt_softplus",))
    y = np.asarray(run(**kw))
    res = compare_tap("planted cumsum-difference segsum", y, reference[0], oracle[0], budget=2.0)
    print(f"\ncumsum-difference segsum: RMS err {res.err_port:.3g} vs reference {res.err_ref:.3g}, "
          f"ratio {res.ratio:.1f} (max-error ratio {res.ratio_max:.1f}): {res.verdict}")
    assert res.verdict == "fail" and res.ratio > 2.0, res.reason
    with pytest.raises(BudgetExceeded, match="reference's own float error"):
        assert_within_budget("planted", y, reference[0], oracle[0], budget=2.0)


# ---------------------------------------------------------------------------------------------
# compare_tap edge cases


def _triple(shape=(3, 4), seed=0):
    rng = np.random.default_rng(seed)
    oracle = rng.standard_normal(shape)
    reference = (oracle + 1e-6 * rng.standard_normal(shape)).astype(np.float32)
    port = (oracle + 1e-6 * rng.standard_normal(shape)).astype(np.float32)
    return port, reference, oracle


def test_nan_at_the_same_positions_passes():
    port, reference, oracle = _triple()
    for a in (port, reference, oracle):
        a[1, 2] = np.nan
    res = compare_tap("t", port, reference, oracle)
    assert res.verdict == "pass", res.reason
    assert np.isfinite(res.err_port)


def test_nan_at_different_positions_fails_naming_them():
    port, reference, oracle = _triple()
    port[2, 3] = np.nan
    port[0, 1] = np.inf
    res = compare_tap("t", port, reference, oracle)
    assert res.verdict == "fail"
    assert res.nonfinite["port_mismatch_count"] == 2
    assert res.nonfinite["port_mismatch_first"] == [[0, 1], [2, 3]]
    assert "[0, 1]" in res.reason and "2 position(s)" in res.reason


def test_all_nan_port_fails():
    port, reference, oracle = _triple()
    port[:] = np.nan
    res = compare_tap("t", port, reference, oracle)
    assert res.verdict == "fail" and res.nonfinite["port_mismatch_count"] == port.size
    # all-NaN everywhere: nothing finite to compare is not a pass either
    nan = np.full((2, 2), np.nan)
    res_all = compare_tap("t", nan, nan, nan)
    assert res_all.verdict == "fail" and "no finite values" in res_all.reason


def test_exact_reference_uses_the_floor():
    # every |oracle| in [1, 2): one float32 ULP (2**-23) at the max and at the RMS scale alike
    oracle = np.array([1.5, -1.25, 1.75, 1.0])  # exactly representable: the reference is exact
    reference = oracle.astype(np.float32)
    ulp = 2.0**-23
    assert ulp_at(1.5, "float32") == ulp
    one_ulp_off = (oracle + ulp * np.sign(oracle)).astype(np.float32)
    res = compare_tap("t", one_ulp_off, reference, oracle)
    assert res.err_ref == 0.0 and res.floor == FLOOR_ULPS * ulp
    assert res.verdict == "pass" and res.ratio == pytest.approx(1 / FLOOR_ULPS)
    ten_ulps_off = (oracle + 10 * ulp * np.sign(oracle)).astype(np.float32)
    res_bad = compare_tap("t", ten_ulps_off, reference, oracle)
    assert res_bad.verdict == "fail" and res_bad.ratio == pytest.approx(10 / FLOOR_ULPS)


def test_shape_mismatch_fails():
    port, reference, oracle = _triple()
    res = compare_tap("t", port[:, :3], reference, oracle)
    assert res.verdict == "fail" and "shape mismatch" in res.reason
    with pytest.raises(BudgetExceeded, match="shape mismatch"):
        assert_within_budget("t", port, reference[:2], oracle)


def test_reference_far_from_the_oracle_is_not_a_pass():
    # A wrong yardstick (a reference or oracle with different math, e.g. transformers 5.17's
    # whole-d_inner gated norm) makes a port that shares the difference look "as accurate as the
    # reference": ratio ~1. The reference's own relative error must expose it.
    rng = np.random.default_rng(3)
    oracle = rng.standard_normal((64, 32))
    shared_bug = (oracle * 1.05).astype(np.float32)  # 5% off, on both sides
    res = compare_tap("layers.0.mixer.gated_norm", shared_bug, shared_bug, oracle)
    assert res.ratio == pytest.approx(1.0)
    assert res.verdict == "fail"
    assert res.ref_rel_error == pytest.approx(0.05, rel=1e-3)
    assert res.reason.startswith("the reference itself is 0.05")


def test_tf32_level_reference_error_is_still_a_yardstick():
    # mamba_ssm's Triton kernels on an H100: ~1e-3 relative; a port far better than that passes
    rng = np.random.default_rng(4)
    oracle = rng.standard_normal((64, 32))
    reference = (oracle * (1 + 1e-3 * rng.standard_normal(oracle.shape))).astype(np.float32)
    port = oracle.astype(np.float32)
    res = compare_tap("layers.0.mixer.ssm", port, reference, oracle)
    assert 5e-4 < res.ref_rel_error < 2e-3
    assert res.verdict == "pass", res.reason
