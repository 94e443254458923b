"""The SSD layer y = SSM(A, B, C, dt)(x) in its four dual forms, in pure JAX.

Argument names and layouts follow mamba_ssm's `mamba_chunk_scan_combined` and
`selective_state_update` so users recognise them:

    x (b, l, h, p)   dt (b, l, h)   A (h,)   B, C (b, l, g, n)   D (h,) or (h, p)   z like x
    initial_states (b, h, p, n)

Head j reads group j // (h / g) (repeat_interleave semantics, docs/porting-bugs.md #1). We never
materialise the repeat: heads are viewed as (g, r) with h = g * r and every einsum carries both.

All arithmetic runs in float32 whatever the input dtype (bfloat16 inputs get float32 state and
accumulation, as in the Triton kernels); outputs come back in x's dtype, states in float32.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from equiv.errors import ShapeError, format_mismatches

DEFAULT_DT_LIMIT = (0.0, float("inf"))
_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64)


class SSDInputs(NamedTuple):
    """Validated, float32, discretised inputs shared by every form."""

    x: jax.Array  # b l g r p
    dt: jax.Array  # b l g r   (after bias, softplus and limit)
    A: jax.Array  # b l g r (broadcast)
    B: jax.Array  # b l g n
    C: jax.Array  # b l g n
    out_dtype: jnp.dtype


# ---------------------------------------------------------------------------------------------
# validation and dt discretisation


def _validate(x, dt, A, B, C, D, z, dt_bias, initial_states, *, step: bool) -> None:
    """Collect every mismatch and raise once, naming dimensions (chex `assert_shape` style)."""
    problems: list[str] = []
    lead = "b" if step else "b, l"
    nlead = 1 if step else 2
    if x.ndim != nlead + 2:
        raise ShapeError(f"x: expected rank {nlead + 2} ({lead}, h, p), got shape {tuple(x.shape)}")
    *bl, h, p = x.shape
    bl = tuple(bl)
    grouped, grouped_name = (B, "B") if B is not None else (C, "C")  # ssd_readout has no B
    if grouped.ndim != nlead + 2:
        raise ShapeError(f"{grouped_name}: expected rank {nlead + 2} ({lead}, g, n), got shape "
                         f"{tuple(grouped.shape)}")
    g, n = grouped.shape[-2:]
    if g < 1 or h % g != 0:
        problems.append(f"g (n_groups) must divide h (heads): got g={g}, h={h}")

    def expect(name, arr, shape, names):
        if arr is None:
            return
        if tuple(arr.shape) != tuple(shape):
            problems.append(f"{name}: expected shape ({names}) = {tuple(shape)}, got {tuple(arr.shape)}")

    expect("B", B, (*bl, g, n), f"{lead}, g, n")
    expect("C", C, (*bl, g, n), f"{lead}, g, n")
    expect("dt", dt, (*bl, h), f"{lead}, h")
    expect("A", A, (h,), "h")
    expect("z", z, (*bl, h, p), f"{lead}, h, p")
    expect("dt_bias", dt_bias, (h,), "h")
    expect("initial_states" if not step else "state", initial_states, (bl[0], h, p, n), "b, h, p, n")
    if D is not None and tuple(D.shape) not in ((h,), (h, p)):
        problems.append(f"D: expected shape (h,) = ({h},) or (h, p) = ({h}, {p}), got {tuple(D.shape)}")
    for name, arr in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                      ("dt_bias", dt_bias), ("initial_states", initial_states)):
        if arr is not None and not jnp.issubdtype(arr.dtype, jnp.floating):
            problems.append(f"{name}: expected a floating dtype, got {arr.dtype}")
    for name, arr in (("B", B), ("C", C), ("z", z)):
        if arr is not None and arr.dtype != x.dtype:
            problems.append(f"{name}: expected dtype {x.dtype} (x's dtype), got {arr.dtype}")
    if problems:
        raise ShapeError(format_mismatches("SSD arguments", problems))


def discretize_dt(dt, dt_bias=None, dt_softplus=False, dt_limit=DEFAULT_DT_LIMIT):
    """dt -> softplus(dt + dt_bias), clamped to dt_limit, in float32.

    Mirrors the Triton kernels: torch's softplus threshold of 20 (identity above it), and the clamp
    applied only when dt_limit is not the default (docs/porting-bugs.md #4: prefill and decode share
    this one function so they can't disagree)."""
    dt = dt.astype(jnp.float32)
    if dt_bias is not None:
        dt = dt + jnp.broadcast_to(dt_bias.astype(jnp.float32), dt.shape)
    if dt_softplus:
        dt = jnp.where(dt <= 20.0, jnp.log1p(jnp.exp(jnp.minimum(dt, 20.0))), dt)
    lo, hi = (float(v) for v in dt_limit)
    if (lo, hi) != DEFAULT_DT_LIMIT:
        dt = jnp.clip(dt, lo, hi)
    return dt


def _prepare(x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus, dt_limit, *, step=False):
    _validate(x, dt, A, B, C, D, z, dt_bias, initial_states, step=step)
    h, p = x.shape[-2:]
    g = B.shape[-2]
    r = h // g
    f32 = jnp.float32
    dt = discretize_dt(dt, dt_bias, dt_softplus, dt_limit)
    lead = x.shape[:-2]
    return SSDInputs(
        x=x.astype(f32).reshape(*lead, g, r, p),
        dt=dt.reshape(*lead, g, r),
        A=jnp.broadcast_to(A.astype(f32).reshape(g, r), (*lead, g, r)),
        B=B.astype(f32),
        C=C.astype(f32),
        out_dtype=x.dtype,
    )


def _skip_and_gate(y, x, D, z, out_dtype):
    """y + D * x, then y * silu(z) (gating after the scan, as in mamba_chunk_scan_combined)."""
    f32 = jnp.float32
    if D is not None:
        Df = D.astype(f32)
        Df = Df[:, None] if Df.ndim == 1 else Df  # h p
        y = y + x.astype(f32) * jnp.broadcast_to(Df, x.shape)
    if z is not None:
        zf = z.astype(f32)
        y = y * zf * jax.nn.sigmoid(zf)
    return y.astype(out_dtype)


def _initial_state(initial_states, b, g, r, p, n):
    if initial_states is None:
        return jnp.zeros((b, g, r, p, n), jnp.float32)
    return initial_states.astype(jnp.float32).reshape(b, g, r, p, n)


# ---------------------------------------------------------------------------------------------
# the stable segment sum


def _segsum_masked(a: jax.Array) -> jax.Array:
    """segsum as a masked cumulative sum over an (i, j) grid, like transformers' `segment_sum`."""
    q = a.shape[-1]
    rep = jnp.broadcast_to(a[..., :, None], (*a.shape, q))  # ... k j : a[k]
    keep = jnp.broadcast_to(jnp.tril(jnp.ones((q, q), bool), -1), rep.shape)  # k > j
    out = jnp.cumsum(jnp.where(keep, rep, 0.0), axis=-2)  # ... i j : sum_{j < k <= i} a[k]
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((q, q), bool)), out.shape)
    return jnp.where(causal, out, -jnp.inf)


