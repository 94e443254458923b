"""Deliberately broken variants of the built-in Mamba-3 port, one per porting bug of
docs/porting-bugs.md's Mamba-3 section (its number, "M3-N", is the defect's `row`): the catalogue
`DEFECTS` and `plant`, which wraps a loaded `Mamba3Model` so that each of its calls runs with
functions of equiv.mamba3.model / equiv.mamba3.ssm swapped for broken ones.

How a variant really runs (as tests/planted_mamba1_defects.py): jax caches a trace per function
*object*, so the port's own jitted entry points (`_forward_jit`, `_isolated_layer`, `prefill`,
`decode_step_jit`, `decode_loop`) would replay their correct traces. Each planted model gets fresh
jits of clones of them instead, swapped in for the duration of a call together with the broken
functions, and traced under that swap. Every broken function counts its calls
(`PlantedMamba3Model.traced`: under jit, one per trace), so a test can assert the defect really ran.
equiv/mamba3/ itself is never edited.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from equiv.mamba3 import generate as gen
from equiv.mamba3 import model as m
from equiv.mamba3 import port as port_module
from equiv.mamba3 import ssm
from equiv.mamba3.port import Mamba3Model
from tests.planted_swaps import Swapping

f32, bf16 = jnp.float32, jnp.bfloat16

_MODULES = (m, ssm, gen, port_module)  # every module that may hold a reference to a swapped function

# the correct functions, captured at import (a broken one calls these, never the swapped attribute)
_mixer_ssm, _ssm_step, _cumulative_angles = m.mixer_ssm, ssm.ssm_step, ssm.cumulative_angles
_softplus, _rms_norm, _split = m.softplus, m.rms_norm, m.split_in_proj

# the port's jitted entry points (home module, name, static arguments), re-jitted per planted model
_ENTRY_POINTS = ((port_module, "_forward_jit", ("cfg", "taps", "mode")),
                 (port_module, "_isolated_layer", ("cfg", "mode")),
                 (gen, "prefill", ("cfg", "mode", "chunk")),
                 (gen, "decode_step_jit", ("cfg",)),
                 (gen, "decode_loop", ("cfg", "max_new_tokens")))


# ---------------------------------------------------------------------------------------------
# the broken functions (same signatures as the functions they replace)


def mixer_ssm_euler(cfg, lp, proj, dt, A, trap, B, C, state, mode="chunked", chunk=None):
    """M3-1: the trapezoid's previous-position term dropped: lambda = 1, so H_t = alpha_t H_{t-1} +
    dt_t x_t k_t^T (Mamba-2's exponential Euler) instead of the exponential-trapezoidal rule."""
    return _mixer_ssm(cfg, lp, proj, dt, A, jnp.ones_like(trap), B, C, state, mode, chunk)


def ssm_step_euler(state, x, dt, A, trap, B, C, angle, D, mimo_x=None, *, pairwise=True):
    """M3-1 in the decode step (the same Euler rule, so the planted port is consistent)."""
    return _ssm_step(state, x, dt, A, jnp.ones_like(trap), B, C, angle, D, mimo_x, pairwise=pairwise)


def cumulative_angles_bf16(angle, dt, angle0, angle0_lo, chunk):
    """M3-2: the rotary angle's increments and their running sum kept in bfloat16 (the dtype of the
    angle slice of a bfloat16 in_proj), rounded at every position."""
    inc = jnp.moveaxis(ssm.angle_increments(angle, dt).astype(bf16), 1, 0)  # l b h a

    def running(c, x):
        c = (c + x).astype(bf16)
        return c, c

    _, theta = jax.lax.scan(running, (angle0 + angle0_lo).astype(bf16), inc)
    hi = jnp.moveaxis(theta, 0, 1).astype(f32)
    lo = jnp.zeros_like(hi)
    return hi, lo, ssm.reduce_angle(hi, lo)


def cumulative_angles_previous(angle, dt, angle0, angle0_lo, chunk):
    """M3-3: position t rotated by theta_{t-1} (an exclusive instead of inclusive cumulative sum:
    the angle off by one position)."""
    hi, lo, _ = _cumulative_angles(angle, dt, angle0, angle0_lo, chunk)
    hi = jnp.concatenate([angle0.astype(f32)[:, None], hi[:, :-1]], axis=1)
    lo = jnp.concatenate([angle0_lo.astype(f32)[:, None], lo[:, :-1]], axis=1)
    return hi, lo, ssm.reduce_angle(hi, lo)


def mixer_A_unfloored(cfg, lp, proj):
    """M3-4: A = -softplus(dd_A), A_floor never applied (no clamp to -A_floor)."""
    return -_softplus(_split(cfg, proj)[5].astype(f32))


def ssm_step_readout_before_update(state, x, dt, A, trap, B, C, angle, D, mimo_x=None, *, pairwise=True):
    """M3-5: the step reads out the state before its update, y_t = H_{t-1} q_t + D x_t (the new
    state itself is right)."""
    _, new = _ssm_step(state, x, dt, A, trap, B, C, angle, D, mimo_x, pairwise=pairwise)
    turn = ssm.reduce_angle(new.angle, new.angle_lo)
    q = ssm._rounded(ssm.rotate(C, turn[:, None], pairwise), x.dtype)
    y = jnp.einsum("bhpn,brhn->brhp", state.ssm, q)
    if D is not None:
        y = y + ssm._skip(D, ssm._up(x, mimo_x))
    return y, new


def ssm_step_kv_not_carried(state, x, dt, A, trap, B, C, angle, D, mimo_x=None, *, pairwise=True):
    """M3-6: the step does not carry the current k and v on: the cache keeps the prefill's last
    (k, v), so every step's trapezoid term for the previous position reads a stale one."""
    y, new = _ssm_step(state, x, dt, A, trap, B, C, angle, D, mimo_x, pairwise=pairwise)
    return y, new._replace(k=state.k, v=state.v)


def up_head_rank_swapped(x, mimo_x):
    """M3-7: mimo_x, stored (h, R, p), read as (R, h, p): rank r of head j scaled by
    mimo_x[r, j] instead of mimo_x[j, r] (a per-head instead of a per-rank up-projection; same
    shape when h = R, as on mamba3-tiny-mimo). Harmless without MIMO (mimo_x None)."""
    xf = x.astype(f32)[..., None, :, :]
    if mimo_x is None:
        return xf
    up = mimo_x.astype(f32)
    return xf * up.reshape((1,) * (xf.ndim - 3) + up.shape)


def fold_ranks_unweighted(cfg, lp, gated):
    """M3-8: MIMO's ranks summed before out_proj without the mimo_o weights."""
    g = gated[..., 0, :, :] if not cfg.is_mimo else jnp.sum(gated, axis=-3)
    return g.reshape(*g.shape[:-2], cfg.d_inner)


def _bc(cfg, lp, proj, which, *, norm=True, bias=True):
    raw = _split(cfg, proj)[2 if which == "B" else 3]
    v = m._heads(cfg, raw)
    v = _rms_norm(v, lp[f"{which}_norm"], m.SUB_NORM_EPS) if norm else v
    v = v.astype(f32)
    return v + m._bias(lp, f"{which}_bias", v) if bias else v


def mixer_B_no_bias(cfg, lp, proj):
    """M3-9: B_norm(B) without B_bias."""
    return _bc(cfg, lp, proj, "B", bias=False)


def mixer_C_no_bias(cfg, lp, proj):
    """M3-9: C_norm(C) without C_bias."""
    return _bc(cfg, lp, proj, "C", bias=False)


def mixer_B_no_norm(cfg, lp, proj):
    """M3-10: B + B_bias without B_norm."""
    return _bc(cfg, lp, proj, "B", norm=False)


def mixer_C_no_norm(cfg, lp, proj):
    """M3-10: C + C_bias without C_norm."""
    return _bc(cfg, lp, proj, "C", norm=False)


# ---------------------------------------------------------------------------------------------
# the catalogue


@dataclass(frozen=True)
class Defect:
    """Attributes: name. row: its number in docs/porting-bugs.md's Mamba-3 section ("M3-N").
    overrides: ((module, attribute, broken function), ...); the first is the one a test checks was
    traced. description: what is wrong, in one line."""

    name: str
    row: str
    overrides: tuple = ()
    description: str = ""


DEFECTS = {d.name: d for d in (
    Defect("trapezoid_euler", "M3-1", ((m, "mixer_ssm", mixer_ssm_euler), (ssm, "ssm_step", ssm_step_euler)),
           "trapezoid's previous-position term dropped (exponential Euler)"),
    Defect("angle_bf16", "M3-2", ((ssm, "cumulative_angles", cumulative_angles_bf16),),
           "rotary angle accumulated in bfloat16"),
    Defect("angle_off_by_one", "M3-3", ((ssm, "cumulative_angles", cumulative_angles_previous),),
           "position t rotated by the previous position's angle"),
    Defect("a_floor_skipped", "M3-4", ((m, "mixer_A", mixer_A_unfloored),), "A not clamped to -A_floor"),
    Defect("step_readout_before_update", "M3-5", ((ssm, "ssm_step", ssm_step_readout_before_update),),
           "decode step reads the state out before updating it"),
    Defect("step_kv_not_carried", "M3-6", ((ssm, "ssm_step", ssm_step_kv_not_carried),),
           "decode step does not carry the current k, v to the next step"),
    Defect("mimo_x_head_rank_swapped", "M3-7", ((ssm, "_up", up_head_rank_swapped),),
           "mimo_x indexed per head instead of per rank"),
    Defect("mimo_ranks_summed_unweighted", "M3-8", ((m, "_fold", fold_ranks_unweighted),),
           "MIMO ranks summed before out_proj without mimo_o"),
    Defect("bc_bias_forgotten", "M3-9", ((m, "mixer_B", mixer_B_no_bias), (m, "mixer_C", mixer_C_no_bias)),
           "B_bias and C_bias forgotten"),
    Defect("bc_norm_forgotten", "M3-10", ((m, "mixer_B", mixer_B_no_norm), (m, "mixer_C", mixer_C_no_norm)),
           "B_norm and C_norm forgotten"),
)}


# ---------------------------------------------------------------------------------------------
# planting


class PlantedMamba3Model(Swapping, Mamba3Model):
    """A `LoadedModel` running `defect` (no overrides: the correct port, through the same fresh jits)."""

    _modules = _MODULES

    def __init__(self, base: Mamba3Model, defect: Defect):
        super().__init__(base.cfg, base.params, base.dtype, base.source, base.format, base.precision,
                         base.mode)
        self.defect = defect
        self.set_swaps(defect.overrides, _ENTRY_POINTS)


def plant(base: Mamba3Model, defect: Defect | str | None) -> PlantedMamba3Model:
    defect = DEFECTS[defect] if isinstance(defect, str) else defect or Defect("correct", "")
    return PlantedMamba3Model(base, defect)


__all__ = ["DEFECTS", "Defect", "PlantedMamba3Model", "plant"]
