"""The Mamba-3 language model in pure JAX: params are a pytree of arrays (equiv/mamba3/convert.py),
layers a Python loop over per-layer dicts (unrolled under jit, as the other families'), the SSM is
equiv.mamba3.ssm's (chunked prefill, O(1) step).

Mirrors mamba_ssm 2.3.2.post1's `MambaLMHeadModel` with `Mamba3` blocks (docs/mamba3-layout.md)
op for op, including where it casts, so bfloat16 runs are comparable:

- block norms: mamba_ssm's RMSNorm in float32, the product with the weight rounded once to the
  model dtype; of the residual itself (float32 under residual_in_fp32) with fused_add_norm (its
  `MambaConfig` default), of the residual rounded to the model dtype without. The same for norm_f.
- in the mixer: in_proj in the model dtype; dt = softplus(dd_dt + dt_bias) and A in float32 (the
  float32 dt_bias promotes); lambda = sigmoid(trap) in float32; B_norm / C_norm in float32 rounded
  to the model dtype, then the float32 biases added; the SSM's state and accumulations in float32,
  its rotated q and scaled k rounded to the model dtype (equiv.mamba3.ssm); the gate in float32,
  rounded to the model dtype for out_proj (MIMO with is_outproj_norm: float32 until out_proj, as
  `Mamba3.forward` runs that norm on `y.float()`).

Not mirrored, on purpose: mamba_ssm's SISO wrapper casts q, k, x, trap, angle and z to bfloat16
even in a float32 model (`mamba3_siso_combined`), and its kernels use approximate tanh / sin / cos
(PTX `.approx`). This port computes a float32 model in float32: those are the reference's
roundings, not Mamba-3's.

Padding: `mask` (b, l) of 0/1, left-padded. Padded positions are zeroed at in_proj's input; their
x and angle are then 0, so they add nothing to the state and do not advance the rotary angle, and a
padded row equals the sequence alone.

Every function here is pure and jit-compatible; equiv/mamba3/port.py jits them and checks inputs.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from equiv.kblock import kblocks_dot
from equiv.mamba3.config import Mamba3Config
from equiv.mamba3.ssm import State, cumulative_angles, ssm_forward, ssm_step

f32 = jnp.float32
SUB_NORM_EPS = 1e-5  # B_norm, C_norm and the output norm: Mamba3.__init__'s eps

__all__ = ["Cache", "block_norm", "block_residual", "decode_step", "embed", "empty_cache", "final_norm",
           "forward", "linear", "lm_logits", "mixer_A", "mixer_B", "mixer_C", "mixer_angles", "mixer_dt",
           "mixer_gate", "mixer_in_proj", "mixer_out_proj", "mixer_ssm", "mixer_trap", "rms_norm", "split_k"]


class Cache(NamedTuple):
    """Decode state, stacked over layers (L): O(1) in the sequence length (equiv.mamba3.ssm.State).

    angle (L, b, h, a) float32: theta of the last position (unwrapped); angle_lo (L, b, h, a) its
    compensation (double-float32). ssm (L, b, h, p, n) float32. k (L, b, R, h, n) float32: the last
    position's rotated B. v (L, b, h, p): its x (model dtype)."""

    angle: jax.Array
    ssm: jax.Array
    k: jax.Array
    v: jax.Array
    angle_lo: jax.Array

    def layer(self, i: int) -> State:
        return State(self.angle[i], self.ssm[i], self.k[i], self.v[i], self.angle_lo[i])


def empty_cache(cfg: Mamba3Config, batch: int, dtype) -> Cache:
    L, b, h, p, n = cfg.n_layers, batch, cfg.nheads, cfg.headdim, cfg.d_state
    a = cfg.num_rope_angles
    return Cache(jnp.zeros((L, b, h, a), f32), jnp.zeros((L, b, h, p, n), f32),
                 jnp.zeros((L, b, cfg.rank, h, n), f32), jnp.zeros((L, b, h, p), dtype),
                 jnp.zeros((L, b, h, a), f32))


def stack_states(states: list[State]) -> Cache:
    return Cache(*(jnp.stack(parts) for parts in zip(*states)))


# ---------------------------------------------------------------------------------------------
# building blocks


MATMUL_K_BLOCK = 256


def split_k(w, block: int = MATMUL_K_BLOCK) -> tuple:
    """A (k, o) weight as a tuple of (<=block, o) row blocks, made once at load (see `linear`)."""
    return tuple(w[start:start + block] for start in range(0, w.shape[0], block))


