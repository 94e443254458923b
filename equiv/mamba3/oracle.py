"""Mamba-3 from its equations, in plain numpy: the project's own float64 oracle (and, run in
float32, the independent float32 computation the error budget measures a port against).

No JAX, no torch, no mamba_ssm code: written from the math of mamba_ssm 2.3.2.post1's `Mamba3`
(modules/mamba3.py and its kernels' documented semantics), as a sequential recurrence, one position
at a time, each step commented with its equation. It is the clearest form, not a fast one.

One SSM head (h), positions t, state H_t (p x n; mamba_ssm's (headdim, d_state) layout), ranks r
(R = 1 without MIMO):

    dt_t    = softplus(dd_dt_t + dt_bias)                     the step
    A_t     = min(-softplus(dd_A_t), -A_floor)                data-dependent decay rate, floored
    lam_t   = sigmoid(trap_t)                                 the trapezoid's mix
    theta_t = theta_{t-1} + pi tanh(angle_t) dt_t             cumulative rotary angle (per pair)
    k_t,r   = R(theta_t) (B_norm(B_t,r) + B_bias_r)           rotated key (B), per rank
    q_t,r   = R(theta_t) (C_norm(C_t,r) + C_bias_r)           rotated query (C)
    x_t,r   = x_t * mimo_x_r                                  (x_t itself without MIMO)
    alpha_t = exp(A_t dt_t)
    beta_t  = (1 - lam_t) dt_t alpha_t                        the trapezoid's previous-position term
    gamma_t = lam_t dt_t                                      its current-position term
    H_t     = alpha_t H_{t-1} + beta_t sum_r x_{t-1,r} k_{t-1,r}^T + gamma_t sum_r x_t,r k_t,r^T
    y_t,r   = H_t q_t,r + D x_t,r                             read-out after the update

R(theta) rotates component pairs by the pair's angle: (2i, 2i+1) without MIMO, (i, i + n/2) with
it, for i < num_rope_angles; the remaining components pass through. Before the first position
x_{-1} = 0 (or the carried state). The gate: y * silu(z), or RMSNorm_group(y) * w * silu(z) when
is_outproj_norm; with MIMO per rank with z * mimo_z_r, then sum_r mimo_o_r * (...).

Every function takes `dtype`: np.float64 is the oracle, np.float32 the float32 reference
(everything rounded to float32 at every operation, in the same order).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from equiv.mamba3.config import Mamba3Config
from equiv.mamba3.taps import tap_names

PI = np.pi


class State(NamedTuple):
    """One layer's recurrent state after a position (numpy, the computation's dtype).

    angle (b, h, a): theta of the last position.   ssm (b, h, p, n): H of the last position.
    k (b, R, h, n): the last position's rotated B.   v (b, h, p): the last position's x."""

    angle: np.ndarray
    ssm: np.ndarray
    k: np.ndarray
    v: np.ndarray


def zero_state(b: int, h: int, p: int, n: int, a: int, rank: int, dtype=np.float64) -> State:
    return State(np.zeros((b, h, a), dtype), np.zeros((b, h, p, n), dtype), np.zeros((b, rank, h, n), dtype),
                 np.zeros((b, h, p), dtype))


# ---------------------------------------------------------------------------------------------
# elementwise maths, exact in float64


def softplus(x):
    return np.logaddexp(np.zeros((), x.dtype), x)  # log(1 + e^x), without overflow


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def silu(x):
    return x * sigmoid(x)


def rms_norm(x, w, eps, group: int | None = None):
    """x / sqrt(mean(x^2) + eps) * w over the last axis (over groups of `group` when given)."""
    shape = x.shape
    if group is not None:
        x = x.reshape(*shape[:-1], shape[-1] // group, group)
    out = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + x.dtype.type(eps))
    return out.reshape(shape) * w


def rotate(v, theta, pairwise: bool):
    """R(theta) v: v (..., n), theta (..., a) (broadcasting over v's leading axes). Pairs (2i, 2i+1)
    when `pairwise`, else (i, i + n/2); i < a; the other components pass through."""
    a, n = theta.shape[-1], v.shape[-1]
    i0 = np.arange(a) * 2 if pairwise else np.arange(a)
    i1 = i0 + 1 if pairwise else i0 + n // 2
    cos, sin = np.cos(theta), np.sin(theta)
    v0, v1 = v[..., i0], v[..., i1]
    out = v.copy()
    out[..., i0] = v0 * cos - v1 * sin  # [v0'; v1'] = [[cos, -sin], [sin, cos]] [v0; v1]
    out[..., i1] = v0 * sin + v1 * cos
    return out


# ---------------------------------------------------------------------------------------------
# one layer's SSM, given its inputs (validated on its own by the duality properties)


def ssm(x, dt, A, trap, B, C, angle, D, mimo_x=None, state: State | None = None, *, pairwise: bool = True,
        dtype=np.float64):
    """The Mamba-3 SSM over a sequence, sequentially.

    x (b, l, h, p), dt, A, trap (b, l, h) (trap after its sigmoid: lambda), B, C (b, l, R, h, n)
    (normed, biased, not yet rotated), angle (b, l, a) (raw: tanh is taken here), D (h,),
    mimo_x (h, R, p) or None (R must then be 1), `state` the previous span's State or None (zeros).
    Returns (y (b, l, R, h, p), final State, theta (b, l, h, a)) in `dtype`."""
    x, dt, A, trap, B, C, angle, D = (np.asarray(v).astype(dtype) for v in (x, dt, A, trap, B, C, angle, D))
    b, l, h, p = x.shape
    rank, n, a = B.shape[2], B.shape[-1], angle.shape[-1]
    up = (np.ones((rank, h, p), dtype) if mimo_x is None  # (h, R, p) -> (R, h, p)
          else np.asarray(mimo_x).astype(dtype).transpose(1, 0, 2))
    st = zero_state(b, h, p, n, a, rank, dtype) if state is None else State(*(s.astype(dtype) for s in state))
    theta, H, k_prev, x_prev = st.angle.copy(), st.ssm.copy(), st.k.copy(), st.v.copy()
    pi = dtype(PI)
    ys, thetas = np.empty((b, l, rank, h, p), dtype), np.empty((b, l, h, a), dtype)
    for t in range(l):
        # theta_t = theta_{t-1} + pi tanh(angle_t) dt_t  (the angle shared by the heads, dt per head)
        theta = theta + pi * np.tanh(angle[:, t])[:, None, :] * dt[:, t, :, None]
        thetas[:, t] = theta
        # k_t = R(theta_t) B_t,  q_t = R(theta_t) C_t  (rotate before use, with this position's angle)
        k = rotate(B[:, t], theta[:, None], pairwise)  # b R h n
        q = rotate(C[:, t], theta[:, None], pairwise)
        # x_t,r = x_t * mimo_x_r ; x_{t-1},r likewise
        xr, xr_prev = x[:, t, None] * up, x_prev[:, None] * up  # b R h p
        # alpha_t = exp(A_t dt_t), beta_t = (1 - lam_t) dt_t alpha_t, gamma_t = lam_t dt_t
        alpha = np.exp(A[:, t] * dt[:, t])  # b h
        beta = (1 - trap[:, t]) * dt[:, t] * alpha
        gamma = trap[:, t] * dt[:, t]
        # H_t = alpha_t H_{t-1} + beta_t sum_r x_{t-1,r} k_{t-1,r}^T + gamma_t sum_r x_t,r k_t,r^T
        H = (alpha[..., None, None] * H
             + beta[..., None, None] * np.einsum("brhp,brhn->bhpn", xr_prev, k_prev)
             + gamma[..., None, None] * np.einsum("brhp,brhn->bhpn", xr, k))
        # y_t,r = H_t q_t,r + D x_t,r  (the read-out after the update)
        ys[:, t] = np.einsum("bhpn,brhn->brhp", H, q) + D[:, None] * xr
        # what the trapezoid needs of this position at the next one
        k_prev, x_prev = k, x[:, t]
    return ys, State(theta, H, k_prev, x_prev), thetas


# ---------------------------------------------------------------------------------------------
# the language model


def _heads(cfg: Mamba3Config, v):
    """(b, l, R, g, n) -> (b, l, R, h, n): head j reads group j // (h / g), as the kernels' GQA."""
    return np.repeat(v, cfg.nheads // cfg.ngroups, axis=3)


def mixer(cfg: Mamba3Config, lp: dict, normed, mask=None, state: State | None = None, dtype=np.float64):
    """One Mamba3 mixer from its (normed) input (b, l, d). `lp` holds the checkpoint-layout tensors
    (equiv.mamba3.convert.map_tensors). Padded positions (mask 0) are zeroed at in_proj's input, so
    they add nothing: x = 0 and angle = 0 there. Returns ({sub-tap: array}, out (b, l, d), State)."""
    f = dtype
    e, h, p, rank, g, n = cfg.d_inner, cfg.nheads, cfg.headdim, cfg.rank, cfg.ngroups, cfg.d_state
    u = normed.astype(f) if mask is None else normed.astype(f) * np.asarray(mask, f)[..., None]
    proj = u @ lp["in_proj"].astype(f).T  # z | x | B | C | dd_dt | dd_A | trap | angle
    z, x, B, C, dd_dt, dd_A, trap_raw, angle = np.split(proj, np.cumsum(cfg.in_proj_splits)[:-1], axis=-1)
    bl = proj.shape[:2]
    x, z = x.reshape(*bl, h, p), z.reshape(*bl, h, p)
    dt = softplus(dd_dt + lp["dt_bias"].astype(f))  # dt = softplus(dd_dt + dt_bias)
    A = np.minimum(-softplus(dd_A), f(-cfg.A_floor))  # A = min(-softplus(dd_A), -A_floor)
    trap = sigmoid(trap_raw)  # lambda
    Bh = _heads(cfg, rms_norm(B.reshape(*bl, rank, g, n), lp["B_norm"].astype(f), 1e-5))
    Ch = _heads(cfg, rms_norm(C.reshape(*bl, rank, g, n), lp["C_norm"].astype(f), 1e-5))
    Bh = Bh + lp["B_bias"].astype(f).transpose(1, 0, 2)  # (h, R, n) -> (R, h, n)
    Ch = Ch + lp["C_bias"].astype(f).transpose(1, 0, 2)
    mimo = {k: lp[k].astype(f) for k in ("mimo_x", "mimo_z", "mimo_o")} if cfg.is_mimo else None
    mimo_x = None if mimo is None else mimo["mimo_x"]
    y, new_state, theta = ssm(x, dt, A, trap, Bh, Ch, angle, lp["D"], mimo_x, state,
                              pairwise=cfg.rotate_pairwise, dtype=f)
    # the gate, per rank: z_r = z * mimo_z_r (z without MIMO)
    zr = z[:, :, None] if mimo is None else z[:, :, None] * mimo["mimo_z"].transpose(1, 0, 2)
    if cfg.is_outproj_norm:  # RMSNorm over each head's p channels, times w, times silu(z_r)
        w = lp["out_norm"].astype(f).reshape(h, p)
        gated = rms_norm(y, w, 1e-5, group=None) * silu(zr)
    else:
        gated = y * silu(zr)
    # MIMO folds the ranks back: sum_r mimo_o_r * gated_r
    folded = gated[:, :, 0] if mimo is None else np.einsum("blrhp,hrp->blhp", gated, mimo["mimo_o"])
    gate = folded.reshape(*bl, e)
    out = gate @ lp["out_proj"].astype(f).T
    taps = {"mixer.in_proj": proj, "mixer.dt": dt, "mixer.A": A, "mixer.trap": trap, "mixer.angles": theta,
            "mixer.B": Bh, "mixer.C": Ch, "mixer.ssm": y.reshape(*bl, rank, e), "mixer.gate": gate,
            "mixer.out_proj": out}
    return taps, out, new_state


def forward(cfg: Mamba3Config, params: dict, ids, mask=None, states: list[State] | None = None,
            dtype=np.float64) -> tuple[dict, list[State]]:
    """The whole LM: ids (b, l) -> ({every canonical tap: array in `dtype`}, per-layer States),
    continuing from `states` when given. Pre-norm residual blocks, hidden = residual +
    mixer(RMSNorm(residual)); the residual in `dtype` throughout (the oracle has no float32 cast
    to model)."""
    f = dtype
    ids = np.asarray(ids)
    emb = params["embed"].astype(f)
    hidden = emb[ids]
    taps, new_states = {"embed": hidden}, []
    for i, lp in enumerate(params["layers"]):
        normed = rms_norm(hidden, lp["norm"].astype(f), cfg.norm_eps)
        sub, out, st = mixer(cfg, lp, normed, mask, None if states is None else states[i], f)
        hidden = hidden + out
        taps |= {f"layers.{i}.norm": normed} | {f"layers.{i}.{k}": v for k, v in sub.items()}
        taps[f"layers.{i}"] = hidden
        new_states.append(st)
    normed = rms_norm(hidden, params["norm_f"].astype(f), cfg.norm_eps)
    head = emb if cfg.tie_embeddings else params["lm_head"].astype(f)
    taps |= {"norm_f": normed, "logits": normed @ head.T}
    assert list(taps) == tap_names(cfg.n_layers)
    return taps, new_states


__all__ = ["State", "forward", "mixer", "rms_norm", "rotate", "sigmoid", "silu", "softplus", "ssm",
           "zero_state"]
