"""The properties of the Mamba-3 SSM (equiv.mamba3.ssm), as plain functions, and a runner that
needs no pytest.

Every property takes an `SSMInstance` (equiv.mamba3.ssm_strategies) and an `SSMReferences` object
(equiv.mamba3.ssm_harness): the float64 oracle and the float32 reference whose own error sets the
budget (a torch float32 reference may take its place). With
equiv.mamba3.ssm_numpy.NumpySSMReferences, per form:

    chunked (either chunk size), sequential, step loop, split prefill (each part in its form):
        the pool of two float32 runs of the oracle's sequential recurrence, "recurrence" (numpy
        float32 as written) and "careful" (correctly rounded exp / tanh / cos / sin, the angle
        carried mod 2 pi), split where the form is split; at each element the quadratic mean of
        their deviations from the oracle (ssm_harness.pool; why two: ssm_numpy's docstring)
    linearity_in_x's additivity: the same pool for each of its three terms

No chunk-ordered float32 reference (as equiv/mamba2/ssd_numpy.py has): the chunked form meets the
recurrence's pooled float32 error with the same margin as the sequential forms (below). Each JAX
form is held to the oracle:

    budget  RMS |form - oracle| <= 2 x RMS |reference - oracle|, and
            max |form - oracle| <= 8 x max |reference - oracle|, each denominator floored at
            4 float32 ULPs of the tensor's scale (equiv.compare: the project's float32 budget and
            its max-error guard, ssm_harness.BUDGET and MAX_GUARD)

on y, on the last SSM state and on the cumulative rotary angles. The chunked prefill is checked at
both chunk sizes of its bucket (l < chunk, l % chunk != 0, chunk 1 among them); the O(1) step
token by token; a prefill split in two, the second part continuing from the first's State (its
angle, SSM state and the k, v the trapezoid needs), by the same form and by steps. What holds
exactly in floating point is checked bit for bit: `zero_dt_keeps_the_state`,
`causality_bit_exact` and the power-of-two half of `linearity_in_x`.

`run_ssm_properties` draws each property's examples with hypothesis, derandomized (the same examples
on every run), without the example database, shrunk on failure, inside `strict_jax()`.

Measured worst ratios on the correct forms (RMS / max-error ratio on the scale of the 2x budget and
the 8x guard; CPU, jax 0.10.2, numpy float32 references), at the default 20 drawn examples per
property and at 80:

    property                      20: RMS   max     80: RMS   max
    chunked_matches_oracle            1.18  1.22        1.60  2.05
    sequential_matches_oracle         1.37  2.10        1.59  2.02
    step_by_step_matches_oracle       1.69  3.42        1.60  2.23
    split_prefill_matches_oracle      1.40  1.33        1.22  1.64
    linearity_in_x (additivity)       0.53  0.91        0.58  1.19

(the suite: 47 s and 53 s on 2 CPU cores, compiles included). Equally correct float32 runs not in
the pool, against it, over 150 drawn instances: up to 1.46 (the recurrence with the angle reduced,
numpy's transcendentals) and 1.85 (correctly rounded, the angle unreduced float32) on the last
state. Reproduce: `equiv check --fixture mamba3-tiny-siso --out DIR` (its properties section) and
the same with `--property-examples 80`, or `run_ssm_properties(NumpySSMReferences(), 80)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

from equiv.mamba3 import ssm_harness as H
from equiv.mamba3.oracle import State
from equiv.mamba3.ssm_harness import SSMReferences
from equiv.mamba3.ssm_strategies import (
    BUCKETS,
    Regime,
    SSMInstance,
    build_instance,
    instances_and_chunks,
    ssm_instances,
)
from equiv.property_runner import run_properties, runner_settings  # noqa: F401 - runner_settings re-exported

BUDGETED = (f"RMS <= {H.BUDGET:g}x and max <= {H.MAX_GUARD:g}x the float32 reference's error vs the "
            "float64 oracle")
EXACT = "bit-exact"

# ---------------------------------------------------------------------------------------------
# the properties


def chunked_matches_oracle(inst: SSMInstance, refs: SSMReferences, chunk: int) -> None:
    """The chunked prefill within budget of the oracle at either chunk size of the bucket: the
    chunk is an implementation detail (the trapezoid's next-position term crosses chunk borders,
    the angle sum is carried from chunk to chunk)."""
    kw = inst.kwargs()
    H.check_budget(f"chunked(chunk={chunk})", H.run_form("chunked", kw, chunk),
                   H.reference_runs(refs, "chunked", kw), refs.oracle(kw))


def sequential_matches_oracle(inst: SSMInstance, refs: SSMReferences) -> None:
    """The lax.scan recurrence (ssm_step under a scan) within budget of the oracle."""
    kw = inst.kwargs()
    H.check_budget("sequential", H.run_form("sequential", kw), H.reference_runs(refs, "sequential", kw),
                   refs.oracle(kw))


def step_by_step_matches_oracle(inst: SSMInstance, refs: SSMReferences) -> None:
    """ssm_step from the host, token by token (the decode loop), within budget of the oracle."""
    kw = inst.kwargs()
    H.check_budget("step loop", H.run_steps(kw), H.reference_runs(refs, "step", kw), refs.oracle(kw))


def split_prefill_matches_oracle(inst: SSMInstance, refs: SSMReferences, mode: str) -> None:
    """Positions [0, k) in `mode`, then [k, l) continuing from the returned State, once with the
    same form and once with ssm_step token by token: each joined result within budget of the
    oracle of the whole sequence (k on a chunk boundary in some buckets, inside a chunk in others).
    Each reference variant is split the same way, continuing from its own State."""
    kw, k, chunk = inst.kwargs(), inst.bucket.split, inst.bucket.chunk
    truth = refs.oracle(kw)
    head = H.run_form(mode, H.time_slice(kw, 0, k), chunk)
    rest = H.time_slice(kw, k, state=head[1])
    chains = []  # per variant: its head and the keywords of its rest, from its own State
    for v in H.variants(refs):
        ref_head = H.reference_run(refs, mode, H.time_slice(kw, 0, k), v)
        chains.append((v, ref_head, H.time_slice(kw, k, state=ref_head[1])))

    def refs_then(form):
        return [H.concat(ref_head, H.reference_run(refs, form, ref_rest, v))
                for v, ref_head, ref_rest in chains]

    H.check_budget(f"{mode} split at {k}, then {mode}", H.concat(head, H.run_form(mode, rest, chunk)),
                   refs_then(mode), truth)
    H.check_budget(f"{mode} split at {k}, then steps", H.concat(head, H.run_steps(rest)), refs_then("step"),
                   truth)


def _runs(kw: dict, chunk: int) -> dict:
    runs = {form: (lambda form=form, kw=kw: H.run_form(form, kw, chunk)) for form in H.FORMS}
    runs["step"] = lambda kw=kw: H.run_steps(kw)
    return runs


def zero_dt_keeps_the_state(inst: SSMInstance, refs: SSMReferences) -> None:
    """dt = 0 everywhere: exp(0 A) = 1, the trapezoid's terms and the rotation's advance are 0
    exactly, so every form and the step loop return the initial SSM state and angle bit for bit;
    from a zero state y is exactly D x_r."""
    del refs  # exact: no budget
    kw = {**inst.kwargs(), "dt": np.zeros_like(inst.dt)}
    b, _, h, p = inst.x.shape
    R, n, a = inst.B.shape[2], inst.B.shape[-1], inst.angle.shape[-1]
    f = np.float32
    zeros = State(np.zeros((b, h, a), f), np.zeros((b, h, p, n), f), np.zeros((b, R, h, n), f),
                  np.zeros((b, h, p), f))
    # an explicit zero state where the bucket has one: the same executables as the other properties
    zero = {**kw, "state": None if inst.state is None else zeros}
    up = np.ones((R, h, p), f) if inst.mimo_x is None else inst.mimo_x.transpose(1, 0, 2)
    skip = inst.x[:, :, None] * up[None, None] * inst.D[:, None]
    start = zeros if inst.state is None else inst.state
    for form, run in _runs(kw, inst.bucket.chunk).items():
        _, state, theta = run()
        np.testing.assert_array_equal(state.ssm, start.ssm, err_msg=f"{form}: dt = 0 changed the state")
        np.testing.assert_array_equal(theta, np.broadcast_to(start.angle[:, None], theta.shape),
                                      err_msg=f"{form}: dt = 0 moved the rotary angle")
    for form, run in _runs(zero, inst.bucket.chunk).items():
        y, state, _ = run()
        np.testing.assert_array_equal(y, skip, err_msg=f"{form}: dt = 0 from a zero state: y != D x")
        np.testing.assert_array_equal(state.ssm, zeros.ssm, err_msg=f"{form}: dt = 0 left a state")


def linearity_in_x(inst: SSMInstance, refs: SSMReferences, k: int, coef: float) -> None:
    """y and the SSM state are linear in (x, the initial state's H and v). Scaling all three by 2**k
    is exact in floating point, so every form must be exactly homogeneous (and the angles unmoved).
    Additivity, y(x1 + c x2) = y(x1) + c (y(x2) - y(0)) (same initial state throughout), is checked
    on the chunked form against the oracle of the sum, within the triangle bound of its three terms'
    budgets."""
    kw, chunk = inst.kwargs(), inst.bucket.chunk
    scale = np.float32(2.0**k)
    s0 = kw["state"]
    scaled_state = None if s0 is None else s0._replace(ssm=s0.ssm * scale, v=s0.v * scale)
    scaled = {**kw, "x": kw["x"] * scale, "state": scaled_state}
    for form, run in _runs(kw, chunk).items():
        y, s, th = run()
        ys, ss, ths = _runs(scaled, chunk)[form]()
        np.testing.assert_array_equal(ys, y * scale, err_msg=f"{form}: y(2^{k} x) != 2^{k} y(x)")
        np.testing.assert_array_equal(ss.ssm, s.ssm * scale,
                                      err_msg=f"{form}: state(2^{k} x) != 2^{k} state(x)")
        np.testing.assert_array_equal(ths, th, err_msg=f"{form}: scaling x moved the angles")

    x2 = np.random.default_rng(inst.regime.seed + 1).standard_normal(kw["x"].shape).astype(np.float32)
    c = np.float32(coef)
    parts = {"x1": kw["x"], "x2": x2, "0": np.zeros_like(kw["x"])}
    weights = {"x1": 1.0, "x2": abs(float(c)), "0": abs(float(c))}
    port = {n: H.outputs(H.run_form("chunked", {**kw, "x": x}, chunk)) for n, x in parts.items()}
    truth_runs = {n: refs.oracle({**kw, "x": x}) for n, x in parts.items()}
    ref = {n: H.outputs(H.pool(H.reference_runs(refs, "chunked", {**kw, "x": x}), truth_runs[n]))
           for n, x in parts.items()}
    truth = {n: H.outputs(r) for n, r in truth_runs.items()}
    truth_sum = H.outputs(refs.oracle({**kw, "x": kw["x"].astype(np.float64) + np.float64(c) * x2}))
    for i, what in enumerate(("y", "state")):
        combined = port["x1"][i] + c * (port["x2"][i] - port["0"][i])
        H.assert_within_triangle_bound(f"y(x1) + c (y(x2) - y(0)): {what}", combined, truth_sum[i],
                                       [(weights[n], ref[n][i], truth[n][i]) for n in parts])


def causality_bit_exact(inst: SSMInstance, refs: SSMReferences, t: int) -> None:
    """Changing every input at positions t and later leaves y[:, :t] and the angles before t bit for
    bit unchanged in every form: the chunked form's later positions enter earlier ones only through
    exactly-zero weights, the recurrence never looks ahead. `t` is in [1, l)."""
    del refs  # exact: no budget
    kw, chunk = inst.kwargs(), inst.bucket.chunk
    rng = np.random.default_rng(inst.regime.seed + 7)
    changed = dict(kw)
    for name in H.TIME_ARRAYS:
        arr = kw[name].copy()
        arr[:, t:] = rng.standard_normal(arr[:, t:].shape).astype(arr.dtype) * 3
        if name == "dt":
            arr[:, t:] = np.abs(arr[:, t:])
        if name == "A":
            arr[:, t:] = -np.abs(arr[:, t:])
        if name == "trap":
            arr[:, t:] = 1 / (1 + np.exp(-arr[:, t:]))
        changed[name] = arr
    for form in H.FORMS:
        y, _, th = H.run_form(form, kw, chunk)
        y2, _, th2 = H.run_form(form, changed, chunk)
        np.testing.assert_array_equal(y2[:, :t], y[:, :t],
                                      err_msg=f"{form}: inputs at t >= {t} changed y before t")
        np.testing.assert_array_equal(th2[:, :t], th[:, :t],
                                      err_msg=f"{form}: inputs at t >= {t} moved earlier angles")


# ---------------------------------------------------------------------------------------------
# the registry: what each property draws


@st.composite
def _instance_and_time(draw):
    inst = draw(ssm_instances())
    return inst, draw(st.integers(1, inst.bucket.l - 1), label="t")


@dataclass(frozen=True)
class SSMProperty:
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


def _corners() -> list[SSMInstance]:
    """The corners of the value ranges: strong decay with large dt, x and angles, A floored at a
    large floor almost everywhere (MIMO rank 4, many chunks); and weak decay with the smallest dt,
    A at mamba_ssm's default floor 1e-4 (SISO)."""
    strong = Regime(seed=11, log10_dt=0.5, log10_decay=1.5, log10_floor=0.5, floored=1.0, log10_angle=1.0,
                    log10_x_scale=2.0)
    weak = Regime(seed=12, log10_dt=-3.5, log10_decay=-3.0, log10_floor=-4.0, floored=1.0, log10_angle=-1.0,
                  log10_x_scale=-2.0)
    return [build_instance("C-long", strong), build_instance("A-siso", weak)]


def _corner_examples() -> list[dict]:
    return [{"inst": inst} for inst in _corners()]


PROPERTIES: tuple[SSMProperty, ...] = (
    SSMProperty("chunked_matches_oracle", chunked_matches_oracle,
                lambda: {"inst_chunk": instances_and_chunks()}, BUDGETED,
                lambda: [{"inst_chunk": (inst, c)} for inst in _corners() for c in inst.bucket.chunks]),
    SSMProperty("sequential_matches_oracle", sequential_matches_oracle,
                lambda: {"inst": ssm_instances()}, BUDGETED, _corner_examples),
    SSMProperty("step_by_step_matches_oracle", step_by_step_matches_oracle,
                lambda: {"inst": ssm_instances()}, BUDGETED, _corner_examples),
    SSMProperty("split_prefill_matches_oracle", split_prefill_matches_oracle,
                lambda: {"inst": ssm_instances(), "mode": st.sampled_from(H.FORMS)}, BUDGETED,
                lambda: [{"inst": inst, "mode": "chunked"} for inst in _corners()]),
    SSMProperty("zero_dt_keeps_the_state", zero_dt_keeps_the_state,
                lambda: {"inst": ssm_instances()}, EXACT),
    SSMProperty("linearity_in_x", linearity_in_x,
                lambda: {"inst": ssm_instances(), "k": st.integers(-6, 6),
                         "coef": st.floats(-3.0, 3.0, allow_nan=False)},
                f"bit-exact (2^k scaling); additivity: {BUDGETED}, by the triangle bound"),
    SSMProperty("causality_bit_exact", causality_bit_exact, lambda: {"inst_t": _instance_and_time()}, EXACT),
)
PROPERTIES_BY_NAME = {p.name: p for p in PROPERTIES}
assert {bk.name for bk in BUCKETS} >= {inst.bucket.name for inst in _corners()}


def _call(prop: SSMProperty, refs: SSMReferences, drawn: dict) -> None:
    drawn = dict(drawn)
    if "inst_t" in drawn:
        drawn["inst"], drawn["t"] = drawn.pop("inst_t")
    if "inst_chunk" in drawn:
        drawn["inst"], drawn["chunk"] = drawn.pop("inst_chunk")
    inst = drawn.pop("inst")
    prop.body(inst, refs, **drawn)


def hypothesis_test(prop: SSMProperty, refs: SSMReferences, test_settings: settings | None = None,
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
    run._hypothesis_internal_add_digest = ("mamba3.ssm." + prop.name).encode()
    test = given(**prop.strategies())(run)
    for ex in reversed(prop.examples()):
        test = example(**ex)(test)
    return test if test_settings is None else test_settings(test)


# ---------------------------------------------------------------------------------------------
# the runner


DEFAULT_EXAMPLES_PER_PROPERTY = 20
"""Drawn examples per property in the main job, plus the explicit corners (the worst ratios at 20 and
80: the module docstring; the tests: tests/test_mamba3_ssm_properties.py)."""


def run_ssm_properties(references: SSMReferences, examples_per_property: int | None = None,
                       progress: Callable[[str], None] | None = print) -> dict:
    """Run every Mamba-3 SSM property on `examples_per_property` drawn examples each (default
    DEFAULT_EXAMPLES_PER_PROPERTY; plus the explicit corners), without pytest, and return a
    JSON-serialisable verdict in the schema of equiv.mamba1.scan_properties.run_scan_properties:

        {"verdict": "pass" | "fail", "properties_run", "properties_passed", "properties_failed",
         "examples": total executions (a failed property's include the shrinker's attempts),
         "examples_per_property", "references": references.provenance(), "seconds",
         "properties": [{"name", "verdict", "examples", "detail", "budget",
                         "worst_ratio", "worst_max_ratio", "seconds"}], "detail": one line}

    worst_ratio / worst_max_ratio: the largest RMS / max-error ratio its budget checks saw (on the
    scale of BUDGET / MAX_GUARD; None for a property checked bit for bit). A property that raises
    anything is a failure with its message; the runner itself does not raise. `strict_jax()` is in
    effect for the whole run and restored after."""
    n = DEFAULT_EXAMPLES_PER_PROPERTY if examples_per_property is None else examples_per_property
    return run_properties(PROPERTIES, references, hypothesis_test, n, label="Mamba-3 SSM property",
                          strict=H.strict_jax, progress=progress, exact=EXACT)


__all__ = [
    "BUDGETED", "DEFAULT_EXAMPLES_PER_PROPERTY", "EXACT", "PROPERTIES", "PROPERTIES_BY_NAME", "SSMProperty",
    "causality_bit_exact", "chunked_matches_oracle", "hypothesis_test", "linearity_in_x",
    "run_ssm_properties", "runner_settings", "sequential_matches_oracle", "split_prefill_matches_oracle",
    "step_by_step_matches_oracle", "zero_dt_keeps_the_state",
]
