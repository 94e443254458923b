"""Torch references and the float64 oracle for the SSD layer, in equiv.mamba2.ssd's layouts.

Every function takes numpy arrays (or None) with the keywords of `equiv.mamba2.ssd.ssd_chunked`

    x (b, l, h, p)   dt (b, l, h)   A (h,)   B, C (b, l, g, n)   D (h,) or (h, p)   z like x
    dt_bias (h,)     initial_states (b, h, p, n)

plus `dtype` (torch.float32 or torch.float64, the precision the reference computes in) and returns
numpy (y, final_state) in that dtype (y alone with return_final_states=False; the default is True,
unlike ssd_chunked's, since a reference is there to be compared in full). dt is discretised as
mamba_ssm's kernels do (`_chunk_cumsum_fwd`): dt + dt_bias, softplus (torch's threshold 20), then
the dt_limit clamp only when it is not the default (0, inf).

- `mamba_ssm_minimal`: mamba_ssm `ssd_minimal_discrete` (the paper's Listing 1), D and z outside.
- `mamba_ssm_step`: mamba_ssm `selective_state_update_ref`, one decode step, Mamba-2 tied layouts.
- `transformers_chunk_scan`: transformers' module-level `mamba2_chunk_scan` (its torch fallback).
- `ssd_oracle_fp64`: a plain sequential recurrence, independent of any chunking: the ground truth.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from equiv.mamba2.ssd import DEFAULT_DT_LIMIT
from equiv_reference.mamba_ssm_refs import load_mamba_ssm_refs

_DTYPES = (torch.float32, torch.float64)


def _tensor(a, dtype):
    return None if a is None else torch.as_tensor(np.asarray(a)).to(dtype)


def _numpy(t):
    return t.detach().cpu().numpy()


def _check_dtype(dtype):
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: expected torch.float32 or torch.float64, got {dtype}")


def _discretize(dt, dt_bias, dt_softplus, dt_limit):
    """dt -> softplus(dt + dt_bias) clamped, as mamba_ssm's `_chunk_cumsum_fwd` (clamp only when
    dt_limit is not the default) and equiv.mamba2.ssd.discretize_dt."""
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)  # threshold 20: identity above, as the Triton kernels
    if tuple(float(v) for v in dt_limit) != DEFAULT_DT_LIMIT:
        dt = torch.clamp(dt, min=dt_limit[0], max=dt_limit[1])
    return dt


def _result(y, final, return_final_states):
    """(y, final_state) as numpy; y alone when return_final_states is False (ssd_chunked's rule)."""
    return (_numpy(y), _numpy(final)) if return_final_states else _numpy(y)


def _skip_and_gate(y, x, D, z):
    """(y + D x) * silu(z): D skip then z gating, the order of `mamba_chunk_scan_combined`."""
    if D is not None:
        y = y + x * (D[:, None] if D.ndim == 1 else D)  # h p
    if z is not None:
        y = y * F.silu(z)
    return y


# ---------------------------------------------------------------------------------------------
# mamba_ssm


def mamba_ssm_minimal(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                      dt_softplus=False, dt_limit=DEFAULT_DT_LIMIT, return_final_states=True,
                      dtype=torch.float32):
    """mamba_ssm `ssd_minimal_discrete` in `dtype`, for any l. Returns (y, final_state).

    It takes X = x * dt and A * dt (already discretised) with B, C expanded to heads, and needs
    l % block_len == 0: the tail is padded with dt = 0 *after* discretisation (decay exp(0) = 1,
    input 0), so the padding neither decays nor feeds the state and the final state is the state
    after token l - 1."""
    _check_dtype(dtype)
    ssd_minimal_discrete = load_mamba_ssm_refs().ssd_minimal_discrete
    x, dt, A, B, C, D, z, dt_bias, h0 = (_tensor(a, dtype) for a in
                                         (x, dt, A, B, C, D, z, dt_bias, initial_states))
    b, l, h, p = x.shape
    r = h // B.shape[2]
    dt = _discretize(dt, dt_bias, dt_softplus, dt_limit)
    pad = -l % chunk_size

    def padded(a):  # b l ... -> b (l + pad) ...
        return F.pad(a, [0, 0] * (a.ndim - 2) + [0, pad])

    X = padded(x * dt[..., None])  # b l h p
    dA = padded(A * dt)  # b l h
    Bh = padded(B.repeat_interleave(r, dim=2))  # b l h n  (head j reads group j // r)
    Ch = padded(C.repeat_interleave(r, dim=2))
    y, final = ssd_minimal_discrete(X, dA, Bh, Ch, chunk_size,
                                    initial_states=None if h0 is None else h0[:, None])
    y = _skip_and_gate(y[:, :l], x, D, z)
    return _result(y, final, return_final_states)


def mamba_ssm_step(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                   dt_limit=DEFAULT_DT_LIMIT, dtype=torch.float32):
    """mamba_ssm `selective_state_update_ref`, one token: x (b, h, p), dt (b, h), B, C (b, g, n),
    state (b, h, p, n). Returns (y, new_state); the input state is not modified.

    Mamba-2 ties dt over p and A over (p, n); the reference takes them untied, so they are expanded
    the way transformers' `Mamba2Mixer` does for its recurrent branch. The reference has no
    dt_limit: a non-default limit is applied here, after bias and softplus (as the kernels do)."""
    _check_dtype(dtype)
    ref = load_mamba_ssm_refs().selective_state_update_ref
    state, x, dt, A, B, C, D, z, dt_bias = (_tensor(a, dtype) for a in
                                            (state, x, dt, A, B, C, D, z, dt_bias))
    b, h, p = x.shape
    n = B.shape[-1]
    if tuple(float(v) for v in dt_limit) != DEFAULT_DT_LIMIT:
        dt, dt_bias, dt_softplus = _discretize(dt, dt_bias, dt_softplus, dt_limit), None, False
    state = state.clone()  # the reference updates it in place
    y = ref(
        state, x,
        dt[:, :, None].expand(b, h, p),  # b h p
        A[:, None, None].expand(h, p, n),  # h p n
        B, C,
        D=None if D is None else (D[:, None].expand(h, p) if D.ndim == 1 else D),
        z=z,
        dt_bias=None if dt_bias is None else dt_bias[:, None].expand(h, p),
        dt_softplus=dt_softplus,
    )
    return _numpy(y), _numpy(state)


# ---------------------------------------------------------------------------------------------
# transformers


def transformers_chunk_scan_provenance() -> dict:
    """What `transformers_chunk_scan` runs: the torch body of transformers' `mamba2_chunk_scan`,
    found by equiv_reference.provenance (the `__wrapped__` protocol, else recompiled from the
    module's source), whatever implementation the dispatcher bound at import (`bound`)."""
    import transformers

    from equiv_reference.mamba2.dispatch import import_modeling_mamba2
    from equiv_reference.provenance import bound_implementation, torch_body

    mm = import_modeling_mamba2()
    _, how = torch_body(mm, "mamba2_chunk_scan")
    return {
        "function": "transformers.models.mamba2.modeling_mamba2.mamba2_chunk_scan",
        "transformers": transformers.__version__,
        "bound": bound_implementation(mm.mamba2_chunk_scan),
        "torch_body": how,
        "torch_fallback": True,
    }


def transformers_chunk_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None,
                            initial_states=None, dt_softplus=False, dt_limit=DEFAULT_DT_LIMIT,
                            return_final_states=True, dtype=torch.float32):
    """transformers' `mamba2_chunk_scan` torch fallback. Returns (y, final_state) in float32.

    Calls the torch body directly (`transformers_chunk_scan_provenance`), so a kernel the
    dispatcher may have bound never runs here.
    It has no z argument and its D skip supports only D (h,): z gating (and a (h, p) D) is applied
    outside, as `mamba_chunk_scan_combined` does. Only float32: the function casts its inputs with
    `.float()`, so a float64 call would silently compute in float32 (use `ssd_oracle_fp64`)."""
    if dtype != torch.float32:
        raise ValueError(f"dtype: transformers' mamba2_chunk_scan computes in float32 (it calls "
                         f".float() on its inputs); expected torch.float32, got {dtype}")
    from equiv_reference.mamba2.dispatch import import_modeling_mamba2
    from equiv_reference.provenance import torch_body

    chunk_scan, _ = torch_body(import_modeling_mamba2(), "mamba2_chunk_scan")
    x, dt, A, B, C, D, z, dt_bias, h0 = (_tensor(a, torch.float32) for a in
                                         (x, dt, A, B, C, D, z, dt_bias, initial_states))
    if tuple(float(v) for v in dt_limit) == DEFAULT_DT_LIMIT:
        dt_limit = DEFAULT_DT_LIMIT  # it clamps always; the default only clips dt < 0
    y, final = chunk_scan(
        x, dt, A, B, C, chunk_size, D=D if D is not None and D.ndim == 1 else None,
        dt_bias=dt_bias, initial_states=h0, dt_softplus=dt_softplus, dt_limit=dt_limit,
        return_final_states=True)
    y = _skip_and_gate(y, x, D if D is not None and D.ndim == 2 else None, z)
    return _result(y, final, return_final_states)


