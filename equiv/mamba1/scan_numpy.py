"""Mamba-1's selective scan in plain numpy: the float64 oracle and the float32 references.

The error budget judges a float32 result by its distance to the float64 oracle relative to the
distance of an independent float32 computation of the same algorithm on the same inputs. These
numpy versions compute what mamba_ssm's pure-torch references compute, operation for operation, so
they stand in for them when torch is absent (golden mode); tests/test_scan_references.py measures
that they err like the torch ones.

- `oracle_fp64`: the recurrence in float64, token by token: the ground truth.
- `scan_fp32`: mamba_ssm's `selective_scan_ref` in float32: deltaA = exp(dt A) and
  deltaB_u = dt B x for every position first, then h = deltaA h + deltaB_u, y = h . C, then + D x.
- `step_fp32`: mamba_ssm's `selective_state_update_ref` in float32, one token: the state times
  exp(dt A) plus (dt B) x (dt meets B before x, unlike the scan), y = state . C + x D.
  `steps_fp32` runs it token by token: the decode loop's reference.

Layouts are equiv.mamba1.scan's: x, dt (b, l, e), A (e, n), B, C (b, l, n), D (e,) or None,
initial_state (b, e, n) or None. Each function returns numpy (y, last_state) in its precision.
"""

from __future__ import annotations

import numpy as np

import equiv


def _cast(dtype, *arrays):
    return tuple(None if a is None else np.asarray(a).astype(dtype) for a in arrays)


def _exp(v):
    """e^v correctly rounded to v's dtype (evaluated in float64, rounded once): numpy's own float32
    exp errs by up to 2.2 ULP, torch's by ~0.5 (see equiv/ssd_numpy.py), and the recurrence
    compounds that difference; everything else stays in `dtype`."""
    return np.exp(v.astype(np.float64)).astype(v.dtype)


def _state0(h0, b, e, n, dtype):
    return np.zeros((b, e, n), dtype) if h0 is None else h0.copy()


def _scan(dtype, x, dt, A, B, C, D, initial_state):
    x, dt, A, B, C, D, h = _cast(dtype, x, dt, A, B, C, D, initial_state)
    b, l, e = x.shape
    n = A.shape[1]
    delta_a = _exp(dt[..., None] * A)  # b l e n
    delta_b_u = (dt * x)[..., None] * B[:, :, None, :]  # b l e n
    h = _state0(h, b, e, n, dtype)
    ys = []
    for t in range(l):
        h = delta_a[:, t] * h + delta_b_u[:, t]
        ys.append(np.einsum("ben,bn->be", h, C[:, t]))
    y = np.stack(ys, axis=1)
    return (y if D is None else y + x * D), h


def oracle_fp64(x, dt, A, B, C, D=None, initial_state=None):
    """The ground truth: the recurrence in float64. Returns (y, last_state) in float64."""
    return _scan(np.float64, x, dt, A, B, C, D, initial_state)


def scan_fp32(x, dt, A, B, C, D=None, initial_state=None):
    """mamba_ssm `selective_scan_ref`'s computation in float32: the whole-sequence forms' reference."""
    return _scan(np.float32, x, dt, A, B, C, D, initial_state)


def step_fp32(state, x, dt, A, B, C, D=None):
    """mamba_ssm `selective_state_update_ref`'s computation in float32, one token: state (b, e, n),
    x, dt (b, e), B, C (b, n). Returns (y (b, e), new_state); `state` is not modified."""
    state, x, dt, A, B, C, D = _cast(np.float32, state, x, dt, A, B, C, D)
    new = state * _exp(dt[..., None] * A) + (dt[..., None] * B[:, None, :]) * x[..., None]
    y = np.einsum("ben,bn->be", new, C)
    return (y if D is None else y + x * D), new


def steps_fp32(x, dt, A, B, C, D=None, initial_state=None):
    """`step_fp32` token by token over a whole sequence (the decode loop's reference)."""
    b, l, e = x.shape
    state = _state0(None if initial_state is None else np.asarray(initial_state, np.float32),
                    b, e, A.shape[1], np.float32)
    ys = []
    for t in range(l):
        y, state = step_fp32(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        ys.append(y)
    return np.stack(ys, axis=1), state


class NumpyScanReferences:
    """The budget's references without torch (the role of equiv.mamba2.ssd_numpy.NumpySSDReferences),
    chosen as equiv_reference.mamba1.scan_references.TorchScanReferences chooses its torch ones: the
    float64 oracle; for the whole-sequence forms ("sequential", "associative", "chunked")
    `scan_fp32` (selective_scan_ref, mamba_ssm's only whole-sequence algorithm in torch), except
    from an initial state, which selective_scan_ref does not take: then, as for "step",
    `steps_fp32`. `kw` is ScanInstance.kwargs(), possibly time-sliced or with arrays replaced (x
    may be float64: the oracle computes in float64 regardless)."""

    name = "numpy"

    def oracle(self, kw: dict) -> tuple[np.ndarray, np.ndarray]:
        return oracle_fp64(**kw)

    def reference(self, form: str, kw: dict) -> tuple[np.ndarray, np.ndarray]:
        if form not in ("sequential", "associative", "chunked", "step"):
            raise ValueError(f"form: expected sequential, associative, chunked or step, got {form!r}")
        if form == "step" or kw.get("initial_state") is not None:
            return steps_fp32(**kw)
        return scan_fp32(**kw)

    def provenance(self) -> dict:
        return {
            "name": self.name,
            "oracle": "equiv.mamba1.scan_numpy.oracle_fp64 (sequential recurrence, float64)",
            "scan": "equiv.mamba1.scan_numpy.scan_fp32 (mamba_ssm selective_scan_ref's algorithm, "
                    "numpy float32)",
            "step": "equiv.mamba1.scan_numpy.steps_fp32 (mamba_ssm selective_state_update_ref's "
                    "algorithm token by token, numpy float32)",
            "numpy": np.__version__,
            "equiv": equiv.__version__,
        }

    def __repr__(self) -> str:
        return "NumpyScanReferences()"


__all__ = ["NumpyScanReferences", "oracle_fp64", "scan_fp32", "step_fp32", "steps_fp32"]