def _two_level(a: jax.Array, block: int):
    """The pieces of segsum(a) on a two-level split of the last axis into blocks of `block`:

        i in block I, j in block J < I:  sum = upto[I, i] + between[I, J] + after[J, j]
            upto    = a in I at positions <= i
            between = totals of the blocks J < M < I (-inf where J >= I)
            after   = a in J at positions > j
        i, j in the same block:          within[I, i, j], a masked cumsum inside the block

    Every piece is a direct sum of same-sign terms (dA <= 0): nothing cancels."""
    nb = -(-a.shape[-1] // block)
    a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, nb * block - a.shape[-1])])  # zeros change no sum
    a = a.reshape(*a.shape[:-1], nb, block)  # ... I i
    within = _segsum_masked(a)  # ... I i j
    upto = jnp.cumsum(a, axis=-1)
    rev = jnp.flip(jnp.cumsum(jnp.flip(a, -1), axis=-1), -1)  # sum at positions >= j
    after = jnp.concatenate([rev[..., 1:], jnp.zeros_like(rev[..., :1])], axis=-1)
    between = _segsum_masked(upto[..., -1])  # ... I J : totals of blocks J < M <= I
    lead = a.shape[:-2]
    between = jnp.concatenate(  # shift to J < M < I
        [jnp.full((*lead, 1, nb), -jnp.inf, a.dtype), between[..., :-1, :]], axis=-2)
    return within, upto, between, after


def _assemble(within, cross, q):
    """The (q, q) matrix from its same-block part within (... I i j) and cross (... I i J j)."""
    *lead, nb, s, _, _ = cross.shape
    same_block = jnp.broadcast_to(jnp.eye(nb, dtype=bool)[:, None, :, None], cross.shape)
    out = jnp.where(same_block, jnp.broadcast_to(within[..., :, :, None, :], cross.shape), cross)
    return out.reshape(*lead, nb * s, nb * s)[..., :q, :q]