def linear(x, w):
    """x @ w, accumulated in float32 and rounded once to the weight's dtype (torch's addmm does the
    same for bfloat16). `w` is an array or a tuple of K-blocks from `split_k`: one dot per block,
    summed in order, because XLA:CPU's float32 dot accumulates long contractions less accurately
    than torch's (equiv/mamba2/model.py `linear` has the measurements)."""
    dtype = (w[0] if isinstance(w, (tuple, list)) else w).dtype
    return kblocks_dot(x.astype(dtype), w, preferred_element_type=f32).astype(dtype)


def silu(x):
    """x sigmoid(x) in float32, rounded once to x's dtype; x / (1 + exp(-x)) gives -0.0 where
    exp(-x) overflows, the limit."""
    xf = x.astype(f32)
    return (xf / (1.0 + jnp.exp(-xf))).astype(x.dtype)


def softplus(x):
    """torch's F.softplus (beta 1, threshold 20): x above 20, else log1p(exp(x)); in float32,
    rounded once to x's dtype."""
    xf = x.astype(f32)
    return jnp.where(xf > 20.0, xf, jnp.log1p(jnp.exp(jnp.minimum(xf, 20.0)))).astype(x.dtype)


def rms_norm(x, w, eps):
    """mamba_ssm's RMSNorm (`rms_norm_ref`): x / sqrt(mean(x^2) + eps) * w in float32, rounded once
    to w's dtype (the model dtype), as its fused add + norm returns."""
    xf = x.astype(f32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (normed * jnp.broadcast_to(w.astype(f32), normed.shape)).astype(w.dtype)


def _masked(x, mask):
    return x if mask is None else x * jnp.broadcast_to(mask[..., None], x.shape).astype(x.dtype)


def split_in_proj(cfg: Mamba3Config, proj):
    """in_proj's output -> (z, x, B, C, dd_dt, dd_A, trap, angle), mamba_ssm's order."""
    start, parts = 0, []
    for width in cfg.in_proj_splits:
        parts.append(proj[..., start:start + width])
        start += width
    return tuple(parts)


def _heads(cfg: Mamba3Config, v):
    """v (..., R*g*n) laid out (r g n) -> (..., R, h, n): head j reads group j // (h / g)."""
    lead = v.shape[:-1]
    v = v.reshape(*lead, cfg.rank, cfg.ngroups, cfg.d_state)
    return jnp.repeat(v, cfg.nheads // cfg.ngroups, axis=-2)


def _bias(lp, name, like):
    """B_bias / C_bias (h, R, n) as (1.., R, h, n) against `like` (..., R, h, n)."""
    bias = jnp.swapaxes(lp[name].astype(f32), 0, 1)
    return jnp.broadcast_to(bias, like.shape)


# ---------------------------------------------------------------------------------------------
# the sub-ops of one block, separately callable (the isolated mode feeds each its own inputs)


def _norm_input(cfg: Mamba3Config, residual, w):
    """Unfused, mamba_ssm's Block rounds the residual to the norm weight's dtype first."""
    return residual if cfg.fused_add_norm else residual.astype(w.dtype)


def block_norm(cfg: Mamba3Config, lp, residual):
    return rms_norm(_norm_input(cfg, residual, lp["norm"]), lp["norm"], cfg.norm_eps)


def final_norm(cfg: Mamba3Config, params, residual):
    return rms_norm(_norm_input(cfg, residual, params["norm_f"]), params["norm_f"], cfg.norm_eps)


def mixer_in_proj(cfg: Mamba3Config, lp, normed, mask):
    """-> z | x | B | C | dd_dt | dd_A | trap | angle (..., in_proj_dim), model dtype."""
    return linear(_masked(normed, mask), lp["in_proj"])


def mixer_dt(cfg: Mamba3Config, lp, proj):
    """dt = softplus(dd_dt + dt_bias) in float32 (the float32 dt_bias promotes the sum)."""
    dd_dt = split_in_proj(cfg, proj)[4]
    return softplus(dd_dt.astype(f32) + jnp.broadcast_to(lp["dt_bias"].astype(f32), dd_dt.shape))


def mixer_A(cfg: Mamba3Config, lp, proj):
    """A = min(-softplus(dd_A), -A_floor) in float32."""
    dd_A = split_in_proj(cfg, proj)[5].astype(f32)
    return jnp.minimum(-softplus(dd_A), f32(-cfg.A_floor))


def mixer_trap(cfg: Mamba3Config, lp, proj):
    """lambda = sigmoid(trap) in float32."""
    return jax.nn.sigmoid(split_in_proj(cfg, proj)[6].astype(f32))


def _normed_biased(cfg, lp, raw, which):
    normed = rms_norm(_heads(cfg, raw), lp[f"{which}_norm"], SUB_NORM_EPS)  # model dtype
    return normed.astype(f32) + _bias(lp, f"{which}_bias", normed)


def mixer_B(cfg: Mamba3Config, lp, proj):
    """B_norm(B) + B_bias (..., R, h, n) float32, not rotated."""
    return _normed_biased(cfg, lp, split_in_proj(cfg, proj)[2], "B")


def mixer_C(cfg: Mamba3Config, lp, proj):
    """C_norm(C) + C_bias (..., R, h, n) float32, not rotated."""
    return _normed_biased(cfg, lp, split_in_proj(cfg, proj)[3], "C")


def mixer_angles(cfg: Mamba3Config, proj, dt, chunk: int | None = None):
    """The cumulative rotary angle (b, l, h, a) from in_proj's angle slice and dt, from 0."""
    angle = split_in_proj(cfg, proj)[7]
    zero = jnp.zeros((dt.shape[0], cfg.nheads, cfg.num_rope_angles), f32)
    l = angle.shape[1]
    return cumulative_angles(angle, dt, zero, zero, l if chunk is None or l % chunk else chunk)[0]


def _x(cfg: Mamba3Config, proj):
    x = split_in_proj(cfg, proj)[1]
    return x.reshape(*x.shape[:-1], cfg.nheads, cfg.headdim)


def mixer_ssm(cfg: Mamba3Config, lp, proj, dt, A, trap, B, C, state: State | None, mode: str = "chunked",
              chunk: int | None = None):
    """The SSM over a sequence from `state` -> (y (b, l, R, h, p) float32 including D x, State,
    theta (b, l, h, a))."""
    angle = split_in_proj(cfg, proj)[7]
    return ssm_forward(_x(cfg, proj), dt, A, trap, B, C, angle, lp["D"], lp.get("mimo_x"), state, mode=mode,
                       chunk=chunk or cfg.chunk_size, pairwise=cfg.rotate_pairwise)


def _fold(cfg: Mamba3Config, lp, gated):
    """(..., R, h, p) -> (..., h*p): MIMO sums the ranks weighted by mimo_o; SISO drops R = 1."""
    if not cfg.is_mimo:
        g = gated[..., 0, :, :]
    else:
        o = jnp.swapaxes(lp["mimo_o"].astype(f32), 0, 1)  # R h p
        g = jnp.einsum("...rhp,rhp->...hp", gated, o)
    return g.reshape(*g.shape[:-2], cfg.d_inner)


def mixer_gate(cfg: Mamba3Config, lp, proj, y):
    """What out_proj receives (..., e): per rank y_r * silu(z_r), or the gated RMSNorm
    norm(y_r) * w * silu(z_r) over each head's p channels when is_outproj_norm; z_r = z * mimo_z_r
    with MIMO (z without), folded by mimo_o. Rounded to the model dtype, except MIMO with
    is_outproj_norm, which stays float32 (mamba_ssm casts it only at out_proj)."""
    z = split_in_proj(cfg, proj)[0]
    dtype = z.dtype
    z = z.reshape(*z.shape[:-1], 1, cfg.nheads, cfg.headdim).astype(f32)
    if cfg.is_mimo:
        mz = jnp.swapaxes(lp["mimo_z"].astype(f32), 0, 1)
        z = z * jnp.broadcast_to(mz, (*z.shape[:-3], *mz.shape))
    y = y.astype(f32)
    if cfg.is_outproj_norm:
        if not cfg.is_mimo:  # the SISO kernel's output is in the model dtype before the norm
            y = y.astype(dtype).astype(f32)
        w = lp["out_norm"].astype(f32).reshape(cfg.nheads, cfg.headdim)
        normed = y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + SUB_NORM_EPS)
        gated = normed * jnp.broadcast_to(w, normed.shape) * silu(z)
        if not cfg.is_mimo:
            gated = gated.astype(dtype).astype(f32)
    else:
        gated = y * silu(z)
    out = _fold(cfg, lp, gated)
    return out if cfg.is_mimo and cfg.is_outproj_norm else out.astype(dtype)


def mixer_out_proj(cfg: Mamba3Config, lp, gate):
    return linear(gate, lp["out_proj"])  # input cast to the model dtype


def block_residual(cfg: Mamba3Config, residual, mixer_out):
    return residual + mixer_out.astype(residual.dtype)


# ---------------------------------------------------------------------------------------------
# whole model


def embed(params, ids):
    # mode="fill" with NaN: an out-of-range id poisons its logits instead of being clamped silently
    return jnp.take(params["embed"], ids, axis=0, mode="fill", fill_value=jnp.nan)


def lm_logits(cfg: Mamba3Config, params, hidden_normed):
    """lm_head in the model dtype."""
    if cfg.tie_embeddings:  # contract with the (v, d) embedding as stored: no transposed copy
        emb = params["embed"]
        y = jnp.einsum("...d,vd->...v", hidden_normed.astype(emb.dtype), emb, preferred_element_type=f32)
        return y.astype(emb.dtype)
    return linear(hidden_normed, params["lm_head"])


def _residual_stream(cfg: Mamba3Config, hidden):
    return hidden.astype(f32) if cfg.residual_in_fp32 else hidden


def forward(params, cfg: Mamba3Config, ids, mask=None, cache: Cache | None = None, *, taps: bool = False,
            last_logits_only: bool = False, mode: str = "chunked", chunk: int | None = None):
    """ids (b, l) -> (logits, cache, taps), continuing from `cache` when given. logits are (b, l, v),
    or (b, v) for the last position only when `last_logits_only`. `taps` is {} unless taps=True;
    then it holds every canonical tap of equiv/mamba3/taps.py."""
    hidden = embed(params, ids)
    residual = _residual_stream(cfg, hidden)
    tap_dict, states = ({"embed": hidden} if taps else {}), []
    for i, lp in enumerate(params["layers"]):
        st = None if cache is None else cache.layer(i)
        normed = block_norm(cfg, lp, residual)
        proj = mixer_in_proj(cfg, lp, normed, mask)
        dt, A, trap = mixer_dt(cfg, lp, proj), mixer_A(cfg, lp, proj), mixer_trap(cfg, lp, proj)
        B, C = mixer_B(cfg, lp, proj), mixer_C(cfg, lp, proj)
        y, new_state, theta = mixer_ssm(cfg, lp, proj, dt, A, trap, B, C, st, mode, chunk)
        gate = mixer_gate(cfg, lp, proj, y)
        out = mixer_out_proj(cfg, lp, gate)
        residual = block_residual(cfg, residual, out)
        states.append(new_state)
        if taps:
            t = f"layers.{i}"
            tap_dict |= {f"{t}.norm": normed, f"{t}.mixer.in_proj": proj, f"{t}.mixer.dt": dt,
                         f"{t}.mixer.A": A, f"{t}.mixer.trap": trap, f"{t}.mixer.angles": theta,
                         f"{t}.mixer.B": B, f"{t}.mixer.C": C,
                         f"{t}.mixer.ssm": y.reshape(*y.shape[:3], cfg.d_inner), f"{t}.mixer.gate": gate,
                         f"{t}.mixer.out_proj": out, t: residual}
    normed = final_norm(cfg, params, residual)
    logits = lm_logits(cfg, params, normed[:, -1] if last_logits_only else normed)
    if taps:
        tap_dict |= {"norm_f": normed, "logits": logits}
    return logits, stack_states(states), tap_dict


def decode_step(params, cfg: Mamba3Config, cache: Cache, tokens):
    """One token per sequence, tokens (b,) -> (logits (b, v), cache). Constant work per token."""
    residual = _residual_stream(cfg, embed(params, tokens))  # b d
    states = []
    for i, lp in enumerate(params["layers"]):
        normed = block_norm(cfg, lp, residual)
        proj = linear(normed, lp["in_proj"])  # b in_proj_dim
        dt, A, trap = mixer_dt(cfg, lp, proj), mixer_A(cfg, lp, proj), mixer_trap(cfg, lp, proj)
        B, C = mixer_B(cfg, lp, proj), mixer_C(cfg, lp, proj)
        angle = split_in_proj(cfg, proj)[7]
        y, new_state = ssm_step(cache.layer(i), _x(cfg, proj), dt, A, trap, B, C, angle, lp["D"],
                                lp.get("mimo_x"), pairwise=cfg.rotate_pairwise)
        out = mixer_out_proj(cfg, lp, mixer_gate(cfg, lp, proj, y))
        residual = block_residual(cfg, residual, out)
        states.append(new_state)
    logits = lm_logits(cfg, params, final_norm(cfg, params, residual))
    return logits, stack_states(states)
