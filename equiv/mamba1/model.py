"""The Mamba-1 / Falcon-Mamba forward in pure JAX: params are a pytree of arrays
(equiv/mamba1/convert.py), layers a Python loop over per-layer dicts (unrolled under jit, as
equiv/mamba2's), the selective scan is equiv.mamba1.scan's (parallel: an associative scan).

Mirrors transformers' `MambaForCausalLM` / `FalconMambaForCausalLM` torch path op for op, including
where it casts, so that bfloat16 runs are comparable too:

- both paths: dt = dt_proj's matmul + its bias cast to the model dtype, the softplus in the model
  dtype; the state update in float32.
- prefill (`forward`, transformers' `mamba_selective_scan`): the read-out and D x in float32 (see
  `mixer_ssm` for the one difference), times silu(z) taken in the model dtype; the product cast
  to the model dtype for out_proj.
- decode (`decode_step`, transformers' `selective_state_update`): the read-out, D x and the gate
  in the model dtype.

Padding: `mask` (b, l) of 0/1, left-padded. Like transformers, padded positions are zeroed at
in_proj's input and at the conv's output; their x and B are then 0, so they add nothing to the
state, and (without an in_proj bias) a padded row equals the sequence alone.

Every function here is pure and jit-compatible; equiv/mamba1/port.py jits them and checks inputs.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from equiv.kblock import Rows, kblocks_dot, rows_dot
from equiv.mamba1.config import Mamba1Config
from equiv.mamba1.scan import selective_scan, selective_step

f32 = jnp.float32


class Cache(NamedTuple):
    """Decode state, stacked over layers: O(1) in the sequence length.

    conv: (L, b, k-1, e) the last k-1 conv inputs x (model dtype).
    ssm:  (L, b, e, n) the SSM state, always float32."""

    conv: jax.Array
    ssm: jax.Array


def empty_cache(cfg: Mamba1Config, batch: int, dtype) -> Cache:
    return Cache(jnp.zeros((cfg.n_layers, batch, cfg.conv_kernel - 1, cfg.d_inner), dtype),
                 jnp.zeros((cfg.n_layers, batch, cfg.d_inner, cfg.d_state), f32))


# ---------------------------------------------------------------------------------------------
# building blocks


def linear(x, w, b=None):
    """x @ w (+ b), accumulated in float32 and rounded once to the weight's dtype (torch's CPU
    addmm does the same for bfloat16). `w` is the (K, N) array; or `Rows`, the (N, K) weight
    (equiv/kblock.py says when the port stores which form): one dot over its last axis, the
    einsum's arguments otherwise; or a tuple of K-blocks from `split_k`: one dot per block, summed
    in order, because XLA:CPU's float32 dot accumulates long contractions less accurately than
    torch's (equiv/mamba2/model.py `linear` has the measurements); blocks of 256 come back to
    torch's error."""
    if isinstance(w, Rows):
        dtype = w.dtype
        y = rows_dot(x.astype(dtype), w.w, preferred_element_type=f32)
    else:
        dtype = (w[0] if isinstance(w, (tuple, list)) else w).dtype
        y = kblocks_dot(x.astype(dtype), w, preferred_element_type=f32)
    if b is not None:
        y = y + jnp.broadcast_to(b.astype(f32), y.shape)
    return y.astype(dtype)


def silu(x):
    """torch's F.silu: computed in float32, rounded once to x's dtype. Written x / (1 + exp(-x)):
    exp(-x) overflowing to inf gives -0.0, the limit."""
    xf = x.astype(f32)
    return (xf / (1.0 + jnp.exp(-xf))).astype(x.dtype)


def softplus(x):
    """torch's F.softplus (beta 1, threshold 20): x above 20, else log1p(exp(x)); computed in
    float32, rounded once to x's dtype."""
    xf = x.astype(f32)
    return jnp.where(xf > 20.0, xf, jnp.log1p(jnp.exp(jnp.minimum(xf, 20.0)))).astype(x.dtype)


def rms_norm(x, w, eps):
    """transformers `MambaRMSNorm`: normalise in float32, cast back to x's dtype, then scale by w
    (the product promotes, e.g. a bfloat16 weight on a float32 residual gives float32). w None is
    Falcon-Mamba's weightless mixer norm, which stops after the cast."""
    xf = x.astype(f32)
    normed = (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)
    return normed if w is None else jnp.broadcast_to(w, x.shape) * normed