def segsum(a: jax.Array, block: int = 16) -> jax.Array:
    """segsum(a)[..., i, j] = sum_{k=j+1..i} a[..., k] for i >= j, -inf above the diagonal.

    Never cumsum[i] - cumsum[j]: that difference cancels catastrophically when the cumulative decay
    is large and the segment short (docs/porting-bugs.md #10). Every entry here is a direct sum of
    same-sign terms (dA <= 0), so nothing cancels. A masked cumsum over the whole q x q grid does
    the same but costs O(q^2 log q) per chunk; instead q is split in blocks (`_two_level`)."""
    q = a.shape[-1]
    if q <= block:
        return _segsum_masked(a)
    within, upto, between, after = _two_level(a, block)
    cross = (upto[..., :, :, None, None] + between[..., :, None, :, None]
             + after[..., None, None, :, :])
    return _assemble(within, cross, q)


def decay_matrix(a: jax.Array, block: int = 16) -> jax.Array:
    """exp(segsum(a)), built as a product of exps of segsum's direct sums: exp(upto) * exp(between)
    * exp(after) across blocks, exp(within) inside one. Each factor is exp of a same-sign sum, so
    the product is as accurate as exp(segsum) (a few ulp), and it is faster: XLA:CPU evaluated exp
    over segsum's broadcast (q, q) grid at 2.1 ms per 130m layer, the product at 0.2 ms."""
    q = a.shape[-1]
    if q <= block:
        return jnp.exp(_segsum_masked(a))
    within, upto, between, after = _two_level(a, block)
    cross = ((jnp.exp(upto)[..., :, :, None, None] * jnp.exp(between)[..., :, None, :, None])
             * jnp.exp(after)[..., None, None, :, :])
    return _assemble(jnp.exp(within), cross, q)


# ---------------------------------------------------------------------------------------------
# the four forms


SUB_BLOCK = 64
"""Inside a chunk, ssd_chunked evaluates the quadratic term in sub-blocks of at most this many
positions. Measured on the 2-core CPU (130m shapes, l=512, chunk 256): one 256 x 256 decay matrix
per head and chunk cost 29 ms per layer, sub-blocks of 64 cost 12 ms; the decay matrix and its
batched matmul are where XLA:CPU spends the time."""


UNROLL_CHUNKS = 16
"""Up to this many chunks, ssd_chunked passes the state from chunk to chunk in an unrolled loop;
beyond it, in a lax.scan (compile time stays bounded for long sequences). The unrolled loop saved
XLA:CPU's while-loop copies of the carried state (~1 ms per 130m layer at l=512)."""


