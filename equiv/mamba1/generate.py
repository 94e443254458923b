"""Greedy generation with the whole loop on device: prefill through the parallel (associative)
scan, then a lax.while_loop of O(1) decode steps. No host round trip per token; the cache is a
loop carry that XLA updates in place, and the prefill cache is donated into the loop.

Tie-breaking matches torch: argmax takes the first maximal index.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from equiv.greedy import top2_margin
from equiv.mamba1.config import Mamba1Config
from equiv.mamba1.model import Cache, decode_step, forward

TRACES = {"prefill": 0, "decode_loop": 0, "decode_step": 0}
"""Trace counters: incremented only while JAX traces, so a test can assert the loop compiles once
per shape."""


@partial(jax.jit, static_argnames=("cfg", "scan_mode"))
def prefill(params, cfg: Mamba1Config, ids, mask=None, scan_mode: str = "associative"):
    """ids (b, l) -> (logits of the last position (b, v), cache)."""
    TRACES["prefill"] += 1
    logits, cache, _ = forward(params, cfg, ids, mask, last_logits_only=True, scan_mode=scan_mode)
    return logits, cache


@partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def decode_step_jit(params, cfg: Mamba1Config, cache: Cache, tokens):
    TRACES["decode_step"] += 1
    return decode_step(params, cfg, cache, tokens)


@partial(jax.jit, static_argnames=("cfg", "max_new_tokens"), donate_argnames=("cache",))
def decode_loop(params, cfg: Mamba1Config, cache: Cache, logits, max_new_tokens: int, eos_id, pad_id):
    """From the prefill's last logits, emit up to max_new_tokens greedy tokens.

    Returns (tokens (b, T) int32, margins (b, T) float32, steps, cache). A sequence that has
    emitted eos_id emits pad_id afterwards (as transformers does); the loop stops when all have,
    or at T."""
    TRACES["decode_loop"] += 1
    b = logits.shape[0]

    def cond(carry):
        step, _, _, _, _, done = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, logits, cache, tokens, margins, done = carry
        nxt = jnp.where(done, pad_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
        tokens = tokens.at[:, step].set(nxt)
        margins = margins.at[:, step].set(jnp.where(done, jnp.nan, top2_margin(logits)))
        done = done | (nxt == eos_id)
        # the step after the last token would be wasted work: skip it
        logits, cache = jax.lax.cond(step + 1 < max_new_tokens,
                                     lambda: decode_step(params, cfg, cache, nxt),
                                     lambda: (logits, cache))
        return step + 1, logits, cache, tokens, margins, done

    init = (jnp.int32(0), logits, cache, jnp.full((b, max_new_tokens), pad_id, jnp.int32),
            jnp.full((b, max_new_tokens), jnp.nan, jnp.float32), jnp.zeros((b,), bool))
    steps, _, cache, tokens, margins, _ = jax.lax.while_loop(cond, body, init)
    return tokens, margins, steps, cache


def generate(params, cfg: Mamba1Config, prompt, mask=None, max_new_tokens: int = 32, eos_id=None,
             pad_id=None):
    """Greedy decode: (tokens (b, T), margins (b, T), steps, cache) as device arrays (no host sync).
    eos_id None never stops early; pad_id defaults to the config's pad_token_id, else 0."""
    logits, cache = prefill(params, cfg, prompt, mask)
    eos = -1 if eos_id is None else eos_id
    pad = pad_id if pad_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else 0)
    return decode_loop(params, cfg, cache, logits, max_new_tokens, jnp.int32(eos), jnp.int32(pad))
