"""Mamba-1's selective scan (S6) in pure JAX, in the forms a port needs.

    h_t = exp(dt_t * A) * h_{t-1} + (dt_t * x_t)[..., None] * B_t[:, None, :]
    y_t = sum_n C_t * h_t  (+ D * x_t)

Layouts are batch-first, time on axis 1 (the model's activations need no transpose):

    x, dt (b, l, e)   A (e, n)   B, C (b, l, n)   D (e,)   state (b, e, n)

dt is already positive (the caller applies dt_proj's bias and the softplus); A is negative (the
caller takes -exp(A_log)). State and arithmetic run in float32 whatever the input dtype, as
mamba_ssm's `selective_scan_ref` and transformers' `MambaMixer.slow_forward` do; y and the last
state come back in float32 (the caller casts y).

Why several forms of one recurrence:

- "sequential": lax.scan over time, one `selective_step` per position: the recurrence as written,
  O(b e n) memory, l dependent steps. The readable baseline.
- "associative": jax.lax.associative_scan over (decay, input) pairs, composed as
  (a1, u1) then (a2, u2) = (a1 a2, a2 u1 + u2): O(log l) depth, the parallel prefill. It holds
  every h_t at once, O(b l e n) memory (as `selective_scan_ref`'s deltaA does).
- "chunked": the associative form inside chunks of `chunk` positions, the state carried from chunk
  to chunk by a lax.scan: O(b chunk e n) memory whatever l, for long prompts. l need not be a
  multiple of chunk: the tail is padded with x = dt = 0, whose decay exp(0) = 1 and input 0 leave
  the state exactly as it was.
- `selective_step`: one position from a given state, the O(1) decode update.

Every function is jit-compatible with `mode` and `chunk` static.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from equiv.errors import ShapeError, format_mismatches

MODES = ("sequential", "associative", "chunked")
DEFAULT_CHUNK = 256
"""The chunked form's chunk when none is given: a 130m layer (e = 1536, n = 16) then holds
b x 256 x 1536 x 16 float32 values in each (b, chunk, e, n) array of a chunk, 25 MiB at b = 1."""

_F32 = jnp.float32


def _validate(x, dt, A, B, C, D, state, *, step: bool) -> None:
    """Collect every mismatch and raise once, naming dimensions."""
    lead, nlead = ("b", 1) if step else ("b, l", 2)
    if x.ndim != nlead + 1:
        raise ShapeError(f"x: expected rank {nlead + 1} ({lead}, e), got shape {tuple(x.shape)}")
    if A.ndim != 2:
        raise ShapeError(f"A: expected rank 2 (e, n), got shape {tuple(A.shape)}")
    bl, e = tuple(x.shape[:-1]), x.shape[-1]
    n = A.shape[1]
    problems: list[str] = []

    def expect(name, arr, shape, names):
        if arr is not None and tuple(arr.shape) != tuple(shape):
            problems.append(f"{name}: expected shape ({names}) = {tuple(shape)}, got {tuple(arr.shape)}")

    expect("dt", dt, (*bl, e), f"{lead}, e")
    expect("A", A, (e, n), "e, n")
    expect("B", B, (*bl, n), f"{lead}, n")
    expect("C", C, (*bl, n), f"{lead}, n")
    expect("D", D, (e,), "e")
    expect("state" if step else "initial_state", state, (bl[0], e, n), "b, e, n")
    for name, arr in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("state", state)):
        if arr is not None and not jnp.issubdtype(arr.dtype, jnp.floating):
            problems.append(f"{name}: expected a floating dtype, got {arr.dtype}")
    if not step and not problems and bl[1] == 0:
        problems.append("x: expected l (length) >= 1, got l=0")
    if problems:
        raise ShapeError(format_mismatches("selective scan arguments", problems))


def _discretize(x, dt, A, B):
    """(decay, input) of each position, float32: exp(dt A) and (dt x) B, both (... e n)."""
    x, dt, A, B = (jnp.asarray(a, _F32) for a in (x, dt, A, B))
    decay = jnp.exp(dt[..., None] * _lead(A, dt.ndim - 1))
    inp = (dt * x)[..., None] * B[..., None, :]
    return decay, inp


def _lead(a, k):
    """a with k leading axes of size 1: explicit broadcasting, so the functions also run under
    jax_numpy_rank_promotion="raise" (the suite's strict configuration)."""
    return jnp.reshape(a, (1,) * k + tuple(a.shape))


def _skip(y, x, D):
    """y + D x (the skip connection), float32; D (e,) broadcast over x's leading axes."""
    x = jnp.asarray(x, _F32)
    return y if D is None else y + _lead(jnp.asarray(D, _F32), x.ndim - 1) * x


def _readout(h, C, x, D):
    """y = sum_n C h (+ D x), float32; h (... e n), C (... n), x (... e)."""
    return _skip(jnp.einsum("...en,...n->...e", h, jnp.asarray(C, _F32)), x, D)


def _combine(left, right):
    """Two consecutive spans (earlier, later) as one: decays multiply, the earlier input decays."""
    a1, u1 = left
    a2, u2 = right
    return a1 * a2, a2 * u1 + u2


def _associative_states(decay, inp, h0):
    """Every state h_t of a span (axis 1), from h0 folded into the first position's input."""
    inp = inp.at[:, 0].add(decay[:, 0] * h0)
    return jax.lax.associative_scan(_combine, (decay, inp), axis=1)[1]


def selective_step(state, x, dt, A, B, C, D=None):
    """One decode step: state (b, e, n), x, dt (b, e), A (e, n), B, C (b, n), D (e,) or None.
    Returns (y (b, e) float32, new_state (b, e, n) float32)."""
    _validate(x, dt, A, B, C, D, state, step=True)
    decay, inp = _discretize(x, dt, A, B)
    h = decay * jnp.asarray(state, _F32) + inp
    return _readout(h, C, x, D), h


def _sequential(x, dt, A, B, C, h0):
    def step(h, xs):
        y, h = selective_step(h, *xs[:2], A, *xs[2:])
        return h, y

    time_first = [jnp.moveaxis(a, 1, 0) for a in (x, dt, B, C)]
    last, ys = jax.lax.scan(step, h0, time_first)
    return jnp.moveaxis(ys, 0, 1), last


def _associative(x, dt, A, B, C, h0):
    decay, inp = _discretize(x, dt, A, B)  # b l e n
    h = _associative_states(decay, inp, h0)
    return _readout(h, C, x, None), h[:, -1]


def _chunked(x, dt, A, B, C, h0, chunk):
    b, l, e = x.shape
    q = min(chunk, l)
    c = math.ceil(l / q)

    def chunks(a):  # b l ... -> c b q ...: padded with zeros (dt = 0: no decay, no input)
        a = jnp.pad(a, [(0, 0), (0, c * q - l)] + [(0, 0)] * (a.ndim - 2))
        return jnp.moveaxis(a.reshape(b, c, q, *a.shape[2:]), 1, 0)

    def one_chunk(h, xs):  # the (b, q, e, n) states exist only inside this body
        xc, dtc, Bc, Cc = xs
        decay, inp = _discretize(xc, dtc, A, Bc)
        hs = _associative_states(decay, inp, h)
        return hs[:, -1], _readout(hs, Cc, xc, None)

    last, ys = jax.lax.scan(one_chunk, h0, [chunks(jnp.asarray(a, _F32)) for a in (x, dt, B, C)])
    return jnp.moveaxis(ys, 0, 1).reshape(b, c * q, e)[:, :l], last


def selective_scan(x, dt, A, B, C, D=None, *, mode="associative", chunk=None, initial_state=None):
    """The selective scan over a whole sequence. x, dt (b, l, e), A (e, n), B, C (b, l, n),
    D (e,) or None, initial_state (b, e, n) or None (zeros). `mode`: "sequential", "associative"
    or "chunked" (the module docstring says why each exists); `chunk` (chunked only, default
    DEFAULT_CHUNK): positions per chunk, any l. Returns (y (b, l, e), last_state (b, e, n)), both
    float32."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if mode == "chunked":
        chunk = DEFAULT_CHUNK if chunk is None else chunk
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            raise ShapeError(f"chunk: expected an int >= 1, got {chunk!r}")
    _validate(x, dt, A, B, C, D, initial_state, step=False)
    b, _, e = x.shape
    h0 = (jnp.zeros((b, e, A.shape[1]), _F32) if initial_state is None
          else jnp.asarray(initial_state, _F32))
    if mode == "sequential":
        y, last = _sequential(x, dt, A, B, C, h0)
    elif mode == "associative":
        y, last = _associative(x, dt, A, B, C, h0)
    else:
        y, last = _chunked(x, dt, A, B, C, h0, chunk)
    return _skip(y, x, D), last


__all__ = ["DEFAULT_CHUNK", "MODES", "selective_scan", "selective_step"]
