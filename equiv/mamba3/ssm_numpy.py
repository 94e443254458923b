"""The budget's references for the Mamba-3 SSM properties, in plain numpy (no torch, no jax).

The error budget judges a float32 result by its distance to the float64 oracle relative to the
distance of equally correct float32 computations of the same quantity on the same inputs. Here:

- the oracle: the sequential recurrence of equiv/mamba3/oracle.py in float64.
- variant "recurrence": the same recurrence run in numpy float32, as written: every operation
  rounded to float32 in the oracle's order, numpy's float32 exp / tanh / cos / sin (up to 2.3,
  1.4, 1.4, 1.4 ULP), the rotary angle carried unwrapped in plain float32 (its absolute error
  grows with ulp(theta)).
- variant "careful": the same recurrence, in the same order, rounded as a careful float32
  implementation rounds (`recurrence_careful`): exp, tanh, cos and sin correctly rounded (evaluated
  in float64, rounded once, as equiv/mamba1/scan_numpy.py's and equiv/mamba2/ssd_numpy.py's `_exp`),
  and the angle carried reduced to [-pi, pi] (as mamba_ssm's angle kernel carries it mod 2 pi),
  each step's sum rounded to float32 and reduced exactly.

Every form (chunked, sequential, step) is judged against both: the budget's yardstick is their
pooled error, at each element the quadratic mean of the two deviations from the oracle
(equiv.mamba3.ssm_harness.pool). Why two: on the last SSM state, the error of one float32 run is
dominated by a few shared roundings (one tanh per position and angle, one angle increment per head;
rotating k by theta's error costs |theta| x its relative error), so the ratio of two correct
float32 runs' errors is heavy-tailed. Measured: the careful variant against the recurrence variant
alone reached 3.3x on the state (build_instance('D-chunk1', Regime(seed=47035, log10_dt=0.3125,
log10_decay=0.0, log10_floor=-1.0, floored=1.0, log10_angle=0.015625, log10_x_scale=0.0)), with dt
spread 0.5): a budget of 2x one run's error would fail a correctly rounded computation. Neither
variant is the port's code: both are written from the equations, in numpy.

`kw` is SSMInstance.kwargs() (equiv.mamba3.ssm_strategies), possibly time-sliced or with arrays
replaced. Every function returns (y (b, l, R, h, p), State, theta (b, l, h, a)) in its precision.
"""

from __future__ import annotations

import numpy as np

import equiv
from equiv.mamba3.oracle import State, ssm, zero_state

FORMS = ("chunked", "sequential", "step")
VARIANTS = ("recurrence", "careful")
_F32 = np.float32
_TWO_PI = 2 * np.pi


def _rounded(fn):
    """fn evaluated in float64 on float32 arguments, rounded once to float32 (correctly rounded but
    for double rounding, which is rare)."""
    return lambda v: fn(np.asarray(v, np.float64)).astype(_F32)


_exp, _tanh, _cos, _sin = (_rounded(f) for f in (np.exp, np.tanh, np.cos, np.sin))


def _reduce(theta32):
    """A float32 angle -> (turns (float64, integral), theta32 - 2 pi turns rounded once to float32,
    in [-pi, pi])."""
    t = np.asarray(theta32, np.float64)
    turns = np.round(t / _TWO_PI)
    return turns, (t - turns * _TWO_PI).astype(_F32)  # t - turns 2 pi exact in float64 for |t| < 2^28


def _rotate(v, theta, pairwise: bool):
    """R(theta) v in float32, cos and sin correctly rounded: v (..., n), theta (..., a)."""
    a, n = theta.shape[-1], v.shape[-1]
    i0 = np.arange(a) * 2 if pairwise else np.arange(a)
    i1 = i0 + 1 if pairwise else i0 + n // 2
    cos, sin = _cos(theta), _sin(theta)
    v0, v1 = v[..., i0], v[..., i1]
    out = v.copy()
    out[..., i0] = v0 * cos - v1 * sin
    out[..., i1] = v0 * sin + v1 * cos
    return out