def causal_conv(x, w, b, conv_state):
    """Depthwise causal conv1d (+ bias) + SiLU over x (b, l, e), continuing from `conv_state`
    (b, k-1, e) = the previous k-1 inputs (zeros at the start). Accumulated in float32, rounded to
    x's dtype before the SiLU, as torch's conv1d then ACT2FN. Returns (out (b, l, e), new state)."""
    k, l = w.shape[0], x.shape[1]
    window = jnp.concatenate([conv_state.astype(x.dtype), x], axis=1)  # b (k-1+l) e
    wf = w.astype(f32)
    out = sum(window[:, j:j + l].astype(f32) * jnp.broadcast_to(wf[j], x.shape) for j in range(k))
    if b is not None:
        out = out + jnp.broadcast_to(b.astype(f32), out.shape)
    return silu(out.astype(x.dtype)), window[:, l:]


def _masked(x, mask):
    """Zero padded positions, as transformers' `apply_mask_to_padding_states`."""
    return x if mask is None else x * jnp.broadcast_to(mask[..., None], x.shape).astype(x.dtype)


def _A(lp):
    return -jnp.exp(lp["A_log"].astype(f32))


# ---------------------------------------------------------------------------------------------
# the sub-ops of one block, separately callable (the isolated mode feeds each its own inputs)


def block_norm(cfg: Mamba1Config, lp, hidden):
    return rms_norm(hidden.astype(lp["norm"].dtype), lp["norm"], cfg.norm_eps)


def mixer_in_proj(cfg: Mamba1Config, lp, normed, mask):
    """-> x | z (..., 2e)."""
    return linear(_masked(normed, mask), lp["in_proj"], lp.get("in_proj_bias"))


def mixer_conv(cfg: Mamba1Config, lp, xz, mask, conv_state):
    """The conv of in_proj's x half, padded positions zeroed -> (out (b, l, e), new conv state)."""
    out, new_state = causal_conv(xz[..., :cfg.d_inner], lp["conv_w"], lp.get("conv_b"), conv_state)
    return _masked(out, mask), new_state


def mixer_x_proj(cfg: Mamba1Config, lp, conv_out):
    """-> (dt (..., r), B (..., n), C (..., n)); Falcon-Mamba normalises each (weightless RMS)."""
    r, n = cfg.dt_rank, cfg.d_state
    proj = linear(conv_out, lp["x_proj"])
    parts = proj[..., :r], proj[..., r:r + n], proj[..., r + n:]
    if cfg.mixer_rms_eps is not None:
        parts = tuple(rms_norm(p, None, cfg.mixer_rms_eps) for p in parts)
    return parts


def mixer_dt_proj(cfg: Mamba1Config, lp, dt_low):
    """dt_proj's matmul, then its bias cast to the model dtype and added there (transformers passes
    the bias as float32 `delta_bias` and the scan adds `delta_bias.to(dt.dtype)`): (..., e) in the
    model dtype, before the softplus."""
    proj = linear(dt_low, lp["dt_proj"])
    return proj + jnp.broadcast_to(lp["dt_bias"].astype(proj.dtype), proj.shape)


def mixer_ssm(cfg: Mamba1Config, lp, conv_out, dt_raw, B, C, ssm_state, mode: str = "associative",
              chunk: int | None = None):
    """The selective scan with D over a sequence, from `ssm_state` (b, e, n) -> (y (b, l, e) float32
    including D x, last state (b, e, n) float32). The softplus runs in dt_raw's dtype, as in the
    reference. One difference in bfloat16 only: transformers reads the state out as
    `state.to(bf16) @ C` in bfloat16, equiv.mamba1.scan reads it out in float32."""
    return selective_scan(conv_out, softplus(dt_raw), _A(lp), B, C, lp["D"], mode=mode, chunk=chunk,
                          initial_state=ssm_state)


def mixer_gate(cfg: Mamba1Config, xz, y):
    """y * silu(z), z's SiLU in the model dtype; the float32 product is cast to the model dtype,
    which is what out_proj receives."""
    z = xz[..., cfg.d_inner:]
    return (y * silu(z)).astype(z.dtype)


def mixer_out_proj(cfg: Mamba1Config, lp, gated):
    return linear(gated, lp["out_proj"], lp.get("out_proj_bias"))  # input cast to the model dtype


def block_residual(cfg: Mamba1Config, hidden, mixer_out):
    residual = hidden.astype(f32) if cfg.residual_in_fp32 else hidden
    return residual + mixer_out


# ---------------------------------------------------------------------------------------------
# whole model


def embed(params, ids):
    # mode="fill" with NaN: an out-of-range id poisons its logits instead of being clamped to the
    # last row silently (JAX's default for gathers), also inside jit where we cannot raise.
    return jnp.take(params["embed"], ids, axis=0, mode="fill", fill_value=jnp.nan)


def lm_logits(cfg: Mamba1Config, params, hidden_normed):
    """lm_head in the model dtype (transformers casts its input to the head's dtype)."""
    if cfg.tie_embeddings:  # contract with the (v, d) embedding as stored: no transposed copy
        emb = params["embed"]
        y = jnp.einsum("...d,vd->...v", hidden_normed.astype(emb.dtype), emb, preferred_element_type=f32)
        return y.astype(emb.dtype)
    return linear(hidden_normed, params["lm_head"])


