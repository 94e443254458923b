"""Deliberately broken variants of the built-in Mamba-1 / Falcon-Mamba port, one per porting bug of
docs/porting-bugs.md's Mamba-1 section (its number, "M1-N", is the defect's `row`): the catalogue
`DEFECTS` and `plant`, which wraps a loaded `Mamba1Model` so that each of its calls runs with one
function of equiv.mamba1.model swapped for a broken one.

How a variant really runs: jax caches a trace per function *object*, so the port's own jitted entry
points (`_forward_jit`, `_isolated_layer`, `prefill`, `decode_step_jit`, `decode_loop`) would
replay their correct traces. Each planted model gets fresh jits of clones of them instead, swapped
in for the duration of a call together with the broken function, and traced under that swap (a
whole Mamba-1 forward compiles in about a second here, so no finer per-op jits are needed). Every
broken function counts its calls (`PlantedMamba1Model.traced`: under jit, one per trace), so a
test can assert the defect really ran.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp

from equiv.fixtures import UnknownFixture, fixture_dir, fixtures_root
from equiv.mamba1 import generate as gen
from equiv.mamba1 import model as m
from equiv.mamba1 import port as port_module
from equiv.mamba1 import scan
from equiv.mamba1.port import Mamba1Model
from tests.planted_swaps import Swapping

f32 = jnp.float32

_MODULES = (m, gen, port_module)  # every module that may hold a reference to a swapped function

# the correct functions, captured at import (a broken one calls these, never the swapped attribute)
_linear, _rms_norm, _softplus, _mixer_ssm = m.linear, m.rms_norm, m.softplus, m.mixer_ssm
_mixer_in_proj, _mixer_conv, _selective_scan = m.mixer_in_proj, m.mixer_conv, scan.selective_scan

# the port's jitted entry points (home module, name, static arguments), re-jitted per planted model
_ENTRY_POINTS = ((port_module, "_forward_jit", ("cfg", "taps", "scan_mode")),
                 (port_module, "_isolated_layer", ("cfg", "scan_mode")),
                 (gen, "prefill", ("cfg", "scan_mode")),
                 (gen, "decode_step_jit", ("cfg",)),
                 (gen, "decode_loop", ("cfg", "max_new_tokens")))


# ---------------------------------------------------------------------------------------------
# the broken functions (same signatures as the functions they replace)


def mixer_ssm_dt_bias_twice(cfg, lp, conv_out, dt_raw, B, C, ssm_state, mode="associative", chunk=None):
    """M1-1: dt_proj already added its bias (a Linear with bias=True); the scan adds it again, as
    mamba_ssm's `selective_scan_fn(..., delta_bias=dt_proj.bias)` does."""
    bias = jnp.broadcast_to(lp["dt_bias"].astype(dt_raw.dtype), dt_raw.shape)
    return _mixer_ssm(cfg, lp, conv_out, dt_raw + bias, B, C, ssm_state, mode, chunk)


def _x_proj_parts(cfg, proj, order, norm):
    r, n = cfg.dt_rank, cfg.d_state
    if order == "B, C, dt":
        B, C, dt = proj[..., :n], proj[..., n:2 * n], proj[..., 2 * n:]
    else:
        dt, B, C = proj[..., :r], proj[..., r:r + n], proj[..., r + n:]
    parts = (dt, B, C)
    if norm and cfg.mixer_rms_eps is not None:
        parts = tuple(_rms_norm(p, None, cfg.mixer_rms_eps) for p in parts)
    return parts


def mixer_x_proj_bc_dt(cfg, lp, conv_out):
    """M1-2: x_proj's output split as (B, C, dt) instead of mamba_ssm's (dt, B, C)."""
    return _x_proj_parts(cfg, _linear(conv_out, lp["x_proj"]), "B, C, dt", norm=True)


def mixer_ssm_without_softplus(cfg, lp, conv_out, dt_raw, B, C, ssm_state, mode="associative", chunk=None):
    """M1-3: dt used raw (delta_softplus forgotten): negative dt, so exp(dt A) > 1 and the state grows."""
    A = -jnp.exp(lp["A_log"].astype(f32))
    return _selective_scan(conv_out, dt_raw, A, B, C, lp["D"], mode=mode, chunk=chunk,
                           initial_state=ssm_state)


def mixer_ssm_softplus_twice(cfg, lp, conv_out, dt_raw, B, C, ssm_state, mode="associative", chunk=None):
    """M1-4: softplus applied after dt_proj and again inside the scan (delta_softplus=True)."""
    return _mixer_ssm(cfg, lp, conv_out, _softplus(dt_raw), B, C, ssm_state, mode, chunk)


def causal_conv_state_off_by_one(x, w, b, conv_state):
    """M1-5: the conv's output is right, but the state it hands on is the k-1 inputs ending one
    position early (the newest input dropped, one stale input kept): every decode step's window is
    shifted by one position. The prefill's outputs are untouched."""
    k, l = w.shape[0], x.shape[1]
    window = jnp.concatenate([conv_state.astype(x.dtype), x], axis=1)  # b (k-1+l) e
    wf = w.astype(f32)
    out = sum(window[:, j:j + l].astype(f32) * jnp.broadcast_to(wf[j], x.shape) for j in range(k))
    if b is not None:
        out = out + jnp.broadcast_to(b.astype(f32), out.shape)
    return m.silu(out.astype(x.dtype)), window[:, l - 1:-1]


def mixer_x_proj_without_bcdt_norms(cfg, lp, conv_out):
    """M1-6: Falcon-Mamba's weightless RMS norms on dt, B and C forgotten (plain Mamba-1 x_proj)."""
    return _x_proj_parts(cfg, _linear(conv_out, lp["x_proj"]), "dt, B, C", norm=False)


