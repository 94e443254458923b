"""Property tests of the SSD duality in equiv.ssd: chunked == scan == quadratic == step, on every
bucket of equiv.strategies, by the error budget against the float64 oracle.

Each property is checked by the error budget (design.md): the port's error vs the float64 oracle is
at most `budget` x the error of the torch float32 counterpart (tests/ssd_harness.py says which)
on the same inputs; where two port results of the same quantity are compared directly, they must
agree to within budget x that reference error. Properties that hold exactly in floating point
(causality, power-of-two homogeneity) are checked bit for bit.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from equiv.strategies import BUCKETS, Regime, build_instance, ssd_instances
from tests import ssd_harness as H

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:triton.*")


@given(inst=ssd_instances())
# the corners of the value ranges, always run: strongest decay with the largest values, and almost
# no decay with the smallest
@example(inst=build_instance("C-long", Regime(seed=1, log10_decay_max=float(np.log10(16.0)),
                                               log10_x_scale=2.0, dt_center=3.0)))
@example(inst=build_instance("A-tail", Regime(seed=2, log10_decay_max=-3.0, log10_x_scale=-2.0,
                                               dt_center=-6.0)))
def test_forms_agree_within_budget(inst):
    """chunked, scan and quadratic each within budget of the oracle, and of each other."""
    kw = inst.kwargs()
    truth = H.oracle(kw)
    outs = {}
    for form in H.FORMS:
        outs[form] = H.run_form(form, kw, inst.chunk_size)
        H.check_budget(form, outs[form], H.torch_reference(form, kw, inst.chunk_size), truth)
    ref = H.torch_reference("chunked", kw, inst.chunk_size)
    for other in ("scan", "quadratic"):
        for i, what in enumerate(("y", "state")):
            H.assert_close_by_budget(f"chunked vs {other}: {what}", outs["chunked"][i], outs[other][i],
                                     ref[i], truth[i])


@given(inst=ssd_instances())
def test_chunk_size_invariance(inst):
    """The chunk size is an implementation detail: two chunk sizes give the same result."""
    kw = inst.kwargs()
    truth = H.oracle(kw)
    q1, q2 = inst.chunk_size, inst.bucket.alt_chunk
    a = H.run_form("chunked", kw, q1)
    b = H.run_form("chunked", kw, q2)
    ref2 = H.torch_reference("chunked", kw, q2)
    H.check_budget(f"chunked(q={q2})", b, ref2, truth)
    ref1 = H.torch_reference("chunked", kw, q1)
    for i, what in enumerate(("y", "state")):
        H.assert_close_by_budget(f"q={q1} vs q={q2}: {what}", a[i], b[i], ref1[i], truth[i])


@given(inst=ssd_instances())
def test_split_prefill_equals_one_pass(inst):
    """Run [0, t), hand its final state to a run of [t, l): the same as one pass (known-bugs.md
    rows 5 and 7; t aligned to the chunk in some buckets, not in others)."""
    kw, t, q = inst.kwargs(), inst.bucket.split, inst.chunk_size
    truth = H.oracle(kw)
    y1, s1 = H.run_form("chunked", H.time_slice(kw, 0, t), q)
    y2, s2 = H.run_form("chunked", H.time_slice(kw, t, None, initial_states=s1), q)
    split = (np.concatenate([y1, y2], axis=1), s2)
    # the torch reference, split the same way
    r1 = H.torch_reference("chunked", H.time_slice(kw, 0, t), q)
    r2 = H.torch_reference("chunked", H.time_slice(kw, t, None, initial_states=r1[1]), q)
    ref = (np.concatenate([r1[0], r2[0]], axis=1), r2[1])
    H.check_budget(f"split at t={t}", split, ref, truth)
    one = H.run_form("chunked", kw, q)
    for i, what in enumerate(("y", "state")):
        H.assert_close_by_budget(f"split at t={t} vs one pass: {what}", split[i], one[i], ref[i], truth[i])


@given(inst=ssd_instances())
def test_step_by_step_equals_chunked(inst):
    """ssd_step from the host, token by token (the decode loop), == the chunked prefill."""
    kw = inst.kwargs()
    truth = H.oracle(kw)
    steps = H.run_steps(kw)
    H.check_budget("step loop", steps, H.torch_reference("step", kw), truth)
    chunked = H.run_form("chunked", kw, inst.chunk_size)
    ref = H.torch_reference("chunked", kw, inst.chunk_size)
    for i, what in enumerate(("y", "state")):
        H.assert_close_by_budget(f"steps vs chunked: {what}", steps[i], chunked[i], ref[i], truth[i])


@given(inst=ssd_instances())
def test_readout_of_final_state_is_last_output(inst):
    """ssd_readout of the chunked form's final state == its y at the last position: how the port's
    prefill gets the last position's y without computing the others (model.mixer_last_position)."""
    kw = inst.kwargs()
    truth = H.oracle(kw)
    y, state = H.run_form("chunked", kw, inst.chunk_size)
    ref = H.torch_reference("chunked", kw, inst.chunk_size)
    H.assert_close_by_budget("readout(final state) vs chunked y[:, -1]", H.run_readout(state, kw),
                             y[:, -1], ref[0][:, -1], truth[0][:, -1])