def ssd_chunked(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                dt_softplus=False, dt_limit=DEFAULT_DT_LIMIT, return_final_states=False):
    """Chunked SSD: the quadratic ("attention") form inside each chunk, the state passed from chunk
    to chunk. Any length l (the tail is padded with dt = 0, which neither decays nor feeds the
    state) and any chunk_size >= 1.

    The same sum as mamba_ssm `ssd_minimal_discrete`, grouped for speed: each chunk of q positions
    is cut into sub-blocks of s = min(q, SUB_BLOCK) (the chunk padded to a multiple of s with dt = 0).
    A position sees its own sub-block through the masked quadratic form, and every earlier sub-block
    of its chunk through that sub-block's end state; chunk_size still fixes the sequential part (the
    state entering each chunk, and the final state). Every decay is exp of a direct sum of same-sign
    terms, or a product of such exps: nothing is a difference of cumulative sums
    (docs/porting-bugs.md #10)."""
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ShapeError(f"chunk_size: expected an int >= 1, got {chunk_size!r}")
    s_in = _prepare(x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus, dt_limit)
    b, l, g, r, p = s_in.x.shape
    n = s_in.B.shape[-1]
    if l == 0:
        raise ShapeError("x: expected l (length) >= 1, got l=0")
    q = min(chunk_size, l)
    c = math.ceil(l / q)
    s = min(q, SUB_BLOCK)
    k = math.ceil(q / s)  # sub-blocks per chunk
    K = c * k

    def blocks(a):  # b l ... -> b K s ...: chunks padded to k * s, cut into sub-blocks
        a = jnp.pad(a, [(0, 0), (0, c * q - l)] + [(0, 0)] * (a.ndim - 2))
        a = a.reshape(b, c, q, *a.shape[2:])
        a = jnp.pad(a, [(0, 0), (0, 0), (0, k * s - q)] + [(0, 0)] * (a.ndim - 3))
        return a.reshape(b, K, s, *a.shape[3:])

    X = blocks(s_in.x * s_in.dt[..., None])  # b K s g r p   (token-major)
    Bb, Cb = blocks(s_in.B), blocks(s_in.C)  # b K s g n
    dA = jnp.transpose(blocks(s_in.dt * s_in.A), (0, 3, 4, 1, 2))  # b g r K s
    upto = jnp.cumsum(dA, axis=-1)  # decay from the sub-block start to each position, inclusive
    rev = jnp.flip(jnp.cumsum(jnp.flip(dA, -1), axis=-1), -1)
    after = jnp.concatenate([rev[..., 1:], jnp.zeros_like(rev[..., :1])], axis=-1)  # to its end, exclusive
    token_major = lambda a: jnp.transpose(a, (0, 3, 4, 1, 2))[..., None]  # noqa: E731 b g r K s -> b K s g r 1

    # 1. within a sub-block: the masked quadratic form, per head (head-major: one matmul per block)
    L = decay_matrix(dA)  # b g r K s j: exp(segsum(dA))
    CB = jnp.einsum("bKsgn,bKjgn->bgKsj", Cb, Bb)
    Y_diag = jnp.einsum("bgrKsj,bgrKjp->bgrKsp", CB[:, :, None] * L, jnp.transpose(X, (0, 3, 4, 1, 2, 5)))

    # 2. each sub-block's own end state, in the cache's layout (b K g r p n): no transpose at the end
    S = jax.lax.dot_general(X * jnp.exp(token_major(after)), Bb,
                            (((2,), (2,)), ((0, 1, 3), (0, 1, 3))))  # b K g r p n

    # 3. sub-block to sub-block inside a chunk: own[i] = the state after sub-blocks < i of this chunk
    #    from their inputs alone, start[i] = the decay from the chunk start (k is static: unrolled)
    S = S.reshape(b, c, k, g, r, p, n)
    decay = jnp.exp(jnp.transpose(upto[..., -1].reshape(b, g, r, c, k), (0, 3, 4, 1, 2)))
    decay = decay[..., None, None]  # b c k g r 1 1
    own, start = [jnp.zeros_like(S[:, :, 0])], [jnp.ones_like(decay[:, :, 0])]
    for i in range(k):
        own.append(decay[:, :, i] * own[-1] + S[:, :, i])
        start.append(decay[:, :, i] * start[-1])

    # 4. chunk to chunk: the only sequential part, O(c) steps
    h0 = _initial_state(initial_states, b, g, r, p, n)  # b g r p n

    def carry_state(state, inp):  # -> (the state after this chunk, the state entering it)
        chunk_decay, chunk_own = inp
        return chunk_decay * state + chunk_own, state

    if c <= UNROLL_CHUNKS:  # a Python loop: no while loop, no copies of the carried state
        entering, final = [], h0
        for i in range(c):
            final, before = carry_state(final, (start[k][:, i], own[k][:, i]))
            entering.append(before)
        entering = jnp.stack(entering, axis=1)  # b c g r p n
    else:
        final, entering = jax.lax.scan(
            carry_state, h0, (jnp.moveaxis(start[k], 1, 0), jnp.moveaxis(own[k], 1, 0)))
        entering = jnp.moveaxis(entering, 0, 1)  # b c g r p n
    H = jnp.stack([own[i] + start[i] * entering for i in range(k)], axis=2)  # b c k g r p n

    # 5. the state entering each sub-block -> its outputs, decayed to each position. dot_general
    #    with C first keeps the output token-major (an einsum may swap the operands, and XLA then
    #    transposes H and the output: 3 ms per layer at 130m shapes). States stay (r p n) throughout:
    #    an n-major state made XLA:CPU transpose the final state for the cache inside the fused
    #    recurrence, 2.2 ms per 130m layer; X's transpose for step 2 costs 0.8 ms
    Y_off = jax.lax.dot_general(jnp.swapaxes(Cb, 2, 3), H.reshape(b, K, g, r * p, n),
                                (((4,), (4,)), ((0, 1, 2), (0, 1, 2))))  # b K g s (r p)
    Y_off = jnp.swapaxes(Y_off, 2, 3).reshape(b, K, s, g, r, p) * jnp.exp(token_major(upto))
    y = Y_off + jnp.transpose(Y_diag, (0, 3, 4, 1, 2, 5))  # b K s g r p
    y = y.reshape(b, c, k * s, g * r, p)[:, :, :q].reshape(b, c * q, g * r, p)[:, :l]
    y = _skip_and_gate(y, x, D, z, s_in.out_dtype)
    if return_final_states:
        return y, final.reshape(b, g * r, p, n)
    return y


