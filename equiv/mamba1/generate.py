"""Greedy generation with the whole loop on device: prefill through the parallel (associative)
scan, then equiv.greedy.greedy_loop over O(1) decode steps. No host round trip per token; the cache
is a loop carry that XLA updates in place, and the prefill cache is donated into the loop.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from equiv.greedy import greedy_loop
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
    return greedy_loop(lambda c, t: decode_step(params, cfg, c, t), cache, logits, max_new_tokens, eos_id,
                       pad_id)


def generate(params, cfg: Mamba1Config, prompt, mask=None, max_new_tokens: int = 32, eos_id=None,
             pad_id=None):
    """Greedy decode: (tokens (b, T), margins (b, T), steps, cache) as device arrays (no host sync).
    eos_id None never stops early; pad_id defaults to the config's pad_token_id, else 0."""
    logits, cache = prefill(params, cfg, prompt, mask)
    eos = -1 if eos_id is None else eos_id
    pad = pad_id if pad_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else 0)
    return decode_loop(params, cfg, cache, logits, max_new_tokens, jnp.int32(eos), jnp.int32(pad))
