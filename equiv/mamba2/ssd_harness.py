"""Shared machinery of the SSD properties: the jitted forms, the references protocol, the checks.

Each form of equiv.mamba2.ssd is jitted once here, with its configuration arguments static. jax.jit caches
one executable per (shapes, dtypes, which optional arguments are None, static values, and the jax
configuration in effect), so an `equiv.mamba2.ssd_strategies` bucket compiles each form once per process
whatever the number of examples.

The checks assume the strict jax configuration of the test suite: `jax_numpy_rank_promotion`
"raise" and `jax_default_matmul_precision` "highest" (float32 verification must not run reduced
precision matmuls). `strict_jax()` sets both for the duration of a block; the property runner
(equiv.mamba2.ssd_properties.run_ssd_properties) uses it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import jax
import numpy as np

from equiv.compare import FLOOR_ULPS, TapComparison, assert_within_budget, compare_tap, tolerance, ulp_at
from equiv.mamba2 import ssd

_STATIC = ("dt_softplus", "dt_limit", "return_final_states")
JITTED = {
    "chunked": jax.jit(ssd.ssd_chunked, static_argnames=("chunk_size", *_STATIC)),
    "scan": jax.jit(ssd.ssd_scan, static_argnames=_STATIC),
    "quadratic": jax.jit(ssd.ssd_quadratic, static_argnames=_STATIC),
}
"""The whole-sequence forms by name. A test may replace an entry (monkeypatch) to plant a defect:
run_form looks the form up here at every call."""
JITTED_STEP = jax.jit(ssd.ssd_step, static_argnames=("dt_softplus", "dt_limit"))
JITTED_READOUT = jax.jit(ssd.ssd_readout)
FORMS = tuple(JITTED)
TIME_ARRAYS = ("x", "dt", "B", "C", "z")  # the arguments with an l axis (axis 1)


@contextlib.contextmanager
def strict_jax() -> Iterator[None]:
    """Rank promotion raises and matmuls run at the highest precision inside the block (jax's own
    context managers: thread-local, restored on exit, part of jit's cache key)."""
    with jax.numpy_rank_promotion("raise"), jax.default_matmul_precision("highest"):
        yield


# ---------------------------------------------------------------------------------------------
# the references whose own float32 error sets the budget


@runtime_checkable
class SSDReferences(Protocol):
    """Where the budget comes from: the float64 oracle, and for each equiv.mamba2.ssd form an independent
    float32 computation of the same quantity whose error against the oracle is the yardstick.

    `kw` is `SSDInstance.kwargs()` (numpy arrays, dt_softplus, dt_limit), possibly time-sliced or
    with arrays replaced (x may then be float64: the oracle computes in float64 regardless).
    `reference(form, ...)`: "chunked" -> the chunked algorithm at chunk_size; "quadratic" -> the
    chunked algorithm at one chunk of the whole length (its diagonal block is the quadratic form);
    "scan" and "step" -> the sequential recurrence in float32. Both return numpy (y, final_state).
    `provenance()`: a JSON-serialisable account of what computed the budget, with versions."""

    name: str

    def oracle(self, kw: dict) -> tuple[np.ndarray, np.ndarray]: ...

    def reference(self, form: str, kw: dict, chunk_size: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray]: ...

    def provenance(self) -> dict: ...


# ---------------------------------------------------------------------------------------------
# running the forms


def run_form(form: str, kw: dict, chunk_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(y, final_state) of one jitted equiv.mamba2.ssd form, as numpy."""
    extra = {"chunk_size": chunk_size} if form == "chunked" else {}
    y, state = JITTED[form](**kw, **extra, return_final_states=True)
    return np.asarray(y), np.asarray(state)


def run_steps(kw: dict) -> tuple[np.ndarray, np.ndarray]:
    """ssd_step token by token from the host: the decode loop a user writes."""
    b, l, h, p = kw["x"].shape
    n = kw["B"].shape[-1]
    state = kw["initial_states"]
    state = np.zeros((b, h, p, n), np.float32) if state is None else state
    at = lambda a, t: None if a is None else a[:, t]  # noqa: E731
    ys = []
    for t in range(l):
        y, state = JITTED_STEP(state, kw["x"][:, t], kw["dt"][:, t], kw["A"], kw["B"][:, t],
                               kw["C"][:, t], D=kw["D"], z=at(kw["z"], t), dt_bias=kw["dt_bias"],
                               dt_softplus=kw["dt_softplus"], dt_limit=kw["dt_limit"])
        ys.append(np.asarray(y))
    return np.stack(ys, axis=1), np.asarray(state)


def run_readout(state: np.ndarray, kw: dict) -> np.ndarray:
    """ssd_readout of `state` at the last position of kw: that position's y, if `state` is the
    state after it."""
    z = kw["z"]
    return np.asarray(JITTED_READOUT(state, kw["x"][:, -1], kw["C"][:, -1], D=kw["D"],
                                     z=None if z is None else z[:, -1]))


def time_slice(kw: dict, lo: int, hi: int | None = None, **replace) -> dict:
    """kw restricted to tokens [lo, hi), other entries replaced by keyword."""
    out = {k: (v[:, lo:hi] if k in TIME_ARRAYS and v is not None else v) for k, v in kw.items()}
    out.update(replace)
    return out


# ---------------------------------------------------------------------------------------------
# checks


def check_budget(name: str, port, reference, oracle_out) -> list[TapComparison]:
    """The error budget on y and on the final state: port vs oracle within budget x the float32
    reference's own error vs oracle (equiv.compare). Raises BudgetExceeded."""
    return [assert_within_budget(f"{name}.y", port[0], reference[0], oracle_out[0]),
            assert_within_budget(f"{name}.state", port[1], reference[1], oracle_out[1])]


def _budget_bounds(name: str, reference, oracle_arr):
    """(RMS bound, max bound, the reference's comparison): what one correct float32 result may err
    by against the oracle: the budget x the reference's own RMS error, and the max-error guard x
    its max error (each floored at FLOOR_ULPS)."""
    ref = compare_tap(name, reference, reference, oracle_arr)
    floor_max = FLOOR_ULPS * ulp_at(float(np.abs(oracle_arr).max()), "float32")
    return (tolerance("float32").budget * max(ref.err_ref, ref.floor),
            tolerance("float32", "max_error_guard").budget * max(ref.max_err_ref, floor_max), ref)


def assert_close_by_budget(name: str, a: np.ndarray, b: np.ndarray, reference, oracle_arr) -> None:
    """Two float32 results of the same mathematical quantity agree directly, by the triangle bound
    of the error budget: if each were within the budget of the oracle (the RMS criterion and the
    max-error guard of equiv.compare, relative to the float32 reference's own error on these
    inputs), they would differ by at most twice each bound. Used where only one side is
    budget-checked in the same property, so the check is not implied by the others."""
    bound_rms, bound_max, ref = _budget_bounds(name, reference, oracle_arr)
    tol_rms, tol_max = 2 * bound_rms, 2 * bound_max
    diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    rms, worst = float(np.sqrt(np.mean(diff**2))), np.unravel_index(int(np.argmax(diff)), diff.shape)
    if not (rms <= tol_rms and diff.max() <= tol_max):
        raise AssertionError(
            f"{name}: RMS |a - b| {rms:.3g} (bound {tol_rms:.3g}), max {diff.max():.3g} at "
            f"{list(map(int, worst))} (bound {tol_max:.3g}); the reference's own error: RMS "
            f"{ref.err_ref:.3g}, max {ref.max_err_ref:.3g}, floor {ref.floor:.3g}")


def assert_within_triangle_bound(name: str, value, truth, terms) -> None:
    """`value` is a float32 combination sum_i w_i t_i of correct float32 results t_i: its error vs
    `truth` (the oracle of the combination) is at most sum_i |w_i| x (budget x the reference's own
    error on t_i), for the RMS and, with the max-error guard, for the max, plus float32 rounding of
    the combination itself. `terms`: [(|w_i|, reference_i, oracle_i)]."""
    bounds = [(weight, *_budget_bounds(name, ref, oracle_arr)[:2]) for weight, ref, oracle_arr in terms]
    rounding = FLOOR_ULPS * ulp_at(float(np.abs(truth).max()), "float32")
    tol_rms = sum(w * b for w, b, _ in bounds) + rounding
    tol_max = sum(w * b for w, _, b in bounds) + rounding
    diff = np.abs(np.asarray(value, np.float64) - np.asarray(truth, np.float64))
    rms = float(np.sqrt(np.mean(diff**2)))
    if not (rms <= tol_rms and diff.max() <= tol_max):
        worst = np.unravel_index(int(np.argmax(diff)), diff.shape)
        raise AssertionError(f"{name}: RMS error {rms:.3g} (bound {tol_rms:.3g}), max "
                             f"{diff.max():.3g} at {list(map(int, worst))} (bound {tol_max:.3g})")
