"""The SSD layer's float64 oracle and float32 references in plain numpy: no torch, no jax.

The error budget (equiv.compare) judges a float32 result by how far it is from the float64 oracle,
relative to how far an independent float32 computation *of the same algorithm* is on the same
inputs. That second computation only has to be correct and to round the way float32 code of that
algorithm rounds; it does not have to come from the PyTorch model the port was translated from.
So when torch is absent these numpy versions stand in for the torch references:

- `oracle_fp64`: the sequential recurrence h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,
  y_t = C_t . h_t, token by token in float64. Independent of any chunking: the ground truth.
- `chunked_fp32`: transformers' `mamba2_chunk_scan` torch fallback algorithm, step for step, in
  float32: the same masked-cumsum segment sum, the same four pieces per chunk (the diagonal block,
  each chunk's own state, the inter-chunk recurrence as a decay matrix over chunk totals, the
  state-to-output term), the same padding and the same D skip. It is therefore the same float32
  computation, and errs by the same amount against the oracle, as the torch one; the test suite
  measures that (tests/test_ssd_numpy_references.py).
- `sequential_fp32`: the recurrence above in float32 (what torch's `ssd_oracle_fp64(dtype=float32)`
  computes, and what a decode step does token by token).

Keywords and layouts are equiv.mamba2.ssd's (x (b, l, h, p), dt (b, l, h), A (h,), B, C (b, l, g, n),
D (h,) or (h, p), z like x, dt_bias (h,), initial_states (b, h, p, n)); dt is discretised as the
kernels do: dt + dt_bias, softplus with torch's threshold 20 (identity above it), then the
dt_limit clamp only when it is not the default (0, inf). Every function returns numpy
(y, final_state), y alone with return_final_states=False.
"""

from __future__ import annotations

import numpy as np

import equiv

DEFAULT_DT_LIMIT = (0.0, float("inf"))  # equiv.mamba2.ssd's; not imported from there, so no jax is needed


def _cast(dtype, *arrays):
    return tuple(None if a is None else np.asarray(a).astype(dtype) for a in arrays)


def _exp(v):
    """e^v, correctly rounded to v's dtype: float32 arguments are evaluated in float64 and rounded
    once. numpy's own float32 exp errs by up to 2.2 ULP (0.46 on average over [-10, 0]), torch's
    vectorised one by at most 0.56 (0.25 on average); the recurrence compounds that difference
    step by step (up to 8x the RMS error after 60 steps), so the budget would no longer be what
    the torch reference errs by. Every other operation stays in float32."""
    return np.exp(v.astype(np.float64)).astype(v.dtype)


def _log1p(v):
    """log(1 + v), correctly rounded to v's dtype (as `_exp`)."""
    return np.log1p(v.astype(np.float64)).astype(v.dtype)


def _softplus(v):
    """torch's softplus (beta 1, threshold 20): the identity above 20, log(1 + e^v) otherwise."""
    return np.where(v > 20, v, _log1p(_exp(np.minimum(v, v.dtype.type(20)))))


def _discretize(dt, dt_bias, dt_softplus, dt_limit, clamp_always=False):
    """dt + dt_bias, softplus, clamp (only for a non-default limit unless clamp_always: transformers'
    chunk scan clamps always, which with the default limit only clips dt < 0)."""
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = _softplus(dt)
    limit = tuple(float(v) for v in dt_limit)
    if clamp_always or limit != DEFAULT_DT_LIMIT:
        dt = np.clip(dt, dt.dtype.type(limit[0]), dt.dtype.type(limit[1]))
    return dt


def _silu(v):
    with np.errstate(over="ignore"):  # exp(-v) overflows to inf for v << 0: v / inf = -0, right
        return v / (v.dtype.type(1) + _exp(-v))


def _skip_and_gate(y, x, D, z):
    """(y + D x) * silu(z): the D skip, then the z gating, both after the scan (the order of
    mamba_chunk_scan_combined)."""
    if D is not None:
        y = y + x * (D[:, None] if D.ndim == 1 else D)  # h p
    if z is not None:
        y = y * _silu(z)
    return y


def _result(y, state, return_final_states):
    return (y, state) if return_final_states else y