def ssd_step(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
             dt_limit=DEFAULT_DT_LIMIT):
    """One recurrent step: the O(1) decode update. Returns (y, new_state).

    Mirrors mamba_ssm `selective_state_update_ref` with Mamba-2's tied layouts: x (b, h, p),
    dt (b, h), A (h,), B and C (b, g, n), state (b, h, p, n) in float32."""
    s = _prepare(x, dt, A, B, C, D, z, dt_bias, state, dt_softplus, dt_limit, step=True)
    b, g, r, p = s.x.shape
    n = s.B.shape[-1]
    h = _initial_state(state, b, g, r, p, n)
    decay = jnp.exp(s.dt * s.A)  # b g r
    h = decay[..., None, None] * h + jnp.einsum("bgr,bgrp,bgn->bgrpn", s.dt, s.x, s.B)
    h = h.reshape(b, g * r, p, n)
    return ssd_readout(h, x, C, D, z), h


def ssd_readout(state, x, C, D=None, z=None):
    """The output y of one position from the state that already holds its input: y = C . state
    (+ D x, gated by z). ssd_step's output; applied to ssd_chunked's final state it gives the last
    position's y without the rest (the port's prefill needs no other: see model.forward).
    state (b, h, p, n) float32, x (b, h, p), C (b, g, n)."""
    _validate(x, None, None, None, C, D, z, None, state, step=True)
    b, h, p, n = state.shape
    g = C.shape[-2]
    y = jnp.einsum("bgrpn,bgn->bgrp", state.reshape(b, g, h // g, p, n), C.astype(jnp.float32))
    return _skip_and_gate(y.reshape(b, h, p), x, D, z, x.dtype)


def ssd_scan(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None, dt_softplus=False,
             dt_limit=DEFAULT_DT_LIMIT, return_final_states=False):
    """Sequential recurrence over l with lax.scan: ssd_step applied token by token."""
    _validate(x, dt, A, B, C, D, z, dt_bias, initial_states, step=False)
    b, l, h, p = x.shape
    n = B.shape[-1]
    if l == 0:
        raise ShapeError("x: expected l (length) >= 1, got l=0")
    h0 = (jnp.zeros((b, h, p, n), jnp.float32) if initial_states is None
          else initial_states.astype(jnp.float32))
    t_first = lambda a: None if a is None else jnp.moveaxis(a, 1, 0)  # noqa: E731

    def step(state, inp):
        xt, dtt, Bt, Ct, zt = inp
        y, state = ssd_step(state, xt, dtt, A, Bt, Ct, D=D, z=zt, dt_bias=dt_bias,
                            dt_softplus=dt_softplus, dt_limit=dt_limit)
        return state, y

    final, ys = jax.lax.scan(step, h0, (t_first(x), t_first(dt), t_first(B), t_first(C), t_first(z)))
    y = jnp.moveaxis(ys, 0, 1)
    return (y, final) if return_final_states else y


def ssd_quadratic(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None,
                  dt_softplus=False, dt_limit=DEFAULT_DT_LIMIT, return_final_states=False):
    """The masked "attention" form: y = (C B^T o exp(segsum(dA))) (x dt), one l x l matrix.

    O(l^2) memory: a check of the duality, not a production path."""
    s = _prepare(x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus, dt_limit)
    b, l, g, r, p = s.x.shape
    n = s.B.shape[-1]
    if l == 0:
        raise ShapeError("x: expected l (length) >= 1, got l=0")
    X = s.x * s.dt[..., None]  # b l g r p
    dA = jnp.moveaxis(s.dt * s.A, 1, -1)  # b g r l
    L = jnp.exp(segsum(dA))  # b g r l s
    CB = jnp.einsum("blgn,bsgn->bgls", s.C, s.B)
    y = jnp.einsum("bgls,bgrls,bsgrp->blgrp", CB, L, X)
    h0 = _initial_state(initial_states, b, g, r, p, n)
    decay_from_start = jnp.exp(jnp.cumsum(dA, axis=-1))  # b g r l
    y = y + jnp.einsum("blgn,bgrpn,bgrl->blgrp", s.C, h0, decay_from_start)
    y = _skip_and_gate(y.reshape(b, l, g * r, p), x, D, z, s.out_dtype)
    if not return_final_states:
        return y
    decay_to_end = L[..., -1, :]  # b g r s
    final = (jnp.exp(jnp.sum(dA, axis=-1))[..., None, None] * h0
             + jnp.einsum("bsgn,bgrs,bsgrp->bgrpn", s.B, decay_to_end, X))
    return y, final.reshape(b, g * r, p, n)
