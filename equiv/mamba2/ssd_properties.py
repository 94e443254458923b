"""The SSD duality properties of equiv.mamba2.ssd, as plain functions, and a runner that needs no pytest.

Every property takes an `SSDInstance` (equiv.mamba2.ssd_strategies) and an `SSDReferences` object
(equiv.mamba2.ssd_harness): the float64 oracle and the float32 counterpart of each form, whose own error
against the oracle sets the budget (docs/architecture.md, "The error budget"): the port's error is at most
`budget` x that reference's on the same inputs; where two port results of the same quantity are
compared directly, they must agree within the triangle bound of that budget. Properties that hold
exactly in floating point (causality, power-of-two homogeneity) are checked bit for bit. A
property raises (AssertionError, equiv.compare.BudgetExceeded) when it does not hold.

The references are either the torch ones (equiv_reference.mamba2.ssd_references.TorchSSDReferences:
transformers' chunk scan and the torch recurrence, what the pytest suite uses) or the numpy ones
(equiv.mamba2.ssd_numpy.NumpySSDReferences: the same algorithms in numpy, no torch needed).

`run_ssd_properties` draws each property's examples with hypothesis, derandomized (the same
examples on every run, so a verdict is reproducible), without the example database and without
shrinking (the first falsifying example is reported as drawn), inside `strict_jax()`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

from equiv.mamba2 import ssd_harness as H
from equiv.mamba2.ssd_harness import SSDReferences
from equiv.mamba2.ssd_strategies import BUCKETS, Regime, SSDInstance, build_instance, ssd_instances
from equiv.property_runner import run_properties, runner_settings  # noqa: F401 - runner_settings re-exported

# ---------------------------------------------------------------------------------------------
# the properties


def forms_agree_within_budget(inst: SSDInstance, refs: SSDReferences) -> None:
    """chunked, scan and quadratic each within budget of the oracle, and of each other."""
    kw = inst.kwargs()
    truth = refs.oracle(kw)
    outs = {}
    for form in H.FORMS:
        outs[form] = H.run_form(form, kw, inst.chunk_size)
        H.check_budget(form, outs[form], refs.reference(form, kw, inst.chunk_size), truth)
    ref = refs.reference("chunked", kw, inst.chunk_size)
    for other in ("scan", "quadratic"):
        for i, what in enumerate(("y", "state")):
            H.assert_close_by_budget(f"chunked vs {other}: {what}", outs["chunked"][i], outs[other][i],
                                     ref[i], truth[i])


def chunk_size_invariance(inst: SSDInstance, refs: SSDReferences) -> None:
    """The chunk size is an implementation detail: two chunk sizes give the same result."""
    kw = inst.kwargs()
    truth = refs.oracle(kw)
    q1, q2 = inst.chunk_size, inst.bucket.alt_chunk
    a = H.run_form("chunked", kw, q1)
    b = H.run_form("chunked", kw, q2)
    H.check_budget(f"chunked(q={q2})", b, refs.reference("chunked", kw, q2), truth)
    ref1 = refs.reference("chunked", kw, q1)
    for i, what in enumerate(("y", "state")):
        H.assert_close_by_budget(f"q={q1} vs q={q2}: {what}", a[i], b[i], ref1[i], truth[i])


def split_prefill_equals_one_pass(inst: SSDInstance, refs: SSDReferences) -> None:
    """Run [0, t), hand its final state to a run of [t, l): the same as one pass
    (docs/porting-bugs.md #5 and #7; t aligned to the chunk in some buckets, not in others)."""
    kw, t, q = inst.kwargs(), inst.bucket.split, inst.chunk_size
    truth = refs.oracle(kw)
    y1, s1 = H.run_form("chunked", H.time_slice(kw, 0, t), q)
    y2, s2 = H.run_form("chunked", H.time_slice(kw, t, None, initial_states=s1), q)
    split = (np.concatenate([y1, y2], axis=1), s2)
    # the reference, split the same way
    r1 = refs.reference("chunked", H.time_slice(kw, 0, t), q)
    r2 = refs.reference("chunked", H.time_slice(kw, t, None, initial_states=r1[1]), q)
    ref = (np.concatenate([r1[0], r2[0]], axis=1), r2[1])
    H.check_budget(f"split at t={t}", split, ref, truth)
    one = H.run_form("chunked", kw, q)
    for i, what in enumerate(("y", "state")):
        H.assert_close_by_budget(f"split at t={t} vs one pass: {what}", split[i], one[i], ref[i], truth[i])


def step_by_step_equals_chunked(inst: SSDInstance, refs: SSDReferences) -> None:
    """ssd_step from the host, token by token (the decode loop), == the chunked prefill."""
    kw = inst.kwargs()
    truth = refs.oracle(kw)
    steps = H.run_steps(kw)
    H.check_budget("step loop", steps, refs.reference("step", kw), truth)
    chunked = H.run_form("chunked", kw, inst.chunk_size)
    ref = refs.reference("chunked", kw, inst.chunk_size)
    for i, what in enumerate(("y", "state")):
        H.assert_close_by_budget(f"steps vs chunked: {what}", steps[i], chunked[i], ref[i], truth[i])


def readout_of_final_state_is_last_output(inst: SSDInstance, refs: SSDReferences) -> None:
    """ssd_readout of the chunked form's final state == its y at the last position: how the port's
    prefill gets the last position's y without computing the others (model.mixer_last_position)."""
    kw = inst.kwargs()
    truth = refs.oracle(kw)
    y, state = H.run_form("chunked", kw, inst.chunk_size)
    ref = refs.reference("chunked", kw, inst.chunk_size)
    H.assert_close_by_budget("readout(final state) vs chunked y[:, -1]", H.run_readout(state, kw),
                             y[:, -1], ref[0][:, -1], truth[0][:, -1])


def linearity_in_x(inst: SSDInstance, refs: SSDReferences, k: int, coef: float) -> None:
    """y is linear in (x, initial state). Scaling both by 2**k is exact in floating point, so the
    chunked form must be exactly homogeneous. Additivity, y(x1 + c x2) = y(x1) + c (y(x2) - y(0))
    with the same initial state throughout, is checked against the oracle of the sum, within the
    triangle bound of its three terms' budgets: the combination cancels, so the reference's error
    on the combined value can be far below what three correct float32 runs add up to (comparing
    with it raised false alarms, about 1 in 6,000-10,000 random examples, with the torch
    references as with the numpy ones)."""
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
    parts = {"x1": kw["x"], "x2": x2, "0": np.zeros_like(kw["x"])}
    weights = {"x1": 1.0, "x2": abs(float(c)), "0": abs(float(c))}
    port = {n: H.run_form("chunked", {**kw, "x": x}, q) for n, x in parts.items()}
    ref = {n: refs.reference("chunked", {**kw, "x": x}, q) for n, x in parts.items()}
    truth = {n: refs.oracle({**kw, "x": x}) for n, x in parts.items()}
    truth_sum = refs.oracle({**kw, "x": kw["x"].astype(np.float64) + np.float64(c) * x2})
    for i, what in enumerate(("y", "state")):
        combined = port["x1"][i] + c * (port["x2"][i] - port["0"][i])
        H.assert_within_triangle_bound(
            f"y(x1) + c (y(x2) - y(0)): {what}", combined, truth_sum[i],
            [(weights[n], ref[n][i], truth[n][i]) for n in parts])


def causality_bit_exact(inst: SSDInstance, refs: SSDReferences, t: int) -> None:
    """Changing the inputs at t and later (x, dt, B, C, z) leaves y[:, :t] bit for bit unchanged,
    in every form: masked positions contribute exact zeros, and the same executable reduces the
    same values in the same order. Finite changes only: a NaN/inf at t reaches the earlier positions
    of its chunk through 0 * NaN in the intra-chunk contraction (transformers' chunk scan too).
    `t` is in [1, l)."""
    del refs  # exact: no budget
    kw, q = inst.kwargs(), inst.chunk_size
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


def padding_invariance(inst: SSDInstance, refs: SSDReferences) -> None:
    """l = t not a multiple of the chunk (the form pads internally): output and final state equal
    those of a longer run whose first t tokens are the same."""
    kw, q, t = inst.kwargs(), inst.chunk_size, inst.bucket.split
    short_kw = H.time_slice(kw, 0, t)
    short = H.run_form("chunked", short_kw, q)
    long_y = H.run_form("chunked", kw, q)[0]
    truth = refs.oracle(short_kw)
    ref = refs.reference("chunked", short_kw, q)
    H.check_budget(f"l={t}, chunk={q}", short, ref, truth)
    H.assert_close_by_budget("y vs prefix of the longer run", short[0], long_y[:, :t], ref[0], truth[0])
    if inst.structure.dt_limit[0] == 0.0:
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


def bfloat16_inputs(inst: SSDInstance, refs: SSDReferences) -> None:
    """bf16 x, dt, B, C, z: outputs finite, in bf16, within BF16_OUTPUT_ULPS of the float32 result
    on the same values; the state stays float32 (docs/porting-bugs.md #9). Two buckets (every optional
    argument between them): a bf16 executable is one more compile per bucket."""
    del refs  # compared with the float32 run of the same values, not with the oracle
    kw, q = inst.kwargs(), inst.chunk_size
    bf = ml_dtypes.bfloat16
    kw16 = {k: (v.astype(bf) if k in H.TIME_ARRAYS and v is not None else v) for k, v in kw.items()}
    kw32 = {k: (v.astype(np.float32) if k in H.TIME_ARRAYS and v is not None else v)
            for k, v in kw16.items()}
    y16, s16 = H.run_form("chunked", kw16, q)
    y32, s32 = H.run_form("chunked", kw32, q)
    assert y16.dtype == bf and s16.dtype == np.float32, (y16.dtype, s16.dtype)
    assert np.isfinite(y16.astype(np.float32)).all() and np.isfinite(s16).all(), "non-finite output"
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


# ---------------------------------------------------------------------------------------------
# the registry: what each property draws


@st.composite
def _instance_and_time(draw, buckets=BUCKETS):
    inst = draw(ssd_instances(buckets))
    return inst, draw(st.integers(1, inst.bucket.l - 1), label="t")


@dataclass(frozen=True)
class SSDProperty:
    """A property, the hypothesis strategies of its drawn arguments (by keyword) and its explicit
    examples (always run first, whatever the number of drawn ones)."""

    name: str
    body: Callable[..., None]
    strategies: Callable[[], dict]
    examples: Callable[[], list[dict]] = field(default=lambda: [])

    @property
    def doc(self) -> str:
        return (self.body.__doc__ or "").strip()


def _corner_examples() -> list[dict]:
    """The corners of the value ranges: strongest decay with the largest values, and almost no
    decay with the smallest."""
    return [
        {"inst": build_instance("C-long", Regime(seed=1, log10_decay_max=float(np.log10(16.0)),
                                                 log10_x_scale=2.0, dt_center=3.0))},
        {"inst": build_instance("A-tail", Regime(seed=2, log10_decay_max=-3.0, log10_x_scale=-2.0,
                                                 dt_center=-6.0))},
    ]


def _unaligned() -> tuple:
    return tuple(bk for bk in BUCKETS if not bk.split_aligned)


def _bf16_buckets() -> tuple:
    return tuple(bk for bk in BUCKETS if bk.name in ("A-tail", "C-long"))


PROPERTIES: tuple[SSDProperty, ...] = (
    SSDProperty("forms_agree_within_budget", forms_agree_within_budget,
                lambda: {"inst": ssd_instances()}, _corner_examples),
    SSDProperty("chunk_size_invariance", chunk_size_invariance, lambda: {"inst": ssd_instances()}),
    SSDProperty("split_prefill_equals_one_pass", split_prefill_equals_one_pass,
                lambda: {"inst": ssd_instances()}),
    SSDProperty("step_by_step_equals_chunked", step_by_step_equals_chunked,
                lambda: {"inst": ssd_instances()}),
    SSDProperty("readout_of_final_state_is_last_output", readout_of_final_state_is_last_output,
                lambda: {"inst": ssd_instances()}),
    SSDProperty("linearity_in_x", linearity_in_x,
                lambda: {"inst": ssd_instances(), "k": st.integers(-6, 6),
                         "coef": st.floats(-3.0, 3.0, allow_nan=False)}),
    SSDProperty("causality_bit_exact", causality_bit_exact, lambda: {"inst_t": _instance_and_time()}),
    SSDProperty("padding_invariance", padding_invariance,
                lambda: {"inst": ssd_instances(buckets=_unaligned())}),
    SSDProperty("bfloat16_inputs", bfloat16_inputs,
                lambda: {"inst": ssd_instances(buckets=_bf16_buckets())}),
)
PROPERTIES_BY_NAME = {p.name: p for p in PROPERTIES}


def _call(prop: SSDProperty, refs: SSDReferences, drawn: dict) -> None:
    drawn = dict(drawn)
    if "inst_t" in drawn:
        drawn["inst"], drawn["t"] = drawn.pop("inst_t")
    inst = drawn.pop("inst")
    prop.body(inst, refs, **drawn)


def hypothesis_test(prop: SSDProperty, refs: SSDReferences, test_settings: settings | None = None,
                    on_example: Callable[[], None] | None = None) -> Callable[[], None]:
    """The property as a hypothesis test: a function of no arguments that runs the explicit
    examples, draws the others and raises on the first that fails. Without `test_settings` the
    current hypothesis profile applies (what a pytest wrapper wants). `on_example` is called at
    every execution of the property, hypothesis' replay of a falsifying drawn example included."""

    def run(**drawn):
        if on_example is not None:
            on_example()
        _call(prop, refs, drawn)

    run.__name__ = run.__qualname__ = prop.name
    run.__doc__ = prop.body.__doc__
    # derandomized runs seed from a digest of the test function: the same wrapper serves every
    # property, so the property's name goes into the digest, giving each its own examples
    run._hypothesis_internal_add_digest = prop.name.encode()
    test = given(**prop.strategies())(run)
    for ex in reversed(prop.examples()):
        test = example(**ex)(test)
    return test if test_settings is None else test_settings(test)


# ---------------------------------------------------------------------------------------------
# the runner


DEFAULT_EXAMPLES_PER_PROPERTY = 400
"""Examples per property in the main job (`equiv check`), plus the explicit corner cases: 3,602 in
all, 10x what the pytest `ci` profile draws. Measured on the 2-core CPU with the numpy references,
in a fresh process without a persistent compilation cache: 31-32 s wall (three runs; XLA's compiles
take about 13 s of it, then ~5 ms per example); 1,000 per property took 67 s. Command:
`python -c "from equiv.mamba2.ssd_numpy import NumpySSDReferences; from equiv.mamba2.ssd_properties import
run_ssd_properties; print(run_ssd_properties(NumpySSDReferences())['detail'])"`."""


def run_ssd_properties(references: SSDReferences, examples_per_property: int = DEFAULT_EXAMPLES_PER_PROPERTY,
                       progress: Callable[[str], None] | None = None) -> dict:
    """Run every SSD property on `examples_per_property` drawn examples each (plus the explicit
    corner cases), without pytest, and return a JSON-serialisable verdict:

        {"verdict": "pass" | "fail", "properties_run", "properties_passed", "properties_failed",
         "examples": total executions (a failed property's include the shrinker's attempts),
         "references": references.provenance(),
         "properties": [{"name", "verdict", "examples", "detail"}], "detail": one line}

    A property that raises anything (a failed check, an unexpected exception, a hypothesis health
    check) is a failure with its message; the runner itself does not raise. The strict jax
    configuration (`equiv.mamba2.ssd_harness.strict_jax`) is in effect for the whole run and restored
    after."""
    return run_properties(PROPERTIES, references, hypothesis_test, examples_per_property,
                          label="SSD property", strict=H.strict_jax, progress=progress)


__all__ = [
    "DEFAULT_EXAMPLES_PER_PROPERTY", "PROPERTIES", "PROPERTIES_BY_NAME", "SSDProperty", "bfloat16_inputs",
    "causality_bit_exact", "chunk_size_invariance", "forms_agree_within_budget", "hypothesis_test",
    "linearity_in_x", "padding_invariance", "readout_of_final_state_is_last_output", "run_ssd_properties",
    "runner_settings", "split_prefill_equals_one_pass", "step_by_step_equals_chunked",
]
