"""Planted defects in the cache and decode paths (dt clamp in the step, a forward with a cache that
forgets it, initial-state decay at an unaligned offset, per-head-dim D in the step, bf16 state):
each caught by a decode or continuation check against the full forward. "Row N" is porting bug #N
of docs/porting-bugs.md."""

from __future__ import annotations

import jax.numpy as jnp

from equiv.mamba2 import model as m
from equiv.mamba2 import ssd
from tests.planting import Defect

f32 = jnp.float32

# the correct functions, captured at import (a broken one calls these, never the swapped attribute)
_mixer_ssm, _mixer_conv, _decode_step = m.mixer_ssm, m.mixer_conv, m.decode_step
_ssd_chunked, _ssd_step = ssd.ssd_chunked, ssd.ssd_step


def ssd_step_without_dt_limit(*args, dt_limit=None, **kwargs):
    """Row 4: the decode step forgets time_step_limit (prefill still clamps)."""
    return _ssd_step(*args, **kwargs)


def mixer_ssm_zero_state(cfg, lp, zxbcdt, conv_out, ssm_state, chunk_size):
    """Row 5: a forward with a cache restarts the SSM from a zero state."""
    return _mixer_ssm(cfg, lp, zxbcdt, conv_out, jnp.zeros_like(ssm_state), chunk_size)


def mixer_conv_drops_window(cfg, lp, zxbcdt, mask, conv_state):
    """Row 5: a forward with a cache forgets the conv window (zeros instead of the last k-1 inputs)."""
    return _mixer_conv(cfg, lp, zxbcdt, mask, jnp.zeros_like(conv_state))


def ssd_chunked_decay_from_chunk_start(offset: int):
    """Row 7 (vllm#23279): the chunk grid is aligned to absolute positions, so a continuation that
    starts `offset` tokens into a chunk shares its first chunk with `offset` earlier positions. Those
    positions carry no input (x = B = C = 0) but keep a decay (raw dt = 0, so dt = softplus(dt_bias)):
    the initial state decays from the chunk start instead of the sequence start. Exact when the
    initial state is zero or offset = 0; wrong for a continuation at an unaligned offset."""

    def broken(x, dt, A, B, C, chunk_size, *, initial_states=None, return_final_states=False, **kwargs):
        front = lambda a: jnp.pad(a, [(0, 0), (offset, 0)] + [(0, 0)] * (a.ndim - 2))  # noqa: E731
        y, final = _ssd_chunked(front(x), front(dt), A, front(B), front(C), chunk_size,
                                initial_states=initial_states, return_final_states=True, **kwargs)
        y = y[:, offset:]
        return (y, final) if return_final_states else y

    return broken


def ssd_step_d_per_head(state, x, dt, A, B, C, D=None, **kwargs):
    """Row 8 (mamba#887): the step treats a per-head-dim D (h, p) as per-head (h,): it reads the
    first h entries of the flat D and repeats them over p, like `repeat(self.D, "h -> h p")`."""
    h, p = x.shape[-2:]
    if D is not None and D.ndim == 2:
        D = jnp.broadcast_to(D.reshape(-1)[:h][:, None], (h, p))
    return _ssd_step(state, x, dt, A, B, C, D=D, **kwargs)


def decode_step_bf16_state(params, cfg, cache, tokens):
    """Row 9: the cached SSM state is stored in bfloat16 between steps."""
    logits, new = _decode_step(params, cfg, cache, tokens)
    return logits, m.Cache(new.conv, new.ssm.astype(jnp.bfloat16).astype(f32))


CACHE_DEFECTS = (
    Defect("dt_limit_skipped_in_decode", "4", ((m, "ssd_step", ssd_step_without_dt_limit),),
           "dt clamp skipped in decode_step"),
    Defect("continuation_zero_state", "5", ((m, "mixer_ssm", mixer_ssm_zero_state),),
           "forward with a cache restarts from a zero SSM state"),
    Defect("continuation_drops_conv_window", "5", ((m, "mixer_conv", mixer_conv_drops_window),),
           "forward with a cache drops the conv window"),
    Defect("d_hdim_per_head_in_step", "8", ((m, "ssd_step", ssd_step_d_per_head),),
           "per-head-dim D read as per-head in the step"),
    Defect("bf16_ssm_state", "9", ((m, "decode_step", decode_step_bf16_state),),
           "bf16 SSM state in the cache"),
)


def decay_from_chunk_start(offset: int) -> Defect:
    return Defect(f"initial_state_decay_from_chunk_start@{offset}", "7",
                  ((m, "ssd_chunked", ssd_chunked_decay_from_chunk_start(offset)),),
                  "initial-state decay from the chunk start at an unaligned offset")
