"""Shared machinery of the Mamba-3 SSM properties: the jitted forms, the references protocol, the
budget checks and the record of the worst ratio each property saw.

Each form of equiv.mamba3.ssm is jitted once here (`chunk` and `pairwise` static), so a bucket of
equiv.mamba3.ssm_strategies compiles each form once per process whatever the number of examples.
`run_form` and `run_steps` look the functions up in `JITTED` at every call: a test replaces an
entry to plant a defect in that form alone.

What is compared, on every budgeted check: y (b, l, R, h, p), the last SSM state (b, h, p, n) and
the cumulative rotary angles (b, l, h, a), each by the project's float32 budget and max-error guard
(equiv.compare) against the float64 oracle, relative to the float32 reference's own error. A
references object may offer several float32 variants of each form (`variants`, e.g.
equiv.mamba3.ssm_numpy's "recurrence" and "careful"): the reference is then their pool (`pool`),
whose deviation from the oracle is, element by element, the quadratic mean of theirs. The
checks assume the strict jax configuration (rank promotion raises, matmuls at the highest
precision); `strict_jax()` sets it for a block, and the property runner uses it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from equiv.compare import FLOOR_ULPS, compare_tap, max_error_guard, tolerance, ulp_at
from equiv.mamba3 import oracle, ssm
from equiv.property_runner import RatioLog, recording  # noqa: F401 - re-exported
from equiv.property_runner import record as _record

FORMS = ssm.MODES  # the whole-sequence forms: "chunked", "sequential"
OUTPUTS = ("y", "state", "angles")
TIME_ARRAYS = ("x", "dt", "A", "trap", "B", "C", "angle")  # the arguments with an l axis (axis 1)


def jit_form(fn, mode: str):
    """`fn` (ssm_forward's signature) jitted for one mode, as JITTED holds it."""
    return jax.jit(functools.partial(fn, mode=mode), static_argnames=("chunk", "pairwise"))


JITTED = {**{form: jit_form(ssm.ssm_forward, form) for form in FORMS},
          "step": jax.jit(ssm.ssm_step, static_argnames=("pairwise",))}

BUDGET = tolerance("float32").budget
"""The RMS budget (equiv.compare, 2x): a form may err against the float64 oracle by at most twice
what the float32 reference errs on the same inputs (each floored at FLOOR_ULPS float32 ULPs of the
tensor's RMS)."""
MAX_GUARD = max_error_guard("float32", BUDGET)
"""The max-error guard (8x the reference's worst element, floored likewise): a localised defect the
RMS would average away."""


@contextlib.contextmanager
def strict_jax() -> Iterator[None]:
    """Rank promotion raises and matmuls run at the highest precision inside the block."""
    with jax.numpy_rank_promotion("raise"), jax.default_matmul_precision("highest"):
        yield


@runtime_checkable
class SSMReferences(Protocol):
    """Where the budget comes from: `oracle(kw)` the float64 (y, State, theta); `reference(form, kw)`
    an independent float32 (y, State, theta) of the same quantity, or, where the object has a
    `variants` tuple, `reference(form, kw, variant=v)` for each (pooled by `pool`);
    `provenance()` a JSON-serialisable account. `kw` is SSMInstance.kwargs() (numpy), possibly
    time-sliced or with arrays replaced."""

    name: str

    def oracle(self, kw: dict): ...

    def reference(self, form: str, kw: dict): ...

    def provenance(self) -> dict: ...


def variants(refs) -> tuple:
    """The float32 variants `refs` offers (None alone: a single reference)."""
    return tuple(getattr(refs, "variants", None) or (None,))


def reference_run(refs, form: str, kw: dict, variant=None):
    """(y, State, theta) of one float32 variant of `form` on kw (None: the single reference)."""
    return refs.reference(form, kw) if variant is None else refs.reference(form, kw, variant=variant)


def reference_runs(refs, form: str, kw: dict) -> list:
    """[(y, State, theta)] of every float32 variant of `form` on kw."""
    return [reference_run(refs, form, kw, v) for v in variants(refs)]


def pool(results: list, oracle_out):
    """Several float32 (y, State, theta) of one quantity -> one whose deviation from the oracle is,
    at each element of y, the last state and theta, the quadratic mean of theirs: oracle +
    sqrt(mean_k (result_k - oracle)^2) (float64). Its RMS error is the quadratic mean of the
    results' RMS errors; its max error at most their largest. Where a result or the oracle is not
    finite, the first result's value stands (equiv.compare's non-finite rules then apply to it).
    A single result comes back unchanged."""
    if len(results) == 1:
        return results[0]
    pooled = []
    for i, truth in enumerate(outputs(oracle_out)):
        arrs = [np.asarray(outputs(r)[i], np.float64) for r in results]
        truth = np.asarray(truth, np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            dev = np.sqrt(np.mean([(a - truth) ** 2 for a in arrs], axis=0))
            value = truth + dev
        finite = np.isfinite(value) & np.all([np.isfinite(a) for a in arrs], axis=0)
        pooled.append(np.where(finite, value, arrs[0]))
    y, ssm_state, theta = pooled
    return y, oracle.State(None, ssm_state, None, None), theta


# ---------------------------------------------------------------------------------------------
# running the forms


def _jax_state(state) -> ssm.State | None:
    """An oracle State -> the JAX State (its angle split into float32 hi + lo)."""
    if state is None:
        return None
    angle, angle_lo = ssm.split_angle(state.angle)
    ssm_state, k, v = (jnp.asarray(np.asarray(s, np.float32)) for s in (state.ssm, state.k, state.v))
    return ssm.State(angle, ssm_state, k, v, angle_lo)


def _np_state(state: ssm.State) -> oracle.State:
    """The JAX State -> an oracle State (float32; the angle's compensation dropped)."""
    return oracle.State(*(np.asarray(v) for v in (state.angle, state.ssm, state.k, state.v)))


def _arrays(kw: dict) -> dict:
    skip = ("state", "pairwise")
    out = {k: (None if v is None else jnp.asarray(v)) for k, v in kw.items() if k not in skip}
    return out | {"state": _jax_state(kw.get("state"))}


def run_form(form: str, kw: dict, chunk: int | None = None):
    """(y, State, theta) of one jitted whole-sequence form, as numpy."""
    extra = {"chunk": chunk} if form == "chunked" else {}
    y, state, theta = JITTED[form](**_arrays(kw), pairwise=kw["pairwise"], **extra)
    return np.asarray(y), _np_state(state), np.asarray(theta)


def run_steps(kw: dict):
    """ssm_step token by token from the host: the decode loop a user writes."""
    a = _arrays(kw)
    b, l, h, p = kw["x"].shape
    state = a["state"] or ssm.zero_state(b, h, p, kw["B"].shape[-1], kw["angle"].shape[-1], kw["B"].shape[2])
    ys, thetas = [], []
    for t in range(l):
        y, state = JITTED["step"](state, *(a[k][:, t] for k in TIME_ARRAYS), a["D"], a["mimo_x"],
                                  pairwise=kw["pairwise"])
        ys.append(np.asarray(y))
        thetas.append(np.asarray(state.angle))
    return np.stack(ys, axis=1), _np_state(state), np.stack(thetas, axis=1)


def time_slice(kw: dict, lo: int, hi: int | None = None, **replace) -> dict:
    """kw restricted to positions [lo, hi), other entries replaced by keyword."""
    out = {k: (v[:, lo:hi] if k in TIME_ARRAYS else v) for k, v in kw.items()}
    out.update(replace)
    return out


def concat(first, second):
    """The (y, State, theta) of two consecutive spans: y and theta joined along time, the second's state."""
    return (np.concatenate([first[0], second[0]], axis=1), second[1],
            np.concatenate([first[2], second[2]], axis=1))


def outputs(result) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the budget judges of a (y, State, theta): y, the last SSM state, theta."""
    y, state, theta = result
    return np.asarray(y), np.asarray(state.ssm), np.asarray(theta)


# ---------------------------------------------------------------------------------------------
# checks


def check_budget(name: str, port, reference, oracle_out) -> None:
    """The error budget on y, the last state and the angles: port vs oracle within BUDGET x the
    float32 reference's own RMS error vs oracle, and within MAX_GUARD x its max error. `reference`:
    one (y, State, theta), or a list of them (the variants, pooled by `pool`). A tensor that is
    zero on every side (a state the decay erased) compares nothing and passes. Raises
    AssertionError naming the tensor, the ratios and the worst element."""
    if isinstance(reference, list):
        reference = pool(reference, oracle_out)
    for what, p_arr, r_arr, o_arr in zip(OUTPUTS, outputs(port), outputs(reference), outputs(oracle_out)):
        c = compare_tap(f"{name}.{what}", p_arr, r_arr, o_arr, budget=BUDGET, max_budget=MAX_GUARD)
        if np.isfinite(c.ratio):
            _record(c.ratio, c.ratio_max)
        if c.verdict == "fail":
            raise AssertionError(f"{c.name}: {c.reason} (err_ref {c.err_ref:.3g}, floor {c.floor:.3g})")


def assert_within_triangle_bound(name: str, value, truth, terms) -> None:
    """`value` is a float32 combination sum_i w_i t_i of float32 results t_i: its error against
    `truth` (the oracle of the combination) is at most sum_i |w_i| x BUDGET x the reference's own
    error on t_i (RMS; MAX_GUARD x its max error for the max), plus FLOOR_ULPS of float32 rounding
    of the combination itself. `terms`: [(|w_i|, reference_i, oracle_i)]."""
    unit_rms, unit_max = 0.0, 0.0
    for weight, ref, oracle_arr in terms:
        c = compare_tap(name, ref, ref, oracle_arr)
        unit_rms += weight * max(c.err_ref, c.floor)
        max_floor = FLOOR_ULPS * ulp_at(float(np.abs(oracle_arr).max()), "float32")
        unit_max += weight * max(c.max_err_ref, max_floor)
    rounding = FLOOR_ULPS * ulp_at(float(np.abs(truth).max()), "float32")
    tol_rms, tol_max = BUDGET * unit_rms + rounding, MAX_GUARD * unit_max + rounding
    diff = np.abs(np.asarray(value, np.float64) - np.asarray(truth, np.float64))
    rms, worst = float(np.sqrt(np.mean(diff**2))), float(diff.max())
    _record(BUDGET * rms / tol_rms, MAX_GUARD * worst / tol_max)
    if not (rms <= tol_rms and worst <= tol_max):
        at = np.unravel_index(int(np.argmax(diff)), diff.shape)
        raise AssertionError(f"{name}: RMS error {rms:.3g} (bound {tol_rms:.3g}), max {worst:.3g} at "
                             f"{list(map(int, at))} (bound {tol_max:.3g})")


__all__ = ["BUDGET", "FORMS", "JITTED", "MAX_GUARD", "OUTPUTS", "RatioLog", "SSMReferences", "TIME_ARRAYS",
           "assert_within_triangle_bound", "check_budget", "concat", "jit_form", "outputs", "pool",
           "recording", "reference_run", "reference_runs", "run_form", "run_steps", "strict_jax",
           "time_slice", "variants"]
