"""Greedy generation with the whole loop on device: prefill through the chunked SSD, then
equiv.greedy.greedy_loop over O(1) decode steps. No host round trip per token; the cache is a loop
carry that XLA updates in place, and the prefill cache is donated into the loop.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from equiv.greedy import greedy_loop
from equiv.mamba2.config import Mamba2Config
from equiv.mamba2.model import Cache, decode_step, forward

TRACES = {"prefill": 0, "decode_loop": 0, "decode_step": 0}
"""Trace counters: incremented only while JAX traces, so a test can assert the loop compiles once
per shape (the decode loop is guarded against retracing)."""


PREFILL_SEGMENT_CHUNKS = 32
"""A prompt longer than this many chunks (8192 positions at chunk 256) is prefilled in segments of
that length, each continuing from the cache of the one before (forward's chunked prefill). One call
over the whole prompt holds every layer's chunk-by-chunk intermediates at once: measured on an
H100 (80 GB), the 2.7b shape in bf16 asked XLA for 89.7 GiB at L = 65536 and ran out of memory;
in segments the peak is one segment's. Segments start at chunk boundaries, so the chunking is the
one-call chunking (only the inter-chunk state passing is split, a valid other order)."""


@partial(jax.jit, static_argnames=("cfg",))
def _prefill(params, cfg: Mamba2Config, ids, mask=None, cache: Cache | None = None):
    TRACES["prefill"] += 1
    logits, cache, _ = forward(params, cfg, ids, mask, cache, last_logits_only=True)
    return logits, cache


def prefill(params, cfg: Mamba2Config, ids, mask=None):
    """ids (b, l) -> (logits of the last position (b, v), cache); long prompts in segments
    (PREFILL_SEGMENT_CHUNKS)."""
    seg = PREFILL_SEGMENT_CHUNKS * cfg.chunk_size
    if ids.shape[1] <= seg:
        return _prefill(params, cfg, ids, mask)
    logits, cache = None, None
    for start in range(0, ids.shape[1], seg):
        part = None if mask is None else mask[:, start:start + seg]
        logits, cache = _prefill(params, cfg, ids[:, start:start + seg], part, cache)
    return logits, cache


@partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def decode_step_jit(params, cfg: Mamba2Config, cache: Cache, tokens):
    TRACES["decode_step"] += 1
    return decode_step(params, cfg, cache, tokens)


@partial(jax.jit, static_argnames=("cfg", "max_new_tokens"), donate_argnames=("cache",))
def decode_loop(params, cfg: Mamba2Config, cache: Cache, logits, max_new_tokens: int, eos_id, pad_id):
    """From the prefill's last logits, emit up to max_new_tokens greedy tokens.

    Returns (tokens (b, T) int32, margins (b, T) float32, steps, cache): the cache is returned so
    the donated prefill buffers are reused in place and generation can be resumed. A sequence that
    has emitted eos_id emits pad_id afterwards (as transformers does); the loop stops when all
    have, or at T."""
    TRACES["decode_loop"] += 1
    return greedy_loop(lambda c, t: decode_step(params, cfg, c, t), cache, logits, max_new_tokens, eos_id,
                       pad_id)


def generate(params, cfg: Mamba2Config, prompt, mask=None, max_new_tokens: int = 32, eos_id=None,
             pad_id=None):
    """Greedy decode: (tokens (b, T), margins (b, T), steps, cache) as device arrays (no host sync)."""
    logits, cache = prefill(params, cfg, prompt, mask)
    eos = -1 if eos_id is None else eos_id
    pad = pad_id if pad_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else 0)
    return decode_loop(params, cfg, cache, logits, max_new_tokens, jnp.int32(eos), jnp.int32(pad))