def block_residual_in_model_dtype(cfg, hidden, mixer_out):
    """M1-7: residual_in_fp32 ignored, the residual stream stays in the model dtype. A no-op in
    float32 (the cast is the identity there), so only a bfloat16 run can show it."""
    return hidden + mixer_out


def mixer_in_proj_unmasked(cfg, lp, normed, mask):
    """M1-8: padded positions not zeroed before in_proj, so their x reaches the causal conv of the
    first k-1 real tokens."""
    return _mixer_in_proj(cfg, lp, normed, None)


def mixer_conv_unmasked(cfg, lp, xz, mask, conv_state):
    """M1-8: padded positions not zeroed after the conv; with a conv bias (or an in_proj bias) their
    output is silu(bias) != 0, and it enters the SSM state."""
    return _mixer_conv(cfg, lp, xz, None, conv_state)


def mixer_ssm_without_d(cfg, lp, conv_out, dt_raw, B, C, ssm_state, mode="associative", chunk=None):
    """M1-9: the D * x skip connection dropped."""
    return _mixer_ssm(cfg, lp | {"D": None}, conv_out, dt_raw, B, C, ssm_state, mode, chunk)


def selective_scan_decay_after_input(x, dt, A, B, C, D=None, *, mode="associative", chunk=None,
                                     initial_state=None):
    """M1-10: the decay taken at the wrong position, h_t = exp(dt_t A) (h_{t-1} + dt_t x_t B_t):
    each input is decayed by its own step too (an inclusive instead of exclusive cumulative decay)."""
    decay, inp = scan._discretize(x, dt, A, B)
    h0 = (jnp.zeros((x.shape[0], *A.shape), f32) if initial_state is None
          else jnp.asarray(initial_state, f32))
    h = scan._associative_states(decay, decay * inp, h0)
    return scan._readout(h, C, x, D), h[:, -1]


# ---------------------------------------------------------------------------------------------
# the catalogue


@dataclass(frozen=True)
class Defect:
    """Attributes: name. row: its number in docs/porting-bugs.md's Mamba-1 section ("M1-N").
    overrides: ((module, attribute, broken function), ...). description: what is wrong, in one line."""

    name: str
    row: str
    overrides: tuple = ()
    description: str = ""


DEFECTS = {d.name: d for d in (
    Defect("dt_bias_twice", "M1-1", ((m, "mixer_ssm", mixer_ssm_dt_bias_twice),),
           "dt_proj's bias added in dt_proj and again as the scan's delta_bias"),
    Defect("x_proj_split_b_c_dt", "M1-2", ((m, "mixer_x_proj", mixer_x_proj_bc_dt),),
           "x_proj split as (B, C, dt) instead of (dt, B, C)"),
    Defect("softplus_missing", "M1-3", ((m, "mixer_ssm", mixer_ssm_without_softplus),),
           "dt softplus missing"),
    Defect("softplus_twice", "M1-4", ((m, "mixer_ssm", mixer_ssm_softplus_twice),),
           "dt softplus applied twice"),
    Defect("conv_state_off_by_one", "M1-5", ((m, "causal_conv", causal_conv_state_off_by_one),),
           "decode conv window shifted by one position"),
    Defect("falcon_bcdt_norms_missing", "M1-6", ((m, "mixer_x_proj", mixer_x_proj_without_bcdt_norms),),
           "Falcon-Mamba's RMS norms on dt, B, C forgotten"),
    Defect("residual_not_fp32", "M1-7", ((m, "block_residual", block_residual_in_model_dtype),),
           "residual stream not kept in float32 under residual_in_fp32"),
    Defect("padding_unmasked_before_in_proj", "M1-8", ((m, "mixer_in_proj", mixer_in_proj_unmasked),),
           "left padding not masked before in_proj (leaks into the conv)"),
    Defect("padding_unmasked_after_conv", "M1-8", ((m, "mixer_conv", mixer_conv_unmasked),),
           "left padding not masked after the conv"),
    Defect("d_skip_dropped", "M1-9", ((m, "mixer_ssm", mixer_ssm_without_d),), "D * x skip dropped"),
    Defect("decay_after_input", "M1-10", ((m, "selective_scan", selective_scan_decay_after_input),),
           "scan decays each input by its own step (decay at the wrong position)"),
)}


# ---------------------------------------------------------------------------------------------
# planting


class PlantedMamba1Model(Swapping, Mamba1Model):
    """A `LoadedModel` running `defect` (no overrides: the correct port, through the same fresh jits)."""

    _modules = _MODULES

    def __init__(self, base: Mamba1Model, defect: Defect):
        super().__init__(base.cfg, base.params, base.dtype, base.source, base.format, base.precision,
                         base.scan_mode)
        self.defect = defect
        self.set_swaps(defect.overrides, _ENTRY_POINTS)


def fixture_path(name: str) -> Path:
    """A Mamba-1 fixture's directory: through the manifest once it lists the fixture (which checks
    it), else the fixtures root's folder of that name."""
    try:
        return fixture_dir(name)
    except UnknownFixture:
        path = fixtures_root() / name
        assert (path / "config.json").is_file(), f"fixture {name!r}: expected {path}/config.json"
        return path


def plant(base: Mamba1Model, defect: Defect | str | None) -> PlantedMamba1Model:
    defect = DEFECTS[defect] if isinstance(defect, str) else defect or Defect("correct", "")
    return PlantedMamba1Model(base, defect)


__all__ = ["DEFECTS", "Defect", "PlantedMamba1Model", "fixture_path", "plant"]
