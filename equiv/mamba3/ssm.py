"""The Mamba-3 SSM in pure JAX, in the forms a port needs (the equations: equiv/mamba3/oracle.py).

    theta_t = theta_{t-1} + pi tanh(angle_t) dt_t
    H_t     = alpha_t H_{t-1} + beta_t sum_r x_{t-1,r} k_{t-1,r}^T + gamma_t sum_r x_t,r k_t,r^T
    y_t,r   = H_t q_t,r + D x_t,r          k, q rotated by theta_t; x_t,r = x_t * mimo_x_r

Layouts are batch-first, time on axis 1:

    x (b, l, h, p)   dt, A, trap (b, l, h)   B, C (b, l, R, h, n)   angle (b, l, a)   D (h,)
    mimo_x (h, R, p) or None   y (b, l, R, h, p)   State: angle (b, h, a), ssm (b, h, p, n),
    k (b, R, h, n), v (b, h, p)

trap is lambda (after its sigmoid), B and C are normed and biased but not rotated, angle is raw
(tanh is taken here). The state, the decays and every accumulation are float32 whatever the input
dtype; with bfloat16 inputs the rotated q and the scaled k are rounded to bfloat16 before their
products, as mamba_ssm's kernels store them.

The forms:

- `ssm_chunked`: the prefill, parallel within chunks of `chunk` positions. Unrolling the
  recurrence, position j reaches position i > j with weight exp(sum_{s=j+1..i} A_s dt_s) x
  scale_j, where scale_j = gamma_j + (1 - lam_{j+1}) dt_{j+1} (the next position's trapezoid
  term, which carries position j's input one step later); at i = j the weight is gamma_i. So
  within a chunk y = (masked decay-weighted q k^T) x + D x, and a chunk's end state is a
  decay-weighted sum of k x^T; a lax.scan carries the state from chunk to chunk. The weight
  exp(segment sums) is built from per-segment sums (no difference of cumulative sums, which
  cancels). l need not be a multiple of chunk: the tail is padded with dt = x = 0, which leaves
  the state as it was.
- `ssm_step`: one position from a State, the O(1) decode update, in the oracle's order (advance
  the angle, rotate, update, read out, remember k and x for the next trapezoid term).
- `ssm_sequential`: lax.scan of `ssm_step`, the recurrence as written.

The returned State continues either form: a chunked prefill from a State folds the carried
(k, v) into the first position's trapezoid term.

The rotary angle is carried unwrapped in double-float32 (angle + angle_lo, ~48 significant bits)
and reduced to [-pi, pi], exactly, only where it rotates: rotations see the angle mod 2 pi, which an
unreduced float32 sum loses as ulp(theta) grows with theta (measured with the numpy float32
recurrence, correctly rounded exp / tanh / cos / sin, on the property suite's strong-decay corner
build_instance('C-long', Regime(seed=11, ...)), whose angles reach 343 rad: the last state's RMS
error against the float64 oracle 1.2e-2 with a plain float32 angle, 2.8e-3 with the angle summed in
float64 and reduced mod 2 pi before rounding). mamba_ssm's angle kernel reduces its float32 carry
mod 2 pi from chunk to chunk instead; the cumulative angle the forms return (the `angles` tap) stays
unwrapped, continuous across turns.
tanh is this module's `tanh` (Cephes' float32 tanhf), not jnp.tanh: see its docstring.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from equiv.errors import ShapeError, format_mismatches

MODES = ("chunked", "sequential")
_F32 = jnp.float32
PI = math.pi


class State(NamedTuple):
    """One layer's recurrent state after a position: angle (b, h, a) float32, the cumulative rotary
    angle theta, unwrapped, and angle_lo (b, h, a) float32 its compensation (theta = angle +
    angle_lo to ~48 bits); ssm (b, h, p, n) float32; k (b, R, h, n) the last rotated B (float32);
    v (b, h, p) the last x (input dtype)."""

    angle: jax.Array
    ssm: jax.Array
    k: jax.Array
    v: jax.Array
    angle_lo: jax.Array


def zero_state(b: int, h: int, p: int, n: int, a: int, rank: int, dtype=_F32) -> State:
    return State(jnp.zeros((b, h, a), _F32), jnp.zeros((b, h, p, n), _F32), jnp.zeros((b, rank, h, n), _F32),
                 jnp.zeros((b, h, p), dtype), jnp.zeros((b, h, a), _F32))


# 2 pi split for an exact reduction (Cody-Waite): TWO_PI_HI = 201/32 has 8 significant bits, so
# k x TWO_PI_HI is exact in float32 for |k| < 2**16 turns (theta up to ~4e5 rad).
TWO_PI_HI = 6.28125
TWO_PI_LO = 2 * math.pi - TWO_PI_HI


def _two_sum(a, b):
    """(s, e) with s = fl(a + b) and a + b = s + e exactly (Knuth's TwoSum; XLA does not
    reassociate float arithmetic)."""
    s = a + b
    bp = s - a
    return s, (a - (s - bp)) + (b - bp)


def _add2(x, y):
    """(hi, lo) + (hi, lo) -> (hi, lo), a double-float32 sum (renormalised: hi = fl(hi + lo))."""
    s, e = _two_sum(x[0], y[0])
    lo = e + (x[1] + y[1])
    hi = s + lo
    return hi, lo - (hi - s)


def reduce_angle(hi, lo):
    """A double-float32 angle hi + lo -> the same angle in [-pi, pi] (up to rounding at the edges),
    float32, rounded once at the reduced magnitude. Symmetric: an angle already within +-pi comes
    back as hi + lo exactly (not moved near 2 pi, where its sine would lose its relative precision)."""
    k = jnp.round(hi * (1 / (2 * math.pi)))
    r, e1 = _two_sum(hi, -k * TWO_PI_HI)
    r, e2 = _two_sum(r, -k * TWO_PI_LO)
    return r + (e1 + e2 + lo)


def split_angle(theta):
    """An angle given in float64 or float32 (numpy) -> (hi, lo) float32 (lo 0 from float32)."""
    import numpy as np

    theta = np.asarray(theta, np.float64)
    hi = theta.astype(np.float32)
    return jnp.asarray(hi), jnp.asarray((theta - hi).astype(np.float32))


def validate(x, dt, A, trap, B, C, angle, D, mimo_x, state, *, step: bool) -> None:
    """Collect every shape mismatch and raise once, naming dimensions."""
    lead = ("b",) if step else ("b", "l")
    nl = len(lead)
    if x.ndim != nl + 2 or B.ndim != nl + 3 or angle.ndim != nl + 1:
        lt = ", ".join(lead)
        raise ShapeError(f"Mamba-3 SSM arguments: expected x ({lt}, h, p), B ({lt}, R, h, n), "
                         f"angle ({lt}, a); got x {tuple(x.shape)}, B {tuple(B.shape)}, "
                         f"angle {tuple(angle.shape)}")
    bl, (h, p) = tuple(x.shape[:nl]), x.shape[nl:]
    rank, n, a = B.shape[nl], B.shape[-1], angle.shape[-1]
    problems: list[str] = []

    def expect(name, arr, shape, names):
        if arr is not None and tuple(arr.shape) != tuple(shape):
            problems.append(f"{name}: expected shape ({names}) = {tuple(shape)}, got {tuple(arr.shape)}")

    lt = ", ".join(lead)
    for name, arr in (("dt", dt), ("A", A), ("trap", trap)):
        expect(name, arr, (*bl, h), f"{lt}, h")
    expect("B", B, (*bl, rank, h, n), f"{lt}, R, h, n")
    expect("C", C, (*bl, rank, h, n), f"{lt}, R, h, n")
    expect("D", D, (h,), "h")
    expect("mimo_x", mimo_x, (h, rank, p), "h, R, p")
    if mimo_x is None and rank != 1:
        problems.append(f"mimo_x: expected (h, R, p) for rank R = {rank} > 1, got None")
    if 2 * a > n:
        problems.append(f"angle: expected at most n / 2 = {n // 2} angles, got {a}")
    if state is not None:
        for name, arr, shape, names in (("state.angle", state.angle, (bl[0], h, a), "b, h, a"),
                                        ("state.angle_lo", state.angle_lo, (bl[0], h, a), "b, h, a"),
                                        ("state.ssm", state.ssm, (bl[0], h, p, n), "b, h, p, n"),
                                        ("state.k", state.k, (bl[0], rank, h, n), "b, R, h, n"),
                                        ("state.v", state.v, (bl[0], h, p), "b, h, p")):
            expect(name, arr, shape, names)
    if not step and not problems and bl[1] == 0:
        problems.append("x: expected l (length) >= 1, got l=0")
    if problems:
        raise ShapeError(format_mismatches("Mamba-3 SSM arguments", problems))


def rotate(v, theta, pairwise: bool):
    """R(theta) v: v (..., n), theta (..., a) broadcastable to v's leading axes; float32 math.
    Pairs (2i, 2i+1) when `pairwise` (SISO), else (i, i + n/2) (MIMO); i < a; the rest pass."""
    a, n = theta.shape[-1], v.shape[-1]
    v = v.astype(_F32)
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    if pairwise:
        v0, v1, rest = v[..., 0:2 * a:2], v[..., 1:2 * a:2], v[..., 2 * a:]
        r0, r1 = v0 * cos - v1 * sin, v0 * sin + v1 * cos
        rotated = jnp.stack([r0, r1], axis=-1).reshape(*r0.shape[:-1], 2 * a)
        return jnp.concatenate([rotated, rest], axis=-1)
    half = n // 2
    v0, v1 = v[..., :a], v[..., half:half + a]
    r0, r1 = v0 * cos - v1 * sin, v0 * sin + v1 * cos
    return jnp.concatenate([r0, v[..., a:half], r1, v[..., half + a:]], axis=-1)


# tanh(x) = x + x^3 P(x^2) for |x| < 0.625, P the degree-4 minimax polynomial of Cephes' tanhf
# (S. L. Moshier), highest power first
_TANH_P = (-5.70498872745e-3, 2.06390887954e-2, -5.37397155531e-2, 1.33314422036e-1, -3.33332819422e-1)


def tanh(v):
    """tanh in float32 to within 1.4 ULP (measured: mean 0.26, nearly correctly rounded), as Cephes' tanhf:
    x + x^3 P(x^2) below |x| = 0.625, 1 - 2 / (e^{2|x|} + 1) above (XLA's exp is within 1 ULP).
    jnp.tanh is XLA's rational approximation, up to 4.6 ULP (mean 0.78; numpy's float32 tanh:
    1.4, mean 0.38), and theta sums those errors position after position, each rotating k and q.
    Measured (equiv.mamba3.ssm_properties, sequential_matches_oracle, the last state's RMS ratio to
    the budget's pooled float32 reference): on build_instance('A-siso', Regime(seed=8 and seed=2,
    every other scalar 0.0)) 2.23x and 2.18x with jnp.tanh, 0.68x and 0.92x with this tanh. A numpy
    float32 recurrence, correctly rounded but for XLA's tanh values, errs like the port with
    jnp.tanh (2.99x and 2.12x on the same instances; 0.75x and 0.74x with tanh correctly rounded):
    the loss is the tanh's, not the form's."""
    v = v.astype(_F32)
    a = jnp.abs(v)
    z = v * v
    poly = jnp.full_like(z, _TANH_P[0])
    for c in _TANH_P[1:]:
        poly = poly * z + c
    small = v + v * (z * poly)
    large = 1.0 - 2.0 / (jnp.exp(2.0 * a) + 1.0)  # e^{2|x|} = inf above ~44: exactly 1
    return jnp.where(a < 0.625, small, jnp.sign(v) * large)


def angle_increments(angle, dt):
    """pi tanh(angle) dt per head: angle (..., a) shared by the heads, dt (..., h) -> (..., h, a)."""
    return (PI * tanh(angle))[..., None, :] * dt.astype(_F32)[..., None]


def _up(x, mimo_x):
    """x (..., h, p) -> x_r (..., R, h, p) = x * mimo_x_r (R = 1, x itself, without MIMO)."""
    xf = x.astype(_F32)[..., None, :, :]
    if mimo_x is None:
        return xf
    up = jnp.swapaxes(mimo_x.astype(_F32), 0, 1)
    return xf * up.reshape((1,) * (xf.ndim - 3) + up.shape)


def _skip(D, xr):
    """D x_r: D (h,) against x_r (..., R, h, p)."""
    return D.astype(_F32).reshape((1,) * (xr.ndim - 2) + (-1, 1)) * xr


def _rounded(v, dtype):
    """v rounded to the input dtype (a no-op in float32), as the kernels store q, k and x."""
    return v if dtype == _F32 else v.astype(dtype).astype(_F32)


# ---------------------------------------------------------------------------------------------
# the O(1) step and its lax.scan


def ssm_step(state: State, x, dt, A, trap, B, C, angle, D, mimo_x=None, *, pairwise: bool = True):
    """One position from `state`: x (b, h, p), dt, A, trap (b, h), B, C (b, R, h, n), angle (b, a).
    Returns (y (b, R, h, p) float32, new State)."""
    dtype = x.dtype
    dt, A, trap = (v.astype(_F32) for v in (dt, A, trap))
    # theta_t = theta_{t-1} + pi tanh(angle_t) dt_t (double-float32), rotating by it mod 2 pi
    inc = angle_increments(angle, dt)
    theta, theta_lo = _add2((state.angle, state.angle_lo), (inc, jnp.zeros_like(inc)))
    turn = reduce_angle(theta, theta_lo)
    k = rotate(B, turn[:, None], pairwise)  # k_t = R(theta_t) B_t (rotate before use)
    q = _rounded(rotate(C, turn[:, None], pairwise), dtype)
    xr, xr_prev = _up(x, mimo_x), _up(state.v, mimo_x)
    alpha = jnp.exp(A * dt)
    beta = (1.0 - trap) * dt * alpha
    gamma = trap * dt
    # H_t = alpha H_{t-1} + beta sum_r x_{t-1,r} k_{t-1,r}^T + gamma sum_r x_t,r k_t,r^T
    prev = jnp.einsum("brhp,brhn->bhpn", xr_prev, _rounded(state.k, dtype))
    cur = jnp.einsum("brhp,brhn->bhpn", xr, _rounded(k, dtype))
    H = alpha[..., None, None] * state.ssm + beta[..., None, None] * prev + gamma[..., None, None] * cur
    y = jnp.einsum("bhpn,brhn->brhp", H, q)  # y_t,r = H_t q_t,r + D x_t,r (read out after the update)
    if D is not None:
        y = y + _skip(D, xr)
    return y, State(theta, H, k, x, theta_lo)


def ssm_sequential(x, dt, A, trap, B, C, angle, D, mimo_x=None, state: State | None = None, *,
                   pairwise: bool = True):
    """lax.scan of ssm_step over time. Returns (y (b, l, R, h, p), State, theta (b, l, h, a))."""
    b, _, h, p = x.shape
    st = zero_state(b, h, p, B.shape[-1], angle.shape[-1], B.shape[2], x.dtype) if state is None else state

    def body(carry, inputs):
        y, new = ssm_step(carry, *inputs, D, mimo_x, pairwise=pairwise)
        return new, (y, new.angle)

    seq = tuple(jnp.moveaxis(v, 1, 0) for v in (x, dt, A, trap, B, C, angle))
    final, (ys, thetas) = jax.lax.scan(body, st, seq)
    return jnp.moveaxis(ys, 0, 1), final, jnp.moveaxis(thetas, 0, 1)


# ---------------------------------------------------------------------------------------------
# the chunked prefill


def cumulative_angles(angle, dt, angle0, angle0_lo, chunk: int):
    """theta_t = theta0 + sum_{s<=t} pi tanh(angle_s) dt_s: angle (b, l, a), dt (b, l, h), theta0 =
    angle0 + angle0_lo (b, h, a) -> (theta (b, l, h, a), its compensation, theta mod 2 pi), float32,
    l a multiple of `chunk`. A running sum within each chunk (all chunks at once: a lax.scan over the
    chunk's positions) added to the carry of the chunks before (a lax.scan over chunks), all in
    double-float32: chunk + l / chunk sequential steps. Each position is then reduced mod 2 pi
    exactly, so the rotation sees its angle to ~ulp(2 pi) / 2 however long the sequence."""
    b, l, h = dt.shape
    a, nc = angle.shape[-1], l // chunk
    inc = jnp.moveaxis(angle_increments(angle, dt).reshape(b, nc, chunk, h, a), 2, 0)  # c b nc h a

    def running(c, x):
        c = _add2(c, (x, jnp.zeros_like(x)))
        return c, c

    zero = jnp.zeros_like(inc[0])
    totals, within = jax.lax.scan(running, (zero, zero), inc)  # within: (c b nc h a) x 2

    def carry(c, total):
        return _add2(c, total), c  # emit the carry at the chunk's start

    _, start = jax.lax.scan(carry, (angle0.astype(_F32), angle0_lo.astype(_F32)),
                            tuple(jnp.moveaxis(t, 1, 0) for t in totals))  # over nc
    start = tuple(jnp.broadcast_to(jnp.moveaxis(v, 0, 1)[None], within[0].shape) for v in start)
    hi, lo = _add2(start, within)
    return tuple(jnp.moveaxis(v, 0, 2).reshape(b, l, h, a) for v in (hi, lo, reduce_angle(hi, lo)))


def _segsum(a):
    """a (..., c) -> S (..., c, c) with S[i, j] = sum_{s=j+1..i} a_s for j <= i (0 on the diagonal),
    -inf above it: each entry a sum of its own segment, not a difference of cumulative sums."""
    c = a.shape[-1]
    shape = (*a.shape, c)
    lower = jnp.broadcast_to(jnp.tril(jnp.ones((c, c), bool), -1), shape)  # s > j
    terms = jnp.where(lower, jnp.broadcast_to(a[..., :, None], shape), 0.0)
    seg = jnp.cumsum(terms, axis=-2)  # [i, j] = sum_{s<=i, s>j} a_s
    return jnp.where(jnp.broadcast_to(jnp.tril(jnp.ones((c, c), bool)), shape), seg, -jnp.inf)


def ssm_chunked(x, dt, A, trap, B, C, angle, D, mimo_x=None, state: State | None = None, *, chunk: int = 64,
                pairwise: bool = True):
    """The chunked prefill (see the module docstring). Returns (y (b, l, R, h, p) float32, State,
    theta (b, l, h, a) float32)."""
    dtype = x.dtype
    b, l, h, p = x.shape
    rank, n, a = B.shape[2], B.shape[-1], angle.shape[-1]
    st = zero_state(b, h, p, n, a, rank, dtype) if state is None else state
    nc = -(-l // chunk)
    pad = nc * chunk - l

    def padded(v):  # zeros in the tail: dt = x = 0 there
        return jnp.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2)) if pad else v

    x, dt, A, trap, B, C, angle = (padded(v) for v in (x, dt, A, trap, B, C, angle))
    dtf, Af, lam = (v.astype(_F32) for v in (dt, A, trap))

    theta, theta_lo, turn = cumulative_angles(angle, dtf, st.angle, st.angle_lo, chunk)

    q = _rounded(rotate(C, turn[:, :, None], pairwise), dtype)  # b L R h n
    k = rotate(B, turn[:, :, None], pairwise)
    xr = _up(x, mimo_x)  # b L R h p
    gamma = lam * dtf  # b L h
    beta_next = jnp.pad(((1.0 - lam) * dtf)[:, 1:], [(0, 0), (0, 1), (0, 0)])  # (1 - lam_{t+1}) dt_{t+1}
    ks = _rounded(k * (gamma + beta_next)[:, :, None, :, None], dtype)  # k_j scale_j

    def chunks(v):
        return v.reshape(b, nc, chunk, *v.shape[2:])

    q, k, ks, xr, gamma = chunks(q), _rounded(chunks(k), dtype), chunks(ks), chunks(xr), chunks(gamma)
    adt = jnp.moveaxis(chunks(Af * dtf), 3, 2)  # b nc h c
    seg = _segsum(adt)  # b nc h c c: sum_{s=j+1..i} A dt
    from_start = jnp.cumsum(adt, axis=-1)  # sum_{s<=i}: the decay from the chunk's start
    to_end = seg[..., -1, :]  # sum_{s=j+1..c-1}: from position j to the chunk's end
    eye = jnp.eye(chunk, dtype=bool)
    # W[i, j] = exp(seg) for j < i (applied to k_j scale_j), gamma_i for j = i (applied to k_i)
    # b nc h i j, 0 on and above the diagonal
    decay = jnp.exp(jnp.where(jnp.broadcast_to(eye, seg.shape), -jnp.inf, seg))
    diag = jnp.moveaxis(gamma, 3, 2)  # b nc h c
    scores_off = jnp.einsum("bcirhn,bcjshn->bchirjs", q, ks)  # q_i,r . k_j,s scale_j
    scores_on = jnp.einsum("bcirhn,bcishn->bchirs", q, k)  # q_i,r . k_i,s
    y = jnp.einsum("bchirjs,bchij,bcjshp->bcirhp", scores_off, decay, xr)
    y = y + jnp.einsum("bchirs,bchi,bcishp->bcirhp", scores_on, diag, xr)
    if D is not None:
        y = y + _skip(D, xr)

    # each chunk's own contribution to its end state, and its total decay
    contrib = jnp.einsum("bchj,bcjrhp,bcjrhn->bchpn", jnp.exp(to_end), xr, ks)
    total = jnp.exp(from_start[..., -1])  # b nc h
    # the carried state enters with the first position's trapezoid term for the carried (k, v)
    h0 = st.ssm + ((1.0 - lam[:, 0]) * dtf[:, 0])[..., None, None] * jnp.einsum(
        "brhp,brhn->bhpn", _up(st.v, mimo_x), _rounded(st.k, dtype))

    def carry(H, inputs):
        decay_c, contrib_c = inputs
        return decay_c[..., None, None] * H + contrib_c, H  # emit the state at the chunk's start

    H_end, H_start = jax.lax.scan(carry, h0, (jnp.moveaxis(total, 1, 0), jnp.moveaxis(contrib, 1, 0)))
    H_start = jnp.moveaxis(H_start, 0, 1)  # b nc h p n
    y = y + jnp.einsum("bchpn,bcirhn,bchi->bcirhp", H_start, q, jnp.exp(from_start))

    y = y.reshape(b, nc * chunk, rank, h, p)[:, :l]
    theta = theta[:, :l]
    # the padded tail had dt = 0, x = 0: H_end is the state after position l - 1
    last = l - 1
    k_last = rotate(B[:, last], turn[:, last, None], pairwise)
    return y, State(theta[:, last], H_end, k_last, x[:, last], theta_lo[:, last]), theta


def ssm_forward(x, dt, A, trap, B, C, angle, D, mimo_x=None, state: State | None = None, *,
                mode: str = "chunked", chunk: int = 64, pairwise: bool = True):
    """Dispatch to a form by name (MODES), after checking shapes."""
    validate(x, dt, A, trap, B, C, angle, D, mimo_x, state, step=False)
    if mode == "chunked":
        return ssm_chunked(x, dt, A, trap, B, C, angle, D, mimo_x, state, chunk=chunk, pairwise=pairwise)
    if mode == "sequential":
        return ssm_sequential(x, dt, A, trap, B, C, angle, D, mimo_x, state, pairwise=pairwise)
    raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")


__all__ = ["MODES", "State", "angle_increments", "cumulative_angles", "reduce_angle", "rotate", "split_angle",
           "ssm_chunked", "ssm_forward", "ssm_sequential", "ssm_step", "tanh", "validate", "zero_state"]