# ---------------------------------------------------------------------------------------------
# the sequential recurrence


def _sequential(dtype, x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus, dt_limit):
    x, dt, A, B, C, D, z, dt_bias, h0 = _cast(dtype, x, dt, A, B, C, D, z, dt_bias, initial_states)
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    r = h // g
    dt = _discretize(dt, dt_bias, dt_softplus, dt_limit)  # b l h
    decay = _exp(dt * A).reshape(b, l, g, r)[..., None, None]  # b l g r 1 1
    xdt = (x * dt[..., None]).reshape(b, l, g, r, p)
    state = np.zeros((b, g, r, p, n), dtype) if h0 is None else h0.reshape(b, g, r, p, n).copy()
    ys = []
    for t in range(l):
        state = decay[:, t] * state + np.einsum("bgrp,bgn->bgrpn", xdt[:, t], B[:, t])
        ys.append(np.einsum("bgrpn,bgn->bgrp", state, C[:, t]))
    y = np.stack(ys, axis=1).reshape(b, l, h, p)
    return _skip_and_gate(y, x, D, z), state.reshape(b, h, p, n)


def oracle_fp64(x, dt, A, B, C, chunk_size=None, D=None, z=None, dt_bias=None, initial_states=None,
                dt_softplus=False, dt_limit=DEFAULT_DT_LIMIT, return_final_states=True):
    """The ground truth: the sequential recurrence in float64 (chunk_size is accepted and ignored,
    so calls can share keywords with the chunked forms). Returns (y, final_state) in float64."""
    del chunk_size
    y, state = _sequential(np.float64, x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus,
                           dt_limit)
    return _result(y, state, return_final_states)


def sequential_fp32(x, dt, A, B, C, chunk_size=None, D=None, z=None, dt_bias=None,
                    initial_states=None, dt_softplus=False, dt_limit=DEFAULT_DT_LIMIT,
                    return_final_states=True):
    """The same recurrence in float32: the reference of the scan form and of the decode step."""
    del chunk_size
    y, state = _sequential(np.float32, x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus,
                           dt_limit)
    return _result(y, state, return_final_states)


# ---------------------------------------------------------------------------------------------
# transformers' chunked algorithm, in float32


def _segment_sum(a):
    """out[..., i, j] = a[..., j+1] + ... + a[..., i] for i >= j, -inf above the diagonal: a
    cumulative sum down a grid holding a[k] at rows k > j (zeros elsewhere), then masked. The same
    construction as transformers' `segment_sum` (no difference of cumulative sums)."""
    q = a.shape[-1]
    grid = np.broadcast_to(a[..., :, None], (*a.shape, q))  # ... k j: a[k]
    strictly_below = np.tril(np.ones((q, q), bool), -1)
    sums = np.cumsum(np.where(strictly_below, grid, a.dtype.type(0)), axis=-2)
    return np.where(np.tril(np.ones((q, q), bool)), sums, a.dtype.type(-np.inf))