@given(inst=ssd_instances(), k=st.integers(-6, 6), coef=st.floats(-3.0, 3.0, allow_nan=False))
def test_linearity_in_x(inst, k, coef):
    """y is linear in (x, initial state). Scaling both by 2**k is exact in floating point, so the
    chunked form must be exactly homogeneous; additivity y(x1 + c x2) = y(x1) + c (y(x2) - y(0))
    (with the same initial state throughout) is checked by the budget."""
    kw, q = inst.kwargs(), inst.chunk_size
    scale = np.float32(2.0**k)
    h0 = kw["initial_states"]
    y, s = H.run_form("chunked", kw, q)
    ys, ss = H.run_form("chunked", {**kw, "x": kw["x"] * scale,
                                    "initial_states": None if h0 is None else h0 * scale}, q)
    np.testing.assert_array_equal(ys, y * scale, err_msg=f"y(2^{k} x) != 2^{k} y(x)")
    np.testing.assert_array_equal(ss, s * scale, err_msg=f"state(2^{k} x) != 2^{k} state(x)")

    x2 = np.random.default_rng(inst.regime.seed + 1).standard_normal(kw["x"].shape).astype(np.float32)
    c = np.float32(coef)
    zero = np.zeros_like(kw["x"])

    def combined(run):
        a, b, z0 = (run({**kw, "x": x}) for x in (kw["x"], x2, zero))
        return a[0] + c * (b[0] - z0[0]), a[1] + c * (b[1] - z0[1])

    port = combined(lambda k_: H.run_form("chunked", k_, q))
    ref = combined(lambda k_: H.torch_reference("chunked", k_, q))
    truth = H.oracle({**kw, "x": kw["x"].astype(np.float64) + np.float64(c) * x2})
    H.check_budget("y(x1) + c (y(x2) - y(0))", port, ref, truth)


@given(inst=ssd_instances(), data=st.data())
def test_causality_bit_exact(inst, data):
    """Changing the inputs at t and later (x, dt, B, C, z) leaves y[:, :t] bit for bit unchanged,
    in every form: masked positions contribute exact zeros, and the same executable reduces the
    same values in the same order. Finite changes only: a NaN/inf at t reaches the earlier positions
    of its chunk through 0 * NaN in the intra-chunk contraction (transformers' chunk scan too)."""
    kw, q = inst.kwargs(), inst.chunk_size
    t = data.draw(st.integers(1, inst.bucket.l - 1), label="t")
    rng = np.random.default_rng(inst.regime.seed + 7)
    changed = dict(kw)
    for name in H.TIME_ARRAYS:
        if kw[name] is not None:
            arr = kw[name].copy()
            arr[:, t:] = (rng.standard_normal(arr[:, t:].shape) * 3).astype(arr.dtype)
            if name == "dt" and not inst.structure.dt_softplus:
                arr[:, t:] = np.abs(arr[:, t:])
            changed[name] = arr
    for form in H.FORMS:
        y = H.run_form(form, kw, q)[0]
        y_changed = H.run_form(form, changed, q)[0]
        np.testing.assert_array_equal(y_changed[:, :t], y[:, :t],
                                      err_msg=f"{form}: inputs at t >= {t} changed y before t")


