"""The shared on-device greedy loop (equiv/greedy.py: greedy_loop) against a host-side Python
loop, with a synthetic decode step whose logits depend on every token fed so far: tokens, margins,
eos and pad handling, the step count, and which tokens the returned cache has consumed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from equiv.greedy import greedy_loop

V = 11


def _logits(state):
    """(b,) int state -> (b, V) logits with a unique maximum that moves with the state."""
    v = jnp.arange(V, dtype=jnp.float32)
    return -jnp.abs(v[None, :] - (state[:, None] * 7 % V)) + 0.01 * v[None, :]


def _step(cache, tokens):
    """cache = (hash of the tokens fed, count fed): logits follow the hash."""
    h, n = cache
    h = (h * 31 + tokens + 1) % 1009
    return _logits(h), (h, n + 1)


def _host(h0, logits0, T, eos, pad):
    """The same generation in Python, one sequence at a time."""
    h, logits, tokens, margins, fed = int(h0), np.asarray(logits0), [], [], 0
    for t in range(T):
        nxt = int(np.argmax(logits))
        top = np.sort(logits)[-2:]
        tokens.append(nxt)
        margins.append(float(top[1] - top[0]))
        if nxt == eos or t == T - 1:
            break
        h = (h * 31 + nxt + 1) % 1009
        logits, fed = np.asarray(_logits(jnp.asarray([h]))[0]), fed + 1
    return tokens, margins, fed


@pytest.mark.parametrize("T", [0, 1, 2, 7])
@pytest.mark.parametrize("eos", [-1, 3, 7])  # 7 stops every row before T=7
def test_greedy_loop_equals_host_loop(T, eos):
    h0 = jnp.asarray([4, 9, 100], jnp.int32)
    logits0 = _logits(h0)
    tokens, margins, steps, (h, fed) = jax.jit(greedy_loop, static_argnums=(0, 3))(
        _step, (h0, jnp.zeros(3, jnp.int32)), logits0, T, jnp.int32(eos), jnp.int32(-7))
    tokens, margins = np.asarray(tokens), np.asarray(margins)
    assert tokens.shape == margins.shape == (3, T)
    runs = [_host(h0[r], logits0[r], T, eos, -7) for r in range(3)]
    for r, (want_tok, want_margin, _) in enumerate(runs):
        n = len(want_tok)
        np.testing.assert_array_equal(tokens[r, :n], want_tok)
        np.testing.assert_allclose(margins[r, :n], want_margin, rtol=1e-6)
        # after eos (or before the loop stopped for every row): pad and NaN
        assert (tokens[r, n:int(steps)] == -7).all() and np.isnan(margins[r, n:]).all()
    # the loop runs until every row is done: steps = the longest row's tokens
    assert int(steps) == max((len(t) for t, _, _ in runs), default=0)
    # the cache has consumed every emitted token but the last, and nothing past the stop
    assert np.asarray(fed).tolist() == [max(int(steps) - (1 if int(steps) == T else 0), 0)] * 3
