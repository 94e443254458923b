"""Porting bug #10 (docs/porting-bugs.md) as real ports have it, for planting: the chunked SSD
with each chunk's decay matrix built as exp(cs[i] - cs[j]), a difference of cumulative sums over
the whole chunk (mamba2-jax 1.1.2's `segsum`). Mathematically equal to equiv.mamba2.ssd.ssd_chunked; in
float32 it cancels catastrophically once the cumulative decay inside a chunk is large and the segment short.

(Replacing equiv.mamba2.ssd.segsum alone no longer plants it faithfully: ssd_chunked applies segsum only
inside sub-blocks of 64, where the cumulative sums stay 4x smaller than over a 256 chunk.)"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from equiv.mamba2 import ssd


def segsum_cumsum_difference(a, block=16):
    """segsum(a)[..., i, j] as cs[i] - cs[j] (the defect), -inf above the diagonal."""
    cs = jnp.cumsum(a, axis=-1)
    q = a.shape[-1]
    grid = (*a.shape, q)
    diff = jnp.broadcast_to(cs[..., :, None], grid) - jnp.broadcast_to(cs[..., None, :], grid)
    return jnp.where(jnp.broadcast_to(jnp.tril(jnp.ones((q, q), bool)), grid), diff, -jnp.inf)


def ssd_chunked_cumsum_difference(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None,
                                  initial_states=None, dt_softplus=False, dt_limit=ssd.DEFAULT_DT_LIMIT,
                                  return_final_states=False):
    """`ssd_minimal_discrete` step for step (one q x q decay matrix per chunk), with the defect."""
    s = ssd._prepare(x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus, dt_limit)
    b, l, g, r, p = s.x.shape
    n = s.B.shape[-1]
    q = min(chunk_size, l)
    c = math.ceil(l / q)

    def chunks(a):  # b l ... -> b c q ...
        a = jnp.pad(a, [(0, 0), (0, c * q - l)] + [(0, 0)] * (a.ndim - 2))
        return a.reshape(b, c, q, *a.shape[2:])

    X, Bc, Cc = chunks(s.x * s.dt[..., None]), chunks(s.B), chunks(s.C)  # b c q g r p; b c q g n
    dA = jnp.moveaxis(chunks(s.dt * s.A), 2, -1)  # b c g r q
    L = jnp.exp(segsum_cumsum_difference(dA))  # b c g r q q
    y = jnp.einsum("bcqgn,bcsgn,bcgrqs,bcsgrp->bcqgrp", Cc, Bc, L, X)
    states = jnp.einsum("bcsgn,bcgrs,bcsgrp->bcgrpn", Bc, L[..., -1, :], X)

    def carry(state, inp):
        decay, new = inp
        return decay[..., None, None] * state + new, state

    h0 = ssd._initial_state(initial_states, b, g, r, p, n)
    final, entering = jax.lax.scan(carry, h0, (jnp.moveaxis(jnp.exp(dA.sum(-1)), 1, 0),
                                               jnp.moveaxis(states, 1, 0)))
    from_start = jnp.exp(jnp.cumsum(dA, axis=-1))  # b c g r q
    y = y + jnp.einsum("bcqgn,cbgrpn,bcgrq->bcqgrp", Cc, entering, from_start)
    y = ssd._skip_and_gate(y.reshape(b, c * q, g * r, p)[:, :l], x, D, z, s.out_dtype)
    return (y, final.reshape(b, g * r, p, n)) if return_final_states else y