def forward(params, cfg: Mamba1Config, ids, mask=None, cache: Cache | None = None, *, taps: bool = False,
            last_logits_only: bool = False, scan_mode: str = "associative", chunk: int | None = None):
    """ids (b, l) -> (logits, cache, taps).

    Continues from `cache` when given (the conv window and the SSM state carry over). logits are
    (b, l, v), or (b, v) for the last position only when `last_logits_only`. `taps` is {} unless
    taps=True; then it holds every canonical tap of equiv/mamba1/taps.py."""
    hidden = embed(params, ids)
    if cache is None:
        cache = empty_cache(cfg, ids.shape[0], params["embed"].dtype)
    conv_buf, ssm_buf, tap_dict = cache.conv, cache.ssm, {}
    if taps:
        tap_dict["embed"] = hidden
    for i, lp in enumerate(params["layers"]):
        normed = block_norm(cfg, lp, hidden)
        xz = mixer_in_proj(cfg, lp, normed, mask)
        conv_out, conv_state = mixer_conv(cfg, lp, xz, mask, cache.conv[i])
        dt_low, B, C = mixer_x_proj(cfg, lp, conv_out)
        dt_raw = mixer_dt_proj(cfg, lp, dt_low)
        y, ssm_state = mixer_ssm(cfg, lp, conv_out, dt_raw, B, C, cache.ssm[i], scan_mode, chunk)
        gated = mixer_gate(cfg, xz, y)
        out = mixer_out_proj(cfg, lp, gated)
        hidden = block_residual(cfg, hidden, out)
        conv_buf = conv_buf.at[i].set(conv_state)
        ssm_buf = ssm_buf.at[i].set(ssm_state)
        if taps:
            t = f"layers.{i}"
            tap_dict |= {f"{t}.norm": normed, f"{t}.mixer.in_proj": xz, f"{t}.mixer.conv": conv_out,
                         f"{t}.mixer.x_proj.dt": dt_low, f"{t}.mixer.x_proj.B": B, f"{t}.mixer.x_proj.C": C,
                         f"{t}.mixer.dt_proj": dt_raw, f"{t}.mixer.ssm": y, f"{t}.mixer.gate": gated,
                         f"{t}.mixer.out_proj": out, t: hidden}
    normed = rms_norm(hidden, params["norm_f"], cfg.norm_eps)
    logits = lm_logits(cfg, params, normed[:, -1] if last_logits_only else normed)
    if taps:
        tap_dict |= {"norm_f": normed, "logits": logits}
    return logits, Cache(conv_buf, ssm_buf), tap_dict


def _decode_ssm(lp, state, x, dt_raw, B, C):
    """One position of transformers' `selective_state_update`: the state update in float32, the
    read-out and D x in the model dtype (in float32, the prefill's arithmetic exactly).
    -> (y (b, e) in the model dtype, new state (b, e, n) float32)."""
    dtype, dt = x.dtype, softplus(dt_raw)
    if dtype == f32:
        return selective_step(state, x, dt, _A(lp), B, C, lp["D"])
    _, state = selective_step(state, x, dt, _A(lp), B, C)
    y = jnp.einsum("ben,bn->be", state.astype(dtype), C.astype(dtype), preferred_element_type=f32)
    return y.astype(dtype) + x * jnp.broadcast_to(lp["D"].astype(dtype), x.shape), state


def decode_step(params, cfg: Mamba1Config, cache: Cache, tokens):
    """One token per sequence, tokens (b,) -> (logits (b, v), cache). Constant work per token."""
    hidden = embed(params, tokens)  # b d
    convs, ssms = [], []
    for i, lp in enumerate(params["layers"]):
        normed = block_norm(cfg, lp, hidden)
        xz = linear(normed, lp["in_proj"], lp.get("in_proj_bias"))  # b 2e
        conv_out, conv_state = causal_conv(xz[:, None, :cfg.d_inner], lp["conv_w"], lp.get("conv_b"),
                                           cache.conv[i])
        x = conv_out[:, 0]
        dt_low, B, C = mixer_x_proj(cfg, lp, x)
        y, ssm_state = _decode_ssm(lp, cache.ssm[i], x, mixer_dt_proj(cfg, lp, dt_low), B, C)
        gated = mixer_gate(cfg, xz, y)  # y is already in the model dtype here, as the reference's
        out = linear(gated, lp["out_proj"], lp.get("out_proj_bias"))
        hidden = block_residual(cfg, hidden, out)
        convs.append(conv_state)
        ssms.append(ssm_state)
    logits = lm_logits(cfg, params, rms_norm(hidden, params["norm_f"], cfg.norm_eps))
    return logits, Cache(jnp.stack(convs), jnp.stack(ssms))