def recurrence_careful(x, dt, A, trap, B, C, angle, D, mimo_x=None, state: State | None = None, *,
                       pairwise: bool = True):
    """The oracle's recurrence (equiv/mamba3/oracle.py, same equations, same order) in float32 with
    correctly rounded exp, tanh, cos, sin and the angle carried reduced to [-pi, pi]:

        s_t = fl(r_{t-1} + fl(fl(pi tanh(angle_t)) dt_t));   r_t = s_t - 2 pi round(s_t / 2 pi), rounded once

    k and q are rotated by r_t. The unwrapped theta returned (the `angles` tap) is 2 pi x the turns
    counted so far + r_t, rounded once to float32, and so is the returned State's angle (a later span
    reduces it again: one float32 rounding of theta where a prefill is split, as any float32 State
    carrying the angle unwrapped has)."""
    f = _F32
    x, dt, A, trap, B, C, angle, D = (np.asarray(v).astype(f) for v in (x, dt, A, trap, B, C, angle, D))
    b, l, h, p = x.shape
    rank, n, a = B.shape[2], B.shape[-1], angle.shape[-1]
    up = np.ones((rank, h, p), f) if mimo_x is None else np.asarray(mimo_x).astype(f).transpose(1, 0, 2)
    st = (zero_state(b, h, p, n, a, rank, f) if state is None
          else State(*(np.asarray(s).astype(f) for s in state)))
    turns, r = _reduce(st.angle)
    H, k_prev, x_prev = st.ssm.copy(), st.k.copy(), st.v.copy()
    pi = f(np.pi)
    ys, thetas = np.empty((b, l, rank, h, p), f), np.empty((b, l, h, a), f)
    for t in range(l):
        # theta_t = theta_{t-1} + pi tanh(angle_t) dt_t, carried mod 2 pi
        more, r = _reduce(r + (pi * _tanh(angle[:, t]))[:, None, :] * dt[:, t, :, None])
        turns = turns + more
        thetas[:, t] = (turns * _TWO_PI + r).astype(f)
        k = _rotate(B[:, t], r[:, None], pairwise)  # k_t = R(theta_t) B_t
        q = _rotate(C[:, t], r[:, None], pairwise)
        xr, xr_prev = x[:, t, None] * up, x_prev[:, None] * up
        alpha = _exp(A[:, t] * dt[:, t])
        beta = (1 - trap[:, t]) * dt[:, t] * alpha
        gamma = trap[:, t] * dt[:, t]
        H = (alpha[..., None, None] * H
             + beta[..., None, None] * np.einsum("brhp,brhn->bhpn", xr_prev, k_prev)
             + gamma[..., None, None] * np.einsum("brhp,brhn->bhpn", xr, k))
        ys[:, t] = np.einsum("bhpn,brhn->brhp", H, q) + D[:, None] * xr
        k_prev, x_prev = k, x[:, t]
    return ys, State(thetas[:, -1].copy(), H, k_prev, x_prev), thetas


class NumpySSMReferences:
    """The float64 oracle and the float32 variants (VARIANTS) of every form: one recurrence, rounded
    two ways (the forms differ in how the port computes, not in what)."""

    name = "numpy"
    variants = VARIANTS

    def oracle(self, kw: dict):
        return ssm(**kw, dtype=np.float64)

    def reference(self, form: str, kw: dict, variant: str = "recurrence"):
        if form not in FORMS:
            raise ValueError(f"form: expected one of {FORMS}, got {form!r}")
        if variant == "recurrence":
            return ssm(**kw, dtype=np.float32)
        if variant == "careful":
            return recurrence_careful(**kw)
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")

    def provenance(self) -> dict:
        return {
            "name": self.name,
            "oracle": "equiv.mamba3.oracle.ssm (sequential recurrence, numpy float64)",
            "reference": "pooled (quadratic mean of the deviations from the oracle, per element) over two "
                         "float32 runs of the recurrence, for every form: equiv.mamba3.oracle.ssm in numpy "
                         "float32 as written, and equiv.mamba3.ssm_numpy.recurrence_careful (correctly "
                         "rounded exp/tanh/cos/sin, angle carried mod 2 pi)",
            "variants": list(VARIANTS),
            "numpy": np.__version__,
            "equiv": equiv.__version__,
        }

    def __repr__(self) -> str:
        return "NumpySSMReferences()"


__all__ = ["FORMS", "NumpySSMReferences", "VARIANTS", "recurrence_careful"]