@given(inst=ssd_instances(buckets=tuple(bk for bk in BUCKETS if not bk.split_aligned)))
def test_padding_invariance(inst):
    """l = t not a multiple of the chunk (the form pads internally): output and final state equal
    those of a longer run whose first t tokens are the same."""
    kw, q, t = inst.kwargs(), inst.chunk_size, inst.bucket.split
    short_kw = H.time_slice(kw, 0, t)
    short = H.run_form("chunked", short_kw, q)
    long_y = H.run_form("chunked", kw, q)[0]
    truth = H.oracle(short_kw)
    ref = H.torch_reference("chunked", short_kw, q)
    H.check_budget(f"l={t}, chunk={q}", short, ref, truth)
    H.assert_close_by_budget("y vs prefix of the longer run", short[0], long_y[:, :t], ref[0], truth[0])
    lo = inst.structure.dt_limit[0]
    if lo == 0.0:
        # the longer run with explicit padding after t (dt = 0 after discretisation: no decay, no
        # input) ends in the state at t; with a lower dt limit > 0 no raw dt discretises to 0
        pad_dt = -np.inf if inst.structure.dt_softplus else 0.0
        dt = kw["dt"].copy()
        dt[:, t:] = pad_dt
        padded_state = H.run_form("chunked", {**kw, "dt": dt}, q)[1]
        H.assert_close_by_budget("state vs padded longer run", short[1], padded_state, ref[1], truth[1])


BF16_OUTPUT_ULPS = 1.0
"""bf16 bound. ssd_chunked computes in float32 whatever the input dtype, so with bf16 inputs the
only new rounding is the output's: y_bf16 = round_bf16(y32), where y32 is the float32 result on
the same (bf16-representable) values. Round-to-nearest costs 0.5 bf16 ULP; the other 0.5 covers a
float32 difference between the two executables that moves y32 across a rounding boundary. Plus
FP32_NOISE_ULPS float32 ULPs at the tensor's scale for that float32 difference itself (elements
near zero, where a bf16 ULP is tiny)."""
FP32_NOISE_ULPS = 64


@given(inst=ssd_instances(buckets=tuple(bk for bk in BUCKETS if bk.name in ("A-tail", "C-long"))))
def test_bfloat16_inputs(inst):
    """bf16 x, dt, B, C, z: outputs finite, in bf16, within BF16_OUTPUT_ULPS of the float32 result
    on the same values; the state stays float32 (known-bugs.md row 9). Two buckets (every optional
    argument between them): a bf16 executable is one more compile per bucket."""
    kw, q = inst.kwargs(), inst.chunk_size
    bf = ml_dtypes.bfloat16
    kw16 = {k: (v.astype(bf) if k in H.TIME_ARRAYS and v is not None else v) for k, v in kw.items()}
    kw32 = {k: (v.astype(np.float32) if k in H.TIME_ARRAYS and v is not None else v)
            for k, v in kw16.items()}
    y16, s16 = H.run_form("chunked", kw16, q)
    y32, s32 = H.run_form("chunked", kw32, q)
    assert y16.dtype == bf and s16.dtype == np.float32
    assert np.isfinite(y16.astype(np.float32)).all() and np.isfinite(s16).all()
    scale = float(np.abs(y32).max())
    y16f = y16.astype(np.float64)
    spacing16 = np.spacing(np.abs(y32).astype(bf)).astype(np.float64)
    tol = BF16_OUTPUT_ULPS * spacing16 + FP32_NOISE_ULPS * float(np.spacing(np.float32(scale)))
    over = np.abs(y16f - y32) > tol
    assert not over.any(), (f"bf16 y off the float32 result by more than {BF16_OUTPUT_ULPS} bf16 ULP at "
                            f"{np.argwhere(over)[:3].tolist()}: {y16f[over][:3]} vs {y32[over][:3]}")
    s_tol = FP32_NOISE_ULPS * float(np.spacing(np.float32(np.abs(s32).max())))
    np.testing.assert_allclose(s16, s32, rtol=0, atol=s_tol,
                               err_msg="float32 state of a bf16 run differs from the float32 run's")