def chunked_fp32(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                 dt_softplus=False, dt_limit=DEFAULT_DT_LIMIT, return_final_states=True):
    """transformers' `mamba2_chunk_scan` (its torch fallback) in numpy float32, plus the z gating
    and a (h, p) D outside it, as equiv_reference.mamba2.ssd_oracles.transformers_chunk_scan applies them.

    As there, the sequence is zero-padded to a multiple of chunk_size (even when chunk_size > l),
    dt is clamped to dt_limit always, a (h,) D skip is added inside, and each chunk's own end state
    uses exp(total - cumsum), the one cumulative-sum difference of that algorithm."""
    f32 = np.float32
    x, dt, A, B, C, D, z, dt_bias, h0 = _cast(f32, x, dt, A, B, C, D, z, dt_bias, initial_states)
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    q = int(chunk_size)
    dt = _discretize(dt, dt_bias, dt_softplus, dt_limit, clamp_always=True)  # b l h
    Bh, Ch = np.repeat(B, h // g, axis=2), np.repeat(C, h // g, axis=2)  # b l h n: head j, group j // r
    pad = -l % q
    c = (l + pad) // q

    def chunks(a):  # b l ... -> b c q ...   (zeros after position l)
        a = np.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        return a.reshape(b, c, q, *a.shape[2:])

    skip = None if D is None or D.ndim != 1 else D[:, None] * np.pad(x, [(0, 0), (0, pad), (0, 0), (0, 0)])
    X = chunks(x * dt[..., None])  # b c q h p
    dA = np.transpose(chunks(A * dt), (0, 3, 1, 2))  # b h c q
    Bc, Cc = chunks(Bh), chunks(Ch)  # b c q h n
    cum = np.cumsum(dA, axis=-1)  # b h c q

    # 1. inside each chunk: the masked quadratic form (C_i . B_j) exp(segsum) (x dt)_j
    decay = _exp(_segment_sum(dA))  # b h c i j
    scores = np.einsum("bcihn,bcjhn->bcijh", Cc, Bc) * np.transpose(decay, (0, 2, 3, 4, 1))
    y_diag = np.einsum("bcijh,bcjhp->bcihp", scores, X)

    # 2. each chunk's own contribution to its end state (its inputs, decayed to the chunk end)
    to_end = _exp(cum[..., -1:] - cum)  # b h c q
    own = np.einsum("bcjhn,bcjhp->bchpn", Bc * np.transpose(to_end, (0, 2, 3, 1))[..., None], X)

    # 3. between chunks: the state entering chunk i is sum_z exp(segsum of chunk totals)[i, z]
    #    times the contribution of z, where z = 0 is the initial state
    first = np.zeros_like(own[:, :1]) if h0 is None else h0[:, None]
    own = np.concatenate([first, own], axis=1)  # b (c+1) h p n
    totals = np.pad(cum[..., -1], [(0, 0), (0, 0), (1, 0)])  # b h (c+1)
    between = np.transpose(_exp(_segment_sum(totals)), (0, 3, 2, 1))  # b z i h
    entering = np.einsum("bzih,bzhpn->bihpn", between, own)
    entering, final = entering[:, :-1], entering[:, -1]

    # 4. the state entering each chunk, read out at each position and decayed to it
    y_off = (np.einsum("bcihn,bchpn->bcihp", Cc, entering)
             * np.transpose(_exp(cum), (0, 2, 3, 1))[..., None])
    y = (y_diag + y_off).reshape(b, c * q, h, p)
    if skip is not None:
        y = y + skip
    y = _skip_and_gate(y[:, :l], x, D if D is not None and D.ndim == 2 else None, z)
    return _result(y, final, return_final_states)


# ---------------------------------------------------------------------------------------------
# the references object of equiv.mamba2.ssd_harness (SSDReferences)


class NumpySSDReferences:
    """The budget's references without torch: the float64 oracle and the float32 counterpart of
    each equiv.mamba2.ssd form (chunked -> `chunked_fp32` at the same chunk size; quadratic -> the same at
    one chunk of the whole length, whose diagonal block is the quadratic form; scan and step ->
    `sequential_fp32`)."""

    name = "numpy"

    def oracle(self, kw: dict) -> tuple[np.ndarray, np.ndarray]:
        return oracle_fp64(**kw)

    def reference(self, form: str, kw: dict, chunk_size: int | None = None):
        if form == "chunked":
            return chunked_fp32(**kw, chunk_size=chunk_size)
        if form == "quadratic":
            return chunked_fp32(**kw, chunk_size=kw["x"].shape[1])
        if form in ("scan", "step"):
            return sequential_fp32(**kw)
        raise ValueError(f"form: expected chunked, quadratic, scan or step, got {form!r}")

    def provenance(self) -> dict:
        return {
            "name": self.name,
            "oracle": "equiv.mamba2.ssd_numpy.oracle_fp64 (sequential recurrence, float64)",
            "chunked": "equiv.mamba2.ssd_numpy.chunked_fp32 (transformers' mamba2_chunk_scan algorithm, "
                       "numpy float32)",
            "sequential": "equiv.mamba2.ssd_numpy.sequential_fp32 (sequential recurrence, float32)",
            "numpy": np.__version__,
            "equiv": equiv.__version__,
        }

    def __repr__(self) -> str:
        return "NumpySSDReferences()"


__all__ = ["DEFAULT_DT_LIMIT", "NumpySSDReferences", "chunked_fp32", "oracle_fp64", "sequential_fp32"]