# ---------------------------------------------------------------------------------------------
# the oracle


def ssd_oracle_fp64(x, dt, A, B, C, chunk_size=None, D=None, z=None, dt_bias=None,
                    initial_states=None, dt_softplus=False, dt_limit=DEFAULT_DT_LIMIT,
                    return_final_states=True, dtype=torch.float64):
    """The ground truth: the recurrence h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t,
    token by token in `dtype` (float64 by default; float32 gives a sequential float32 reference).
    Independent of chunking (`chunk_size` is accepted and ignored, so calls can share keywords).
    Returns (y, final_state)."""
    _check_dtype(dtype)
    del chunk_size
    x, dt, A, B, C, D, z, dt_bias, h0 = (_tensor(a, dtype) for a in
                                         (x, dt, A, B, C, D, z, dt_bias, initial_states))
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    r = h // g
    dt = _discretize(dt, dt_bias, dt_softplus, dt_limit)  # b l h
    decay = torch.exp(dt * A)  # b l h
    Xdt = (x * dt[..., None]).view(b, l, g, r, p)  # b l g r p
    state = (torch.zeros(b, g, r, p, n, dtype=dtype) if h0 is None
             else h0.reshape(b, g, r, p, n).clone())
    dec = decay.view(b, l, g, r)[..., None, None]  # b l g r 1 1
    ys = []
    for t in range(l):
        state = dec[:, t] * state + torch.einsum("bgrp,bgn->bgrpn", Xdt[:, t], B[:, t])
        ys.append(torch.einsum("bgrpn,bgn->bgrp", state, C[:, t]))
    y = torch.stack(ys, dim=1).reshape(b, l, h, p)
    y = _skip_and_gate(y, x, D, z)
    return _result(y, state.reshape(b, h, p, n), return_final_states)


def ssd_oracle_step_fp64(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                         dt_limit=DEFAULT_DT_LIMIT, dtype=torch.float64):
    """One token of `ssd_oracle_fp64` in ssd_step's layouts (x (b, h, p), state (b, h, p, n))."""
    y, new_state = ssd_oracle_fp64(
        x[:, None], dt[:, None], A, B[:, None], C[:, None], D=D,
        z=None if z is None else z[:, None], dt_bias=dt_bias, initial_states=state,
        dt_softplus=dt_softplus, dt_limit=dt_limit, dtype=dtype)
    return y[:, 0], new_state


__all__ = [
    "mamba_ssm_minimal", "mamba_ssm_step", "transformers_chunk_scan",
    "transformers_chunk_scan_provenance", "ssd_oracle_fp64", "ssd_oracle_step_fp64",
]
