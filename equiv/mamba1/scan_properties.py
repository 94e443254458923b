"""The properties of Mamba-1's selective scan (equiv.mamba1.scan), as plain functions, and a runner
that needs no pytest.

Every property takes a `ScanInstance` (equiv.mamba1.scan_strategies) and a `ScanReferences` object
(equiv.mamba1.scan_harness): the float64 oracle and mamba_ssm's float32 algorithms (the torch ones,
equiv_reference.mamba1.scan_references.TorchScanReferences, or their numpy counterparts,
equiv.mamba1.scan_numpy.NumpyScanReferences, in golden mode). Each JAX form is held to the oracle:

    budget  RMS |form - oracle| <= 2 x RMS |reference - oracle|, and
            max |form - oracle| <= 8 x max |reference - oracle|, each denominator floored at
            4 float32 ULPs of the tensor's scale (equiv.compare: the project's float32 budget and
            its max-error guard, scan_harness.BUDGET and MAX_GUARD)

on y and on the last state, where the reference is mamba_ssm's float32 computation of the same
quantity on the same inputs (selective_scan_ref for the whole-sequence forms; from an initial state,
which it does not take, and for the step: selective_state_update_ref token by token).

The margin: over 1,000 drawn examples per property (the numpy references), the worst RMS ratio
was 1.41 (chunked), 1.36 (step loop), 1.30 (associative), 1.23 (sequential), 1.22 (split prefill),
0.44 (additivity, on the triangle bound's scale); the worst max ratio 2.09 against the guard's 8.
Most examples sit at the floor (median ~0.25). A defect costs orders of magnitude more, median RMS
ratio over 40 instances: exp(dt A) at position t - 1 4e3, a bfloat16 state 1e4, D dropped 5e5,
x where dt x belongs 5e6, the chunk carry dropped 3e6 (where there is a carry to drop).
What holds exactly in floating point is checked bit for bit: `zero_dt_keeps_the_state`,
`causality_bit_exact` and the power-of-two half of `linearity_in_x`.

`run_scan_properties` draws each property's examples with hypothesis, derandomized (the same examples
on every run), without the example database, shrunk on failure, inside `strict_jax()`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

from equiv.mamba1 import scan_harness as H
from equiv.mamba1.scan_harness import ScanReferences
from equiv.mamba1.scan_strategies import (
    BUCKETS,
    LOG10_DECAY_MAX,
    LOG10_DT,
    LOG10_X_SCALE,
    Regime,
    ScanInstance,
    build_instance,
    instances_and_chunks,
    scan_instances,
)
from equiv.property_runner import run_properties, runner_settings  # noqa: F401 - runner_settings re-exported

BUDGETED = (f"RMS <= {H.BUDGET:g}x and max <= {H.MAX_GUARD:g}x the float32 reference's error vs the "
            "float64 oracle")
EXACT = "bit-exact"

# ---------------------------------------------------------------------------------------------
# the properties


def _form_matches_oracle(form: str, inst: ScanInstance, refs: ScanReferences, chunk: int | None = None):
    kw = inst.kwargs()
    label = form if chunk is None else f"{form}(chunk={chunk})"
    H.check_budget(label, H.run_form(form, kw, chunk), refs.reference(form, kw), refs.oracle(kw))


def sequential_matches_oracle(inst: ScanInstance, refs: ScanReferences) -> None:
    """The lax.scan recurrence within budget of the float64 oracle."""
    _form_matches_oracle("sequential", inst, refs)


def associative_matches_oracle(inst: ScanInstance, refs: ScanReferences) -> None:
    """The associative-scan prefill within budget of the oracle: its products of decays round
    differently from the recurrence, and must not round worse than twice as badly."""
    _form_matches_oracle("associative", inst, refs)


def chunked_matches_oracle(inst: ScanInstance, refs: ScanReferences, chunk: int) -> None:
    """The chunked form within budget of the oracle at either chunk size of the bucket (l < chunk,
    l % chunk != 0, 15 chunks, chunk 1 among them): the chunk is an implementation detail."""
    _form_matches_oracle("chunked", inst, refs, chunk)


def step_by_step_matches_oracle(inst: ScanInstance, refs: ScanReferences) -> None:
    """selective_step from the host, token by token (the decode loop), within budget of the oracle,
    against selective_state_update_ref token by token."""
    kw = inst.kwargs()
    H.check_budget("step loop", H.run_steps(kw), refs.reference("step", kw), refs.oracle(kw))


def split_prefill_matches_oracle(inst: ScanInstance, refs: ScanReferences, mode: str) -> None:
    """Scan positions [0, k) in `mode`, then continue from the returned state over [k, l), once with
    the same scan and once with selective_step token by token: each joined result within budget of
    the oracle of the whole sequence (k on a chunk boundary in some buckets, inside a chunk in
    others). The reference is split the same way."""
    kw, k, chunk = inst.kwargs(), inst.bucket.split, inst.bucket.chunk
    truth = refs.oracle(kw)
    head = H.run_form(mode, H.time_slice(kw, 0, k), chunk)
    ref_head = refs.reference(mode, H.time_slice(kw, 0, k))
    rest = H.time_slice(kw, k, initial_state=head[1])
    ref_rest = H.time_slice(kw, k, initial_state=ref_head[1])
    H.check_budget(f"{mode} split at {k}, then {mode}", H.concat(head, H.run_form(mode, rest, chunk)),
                   H.concat(ref_head, refs.reference(mode, ref_rest)), truth)
    H.check_budget(f"{mode} split at {k}, then steps", H.concat(head, H.run_steps(rest)),
                   H.concat(ref_head, refs.reference("step", ref_rest)), truth)


def zero_dt_keeps_the_state(inst: ScanInstance, refs: ScanReferences) -> None:
    """dt = 0 everywhere: exp(0 A) = 1 and 0 x B = 0 exactly, so every form and the step loop return
    the initial state bit for bit; from a zero state y is exactly D x (0 without D)."""
    del refs  # exact: no budget
    kw = {**inst.kwargs(), "dt": np.zeros_like(inst.dt)}
    b, _, e = inst.x.shape
    zeros = np.zeros((b, e, inst.A.shape[1]), np.float32)
    # an explicit zero state where the bucket has one: the same executables as the other properties
    zero = {**kw, "initial_state": None if inst.initial_state is None else zeros}
    skip = np.zeros_like(inst.x) if inst.D is None else inst.x * inst.D
    runs = {form: (lambda form=form, kw=kw: H.run_form(form, kw, inst.bucket.chunk)) for form in H.FORMS}
    runs["step"] = lambda kw=kw: H.run_steps(kw)
    h0 = zeros if inst.initial_state is None else inst.initial_state
    for form, run in runs.items():
        np.testing.assert_array_equal(run()[1], h0, err_msg=f"{form}: dt = 0 changed the state")
        y, state = H.run_steps(zero) if form == "step" else H.run_form(form, zero, inst.bucket.chunk)
        np.testing.assert_array_equal(y, skip, err_msg=f"{form}: dt = 0 from a zero state: y != D x")
        np.testing.assert_array_equal(state, zeros, err_msg=f"{form}: dt = 0 left a state")


def linearity_in_x(inst: ScanInstance, refs: ScanReferences, k: int, coef: float) -> None:
    """y and the state are linear in (x, initial state). Scaling both by 2**k is exact in floating
    point, so every form must be exactly homogeneous. Additivity, y(x1 + c x2) = y(x1) + c (y(x2) -
    y(0)) (same initial state throughout), is checked on the associative form against the oracle of
    the sum, within the triangle bound of its three terms' budgets (the combination cancels, so its
    own reference error can be far below what three correct float32 runs add up to)."""
    kw, chunk = inst.kwargs(), inst.bucket.chunk
    scale = np.float32(2.0**k)
    h0 = kw["initial_state"]
    scaled = {**kw, "x": kw["x"] * scale, "initial_state": None if h0 is None else h0 * scale}
    for form in H.FORMS:
        y, s = H.run_form(form, kw, chunk)
        ys, ss = H.run_form(form, scaled, chunk)
        np.testing.assert_array_equal(ys, y * scale, err_msg=f"{form}: y(2^{k} x) != 2^{k} y(x)")
        np.testing.assert_array_equal(ss, s * scale, err_msg=f"{form}: state(2^{k} x) != 2^{k} state(x)")

    x2 = np.random.default_rng(inst.regime.seed + 1).standard_normal(kw["x"].shape).astype(np.float32)
    c = np.float32(coef)
    parts = {"x1": kw["x"], "x2": x2, "0": np.zeros_like(kw["x"])}
    weights = {"x1": 1.0, "x2": abs(float(c)), "0": abs(float(c))}
    port = {n: H.run_form("associative", {**kw, "x": x}) for n, x in parts.items()}
    ref = {n: refs.reference("associative", {**kw, "x": x}) for n, x in parts.items()}
    truth = {n: refs.oracle({**kw, "x": x}) for n, x in parts.items()}
    truth_sum = refs.oracle({**kw, "x": kw["x"].astype(np.float64) + np.float64(c) * x2})
    for i, what in enumerate(("y", "state")):
        combined = port["x1"][i] + c * (port["x2"][i] - port["0"][i])
        H.assert_within_triangle_bound(f"y(x1) + c (y(x2) - y(0)): {what}", combined, truth_sum[i],
                                       [(weights[n], ref[n][i], truth[n][i]) for n in parts])


def causality_bit_exact(inst: ScanInstance, refs: ScanReferences, t: int) -> None:
    """Changing x, dt, B, C at positions t and later leaves y[:, :t] bit for bit unchanged in every
    form: a prefix of the associative scan combines only earlier elements, the same executable
    rounds the same values the same way. `t` is in [1, l)."""
    del refs  # exact: no budget
    kw, chunk = inst.kwargs(), inst.bucket.chunk
    rng = np.random.default_rng(inst.regime.seed + 7)
    changed = dict(kw)
    for name in H.TIME_ARRAYS:
        arr = kw[name].copy()
        arr[:, t:] = rng.standard_normal(arr[:, t:].shape).astype(arr.dtype) * 3
        if name == "dt":
            arr[:, t:] = np.abs(arr[:, t:])
        changed[name] = arr
    for form in H.FORMS:
        y = H.run_form(form, kw, chunk)[0]
        np.testing.assert_array_equal(H.run_form(form, changed, chunk)[0][:, :t], y[:, :t],
                                      err_msg=f"{form}: inputs at t >= {t} changed y before t")


# ---------------------------------------------------------------------------------------------
# the registry: what each property draws


@st.composite
def _instance_and_time(draw):
    inst = draw(scan_instances())
    return inst, draw(st.integers(1, inst.bucket.l - 1), label="t")


@dataclass(frozen=True)
class ScanProperty:
    """A property, the hypothesis strategies of its drawn arguments (by keyword), its explicit
    examples (always run first) and how it is judged (`budget`: BUDGETED or EXACT)."""

    name: str
    body: Callable[..., None]
    strategies: Callable[[], dict]
    budget: str
    examples: Callable[[], list[dict]] = field(default=lambda: [])

    @property
    def doc(self) -> str:
        return (self.body.__doc__ or "").strip()


def _corners() -> list[ScanInstance]:
    """The corners of the value ranges: the strongest decay with the largest values and dt, and
    almost no decay with the smallest."""
    hi, lo = (Regime(seed=i + 1, log10_decay_max=LOG10_DECAY_MAX[i], log10_x_scale=LOG10_X_SCALE[i],
                     log10_dt=LOG10_DT[i]) for i in (1, 0))
    return [build_instance("C-long", hi), build_instance("A-tail", lo)]


def _corner_examples() -> list[dict]:
    return [{"inst": inst} for inst in _corners()]


PROPERTIES: tuple[ScanProperty, ...] = (
    ScanProperty("sequential_matches_oracle", sequential_matches_oracle,
                 lambda: {"inst": scan_instances()}, BUDGETED, _corner_examples),
    ScanProperty("associative_matches_oracle", associative_matches_oracle,
                 lambda: {"inst": scan_instances()}, BUDGETED, _corner_examples),
    ScanProperty("chunked_matches_oracle", chunked_matches_oracle,
                 lambda: {"inst_chunk": instances_and_chunks()}, BUDGETED,
                 lambda: [{"inst_chunk": (inst, inst.bucket.chunk)} for inst in _corners()]),
    ScanProperty("step_by_step_matches_oracle", step_by_step_matches_oracle,
                 lambda: {"inst": scan_instances()}, BUDGETED, _corner_examples),
    ScanProperty("split_prefill_matches_oracle", split_prefill_matches_oracle,
                 lambda: {"inst": scan_instances(), "mode": st.sampled_from(H.FORMS)}, BUDGETED),
    ScanProperty("zero_dt_keeps_the_state", zero_dt_keeps_the_state,
                 lambda: {"inst": scan_instances()}, EXACT),
    ScanProperty("linearity_in_x", linearity_in_x,
                 lambda: {"inst": scan_instances(), "k": st.integers(-6, 6),
                          "coef": st.floats(-3.0, 3.0, allow_nan=False)},
                 f"bit-exact (2^k scaling); additivity: {BUDGETED}, by the triangle bound"),
    ScanProperty("causality_bit_exact", causality_bit_exact, lambda: {"inst_t": _instance_and_time()}, EXACT),
)
PROPERTIES_BY_NAME = {p.name: p for p in PROPERTIES}
assert {bk.name for bk in BUCKETS} >= {inst.bucket.name for inst in _corners()}


def _call(prop: ScanProperty, refs: ScanReferences, drawn: dict) -> None:
    drawn = dict(drawn)
    if "inst_t" in drawn:
        drawn["inst"], drawn["t"] = drawn.pop("inst_t")
    if "inst_chunk" in drawn:
        drawn["inst"], drawn["chunk"] = drawn.pop("inst_chunk")
    inst = drawn.pop("inst")
    prop.body(inst, refs, **drawn)


def hypothesis_test(prop: ScanProperty, refs: ScanReferences, test_settings: settings | None = None,
                    on_example: Callable[[], None] | None = None) -> Callable[[], None]:
    """The property as a hypothesis test: a function of no arguments that runs the explicit
    examples, draws the others and raises on the first that fails. Without `test_settings` the
    current hypothesis profile applies (what a pytest wrapper wants). `on_example` is called at
    every execution of the property."""

    def run(**drawn):
        if on_example is not None:
            on_example()
        _call(prop, refs, drawn)

    run.__name__ = run.__qualname__ = prop.name
    run.__doc__ = prop.body.__doc__
    # derandomized runs seed from a digest of the test function: the same wrapper serves every
    # property, so the property's name goes into the digest, giving each its own examples
    run._hypothesis_internal_add_digest = ("mamba1.scan." + prop.name).encode()
    test = given(**prop.strategies())(run)
    for ex in reversed(prop.examples()):
        test = example(**ex)(test)
    return test if test_settings is None else test_settings(test)


# ---------------------------------------------------------------------------------------------
# the runner


DEFAULT_EXAMPLES_PER_PROPERTY = 80
"""Drawn examples per property in the main job, plus the explicit corners: 648 executions in all.
Measured on the 2-core CPU (shared with other jobs) with the numpy references, in a fresh process
without a persistent compilation cache: 12.7, 13.7 and 18.6 s for the run, 14.6 to 20.6 s for the
whole process with its imports (three runs; XLA's compiles take about half, each example then
~10 ms per property); 100 per property took 21.9 s, 1,000 took 97 s. Command: `python -c
"from equiv.mamba1.scan_numpy import NumpyScanReferences; from equiv.mamba1.scan_properties import
run_scan_properties; print(run_scan_properties(NumpyScanReferences())['detail'])"`."""


def run_scan_properties(references: ScanReferences, examples_per_property: int | None = None,
                        progress: Callable[[str], None] | None = print) -> dict:
    """Run every selective-scan property on `examples_per_property` drawn examples each (default
    DEFAULT_EXAMPLES_PER_PROPERTY; plus the explicit corners), without pytest, and return a
    JSON-serialisable verdict in the schema of equiv.mamba2.ssd_properties.run_ssd_properties,
    with each property's budget, worst ratio and time added:

        {"verdict": "pass" | "fail", "properties_run", "properties_passed", "properties_failed",
         "examples": total executions (a failed property's include the shrinker's attempts),
         "examples_per_property", "references": references.provenance(), "seconds",
         "properties": [{"name", "verdict", "examples", "detail", "budget",
                         "worst_ratio", "worst_max_ratio", "seconds"}], "detail": one line}

    worst_ratio / worst_max_ratio: the largest RMS / max-error ratio its budget checks saw (on the
    scale of BUDGET / MAX_GUARD; None for a property checked bit for bit). A property that raises
    anything is a failure with its message; the runner itself does not raise. ("not run", the
    schema's third verdict, is the caller's: equiv.check.run_property_suite returns it when the
    references cannot be imported.) `strict_jax()` is in
    effect for the whole run and restored after."""
    n = DEFAULT_EXAMPLES_PER_PROPERTY if examples_per_property is None else examples_per_property
    return run_properties(PROPERTIES, references, hypothesis_test, n, label="selective-scan property",
                          strict=H.strict_jax, progress=progress, exact=EXACT)


__all__ = [
    "BUDGETED", "DEFAULT_EXAMPLES_PER_PROPERTY", "EXACT", "PROPERTIES", "PROPERTIES_BY_NAME", "ScanProperty",
    "associative_matches_oracle", "causality_bit_exact", "chunked_matches_oracle", "hypothesis_test",
    "linearity_in_x", "run_scan_properties", "runner_settings", "sequential_matches_oracle",
    "split_prefill_matches_oracle", "step_by_step_matches_oracle", "zero_dt_keeps_the_state",
]
