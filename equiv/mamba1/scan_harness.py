"""Shared machinery of the selective-scan properties: the jitted forms, the references protocol, the
budget checks and the record of the worst ratio each property saw.

Each form of equiv.mamba1.scan is jitted once here, one entry per mode (`chunk` static), so a bucket
of equiv.mamba1.scan_strategies compiles each form once per process whatever the number of examples.
`run_form` and `run_steps` look the functions up in `JITTED` at every call: a test replaces an entry
to plant a defect in that form alone.

The checks assume the strict jax configuration of the test suite (rank promotion raises, matmuls at
the highest precision); `strict_jax()` sets it for a block, and the property runner uses it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import jax
import numpy as np

from equiv.compare import FLOOR_ULPS, compare_tap, max_error_guard, tolerance, ulp_at
from equiv.mamba1 import scan
from equiv.property_runner import RatioLog, recording  # noqa: F401 - re-exported
from equiv.property_runner import record as _record

FORMS = scan.MODES  # the whole-sequence forms: "sequential", "associative", "chunked"


def jit_form(fn, mode: str):
    """`fn` (selective_scan's signature) jitted for one mode, as JITTED holds it: called with the
    array keywords and `chunk` (static; None except for the chunked form)."""
    return jax.jit(functools.partial(fn, mode=mode), static_argnames=("chunk",))


JITTED = {**{form: jit_form(scan.selective_scan, form) for form in FORMS},
          "step": jax.jit(scan.selective_step)}
TIME_ARRAYS = ("x", "dt", "B", "C")  # the arguments with an l axis (axis 1)

BUDGET = tolerance("float32").budget
"""The RMS budget (equiv.compare, 2x): a form may err against the float64 oracle by at most twice
what mamba_ssm's float32 reference errs on the same inputs (each floored at FLOOR_ULPS float32 ULPs
of the tensor's RMS)."""
MAX_GUARD = max_error_guard("float32", BUDGET)
"""The max-error guard (8x the reference's worst element, floored likewise): a localised defect the
RMS would average away."""


@contextlib.contextmanager
def strict_jax() -> Iterator[None]:
    """Rank promotion raises and matmuls run at the highest precision inside the block."""
    with jax.numpy_rank_promotion("raise"), jax.default_matmul_precision("highest"):
        yield


@runtime_checkable
class ScanReferences(Protocol):
    """Where the budget comes from: `oracle(kw)` the float64 (y, last_state); `reference(form, kw)`
    an independent float32 (y, last_state) of the same quantity (mamba_ssm's algorithms: the scan
    for "sequential", "associative" and "chunked", the decode step token by token for "step");
    `provenance()` a JSON-serialisable account of what computed them. `kw` is
    ScanInstance.kwargs() (numpy), possibly time-sliced or with arrays replaced."""

    name: str

    def oracle(self, kw: dict) -> tuple[np.ndarray, np.ndarray]: ...

    def reference(self, form: str, kw: dict) -> tuple[np.ndarray, np.ndarray]: ...

    def provenance(self) -> dict: ...


# ---------------------------------------------------------------------------------------------
# running the forms


def run_form(form: str, kw: dict, chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(y, last_state) of one jitted whole-sequence form, as numpy."""
    y, state = JITTED[form](**kw, chunk=chunk if form == "chunked" else None)
    return np.asarray(y), np.asarray(state)


def run_steps(kw: dict) -> tuple[np.ndarray, np.ndarray]:
    """selective_step token by token from the host: the decode loop a user writes."""
    b, l, e = kw["x"].shape
    state = kw["initial_state"]
    state = np.zeros((b, e, kw["A"].shape[1]), np.float32) if state is None else state
    ys = []
    for t in range(l):
        y, state = JITTED["step"](state, kw["x"][:, t], kw["dt"][:, t], kw["A"], kw["B"][:, t],
                                  kw["C"][:, t], kw["D"])
        ys.append(np.asarray(y))
    return np.stack(ys, axis=1), np.asarray(state)


def time_slice(kw: dict, lo: int, hi: int | None = None, **replace) -> dict:
    """kw restricted to positions [lo, hi), other entries replaced by keyword."""
    out = {k: (v[:, lo:hi] if k in TIME_ARRAYS and v is not None else v) for k, v in kw.items()}
    out.update(replace)
    return out


def concat(first, second) -> tuple[np.ndarray, np.ndarray]:
    """The (y, last_state) of two consecutive spans: y joined along time, the second's state."""
    return np.concatenate([first[0], second[0]], axis=1), second[1]


# ---------------------------------------------------------------------------------------------
# checks


def check_budget(name: str, port, reference, oracle_out) -> None:
    """The error budget on y and on the last state: port vs oracle within BUDGET x the float32
    reference's own RMS error vs oracle, and within MAX_GUARD x its max error. Raises AssertionError
    naming the tensor, the ratios and the worst element."""
    for i, what in enumerate(("y", "state")):
        c = compare_tap(f"{name}.{what}", port[i], reference[i], oracle_out[i], budget=BUDGET,
                        max_budget=MAX_GUARD)
        if np.isfinite(c.ratio):
            _record(c.ratio, c.ratio_max)
        if c.verdict != "pass":
            raise AssertionError(f"{c.name}: {c.reason} (err_ref {c.err_ref:.3g}, floor {c.floor:.3g})")


def assert_within_triangle_bound(name: str, value, truth, terms) -> None:
    """`value` is a float32 combination sum_i w_i t_i of float32 results t_i: its error against
    `truth` (the oracle of the combination) is at most sum_i |w_i| x BUDGET x the reference's own
    error on t_i (RMS; MAX_GUARD x its max error for the max), plus FLOOR_ULPS of float32 rounding
    of the combination itself. `terms`: [(|w_i|, reference_i, oracle_i)]. The recorded ratio is
    the error over the bound's budget-free part, on BUDGET's scale."""
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


__all__ = ["BUDGET", "FORMS", "JITTED", "MAX_GUARD", "jit_form", "TIME_ARRAYS", "RatioLog", "ScanReferences",
           "assert_within_triangle_bound", "check_budget", "concat", "recording", "run_form",
           "run_steps", "strict_jax", "time_slice"]
