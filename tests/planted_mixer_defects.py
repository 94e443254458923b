"""Planted defects in the mixer's prefill ops (B/C expansion, gated norm, dt clamp, padding mask,
softplus, the sign of A, conv causality): each flagged by the layer-wise diff at its op. "Row N" is
porting bug #N of docs/porting-bugs.md."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from equiv.mamba2 import model as m
from equiv.mamba2 import ssd
from tests.planting import Defect

f32 = jnp.float32

# the correct functions, captured at import (a broken one calls these, never the swapped attribute)
_mixer_conv, _mixer_in_proj, _gated_rms_norm = m.mixer_conv, m.mixer_in_proj, m.gated_rms_norm
_ssd_args, _ssd_chunked = m._ssd_args, ssd.ssd_chunked


def mixer_ssm_tiled_bc(cfg, lp, zxbcdt, conv_out, ssm_state, chunk_size):
    """Row 1: B/C expanded to heads with jnp.tile, so head j reads group j % g (not j // (h/g))."""
    b, l, _ = conv_out.shape
    g, n, h, p = cfg.n_groups, cfg.d_state, cfg.n_heads, cfg.head_dim
    dt = zxbcdt[..., cfg.d_inner + cfg.conv_dim:]
    x, B, C = m._split(conv_out, (cfg.d_inner, g * n, g * n))
    tile = lambda a: jnp.tile(a.reshape(b, l, g, n), (1, 1, h // g, 1))  # noqa: E731  b l h n
    y, final = ssd.ssd_chunked(x.reshape(b, l, h, p), dt, -jnp.exp(lp["A_log"].astype(f32)), tile(B), tile(C),
                               chunk_size, initial_states=ssm_state, return_final_states=True,
                               **m._ssd_args(cfg, lp))
    return y.reshape(b, l, h * p), final


def gated_norm_over_d_inner(y, z, w, eps, n_groups, spans=None):
    """Row 2: one RMS over the whole d_inner (as if g = 1)."""
    return _gated_rms_norm(y, z, w, eps, 1)


def gated_norm_before_gate(y, z, w, eps, n_groups, spans=None):
    """Row 3: normalise y per group first, then multiply by silu(z) (norm_before_gate=True)."""
    yf = y.astype(f32)
    *lead, e = yf.shape
    grouped = yf.reshape(*lead, n_groups, e // n_groups)
    grouped = grouped * jax.lax.rsqrt(jnp.mean(grouped * grouped, axis=-1, keepdims=True) + eps)
    out = grouped.reshape(*lead, e) * jax.nn.silu(z.astype(f32))
    return jnp.broadcast_to(w, y.shape) * out.astype(y.dtype)


def ssd_chunked_without_dt_limit(*args, dt_limit=None, **kwargs):
    """Row 4: the prefill path forgets time_step_limit."""
    return _ssd_chunked(*args, **kwargs)


def ssd_chunked_dt_limit_upper_only(*args, dt_limit=ssd.DEFAULT_DT_LIMIT, **kwargs):
    """Row 4: wrong bounds, (0, hi) instead of (lo, hi): the lower clamp is lost."""
    return _ssd_chunked(*args, dt_limit=(0.0, dt_limit[1]), **kwargs)


def mixer_in_proj_unmasked(cfg, lp, normed, mask):
    """Row 6: padded positions are not zeroed before in_proj."""
    return _mixer_in_proj(cfg, lp, normed, None)


def mixer_conv_unmasked(cfg, lp, zxbcdt, mask, conv_state):
    """Row 6: padded positions are not zeroed after the conv (they feed the SSM state)."""
    return _mixer_conv(cfg, lp, zxbcdt, None, conv_state)


def ssd_args_without_softplus(cfg, lp):
    """Extra: dt used raw, softplus forgotten."""
    return _ssd_args(cfg, lp) | {"dt_softplus": False}


def ssd_chunked_positive_a(x, dt, A, *args, **kwargs):
    """Extra: A = +exp(A_log) (the minus sign lost): the state grows instead of decaying."""
    return _ssd_chunked(x, dt, -A, *args, **kwargs)


def causal_conv_centered(xBC, w, b, conv_state):
    """Extra: 'same' padding instead of causal: position t sees inputs t+1 and t+2."""
    k, l = w.shape[0], xBC.shape[1]
    left = (k - 1) // 2
    window = jnp.pad(xBC, [(0, 0), (left, k - 1 - left), (0, 0)])
    out = sum(window[:, j:j + l] * jnp.broadcast_to(w[j], xBC.shape) for j in range(k))
    if b is not None:
        out = out + jnp.broadcast_to(b, out.shape)
    return jax.nn.silu(out), jnp.concatenate([conv_state.astype(xBC.dtype), xBC], axis=1)[:, l:]


MIXER_DEFECTS = (
    Defect("tiled_bc", "1", ((m, "mixer_ssm", mixer_ssm_tiled_bc),), "B/C expanded with tile"),
    Defect("gated_norm_over_d_inner", "2", ((m, "gated_rms_norm", gated_norm_over_d_inner),),
           "gated RMSNorm over d_inner, not per group"),
    Defect("norm_before_gate", "3", ((m, "gated_rms_norm", gated_norm_before_gate),), "norm before gate"),
    Defect("dt_limit_skipped_in_prefill", "4", ((m, "ssd_chunked", ssd_chunked_without_dt_limit),),
           "dt clamp skipped in prefill"),
    Defect("dt_limit_upper_only", "4", ((m, "ssd_chunked", ssd_chunked_dt_limit_upper_only),),
           "dt clamp with the wrong bounds (0, hi)"),
    Defect("padding_unmasked_before_in_proj", "6", ((m, "mixer_in_proj", mixer_in_proj_unmasked),),
           "left padding not masked before in_proj"),
    Defect("padding_unmasked_after_conv", "6", ((m, "mixer_conv", mixer_conv_unmasked),),
           "left padding not masked after the conv"),
    Defect("softplus_missing", "", ((m, "_ssd_args", ssd_args_without_softplus),), "dt softplus missing"),
    Defect("a_positive", "", ((m, "ssd_chunked", ssd_chunked_positive_a),), "A = +exp(A_log)"),
    Defect("conv_not_causal", "", ((m, "causal_conv", causal_conv_centered),), "conv with 'same' padding"),
)
