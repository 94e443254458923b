"""The Mamba-2 forward in pure JAX: params are a pytree of arrays (equiv/mamba2/convert.py), layers
a Python loop over per-layer dicts (unrolled under jit: a lax.scan over stacked weights measured
~1.7x slower per decode step on CPU, its dynamic slices copy each layer's weights), the SSD is
equiv.mamba2.ssd.ssd_chunked. Mirrors transformers `Mamba2ForCausalLM` (torch path) op for op, including
where it casts, so that bf16 runs are comparable too.

Every function here is pure and jit-compatible; equiv/mamba2/port.py jits them and checks inputs.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from equiv.kblock import MATMUL_K_BLOCK, Rows, cut_columns, rows_dot, split_k  # noqa: F401 - the weight layout
from equiv.mamba2.config import Mamba2Config
from equiv.mamba2.ssd import ssd_chunked, ssd_readout, ssd_step

f32 = jnp.float32


class Cache(NamedTuple):
    """Decode state, stacked over layers: O(1) in the sequence length.

    conv: (L, b, k-1, conv_dim) the last k-1 conv inputs (model dtype).
    ssm:  (L, b, h, p, n) the SSM state, always float32 (docs/porting-bugs.md #9)."""

    conv: jax.Array
    ssm: jax.Array


def empty_cache(cfg: Mamba2Config, batch: int, dtype) -> Cache:
    return Cache(jnp.zeros((cfg.n_layers, batch, cfg.conv_kernel - 1, cfg.conv_dim), dtype),
                 jnp.zeros((cfg.n_layers, batch, cfg.n_heads, cfg.head_dim, cfg.d_state), f32))


# ---------------------------------------------------------------------------------------------
# building blocks


def k_spans(w) -> tuple[tuple[int, int], ...] | None:
    """The (start, stop) columns of x that `linear` contracts with each K-block of w; None for an
    unsplit w. Static: the norms take it to produce their output already in blocks."""
    if not isinstance(w, (tuple, list)):
        return None
    stops = [0]
    for block in w:
        stops.append(stops[-1] + block.shape[0])
    return tuple(zip(stops[:-1], stops[1:], strict=True))


def whole(x):
    """An activation produced in column blocks (a tuple), as one array: for taps."""
    return jnp.concatenate(x, axis=-1) if isinstance(x, tuple) else x


def linear(x, w, b=None):
    """x @ w (+ b). `w` is the (K, N) array; or a tuple of K-blocks (equiv/kblock.py says when the port
    stores which form, and why): one dot per block, summed in order; or `Rows`, the (N, K) weight:
    one dot over its last axis, the einsum's dot_general arguments otherwise. `x` is an array, or
    already a tuple of column blocks matching w's (`k_spans`). Without blocks, trained-bytes fails
    the budget on CPU (2.81x at layers.3.mixer.ssm, accumulated mode). The x blocks are best produced by
    the norm that computes x (rms_norm / gated_rms_norm with spans): slicing a finished x copies it,
    and the 130m prefill measured 0.20 s slower for it (1.07 s against 0.88 s unsplit); produced in
    blocks the split dots cost what one dot costs. Precision comes from the caller's
    jax.default_matmul_precision scope."""
    if isinstance(w, Rows):
        y = rows_dot(whole(x), w.w)
    elif isinstance(w, (tuple, list)):
        if not isinstance(x, tuple):
            x = tuple(x[..., start:stop] for start, stop in k_spans(w))
        y = None
        for xb, block in zip(x, w, strict=True):
            part = jnp.einsum("...i,io->...o", xb, block)
            y = part if y is None else y + part
    else:
        y = jnp.einsum("...i,io->...o", whole(x), w)
    return y if b is None else y + jnp.broadcast_to(b, y.shape)


def silu(x):
    """x * sigmoid(x) written as x / (1 + exp(-x)): XLA:CPU materialises the result of a divide once
    rather than re-computing its (cheap) operand inside every consumer; jax.nn.silu ends in a multiply,
    and the causal conv feeding it was re-computed in three fusions. As accurate (RMS vs float64 4.2e-8,
    torch's 4.2e-8); exp(-x) overflowing to inf gives -0.0 = the limit."""
    return x / (1.0 + jnp.exp(-x))


def rms_norm(x, w, eps, spans=None):
    """Mirrors transformers `Mamba2RMSNorm`: normalise in float32, cast back, then scale. With
    `spans`, the output comes as a tuple of those column blocks (see `linear`), bit for bit the same."""
    xf = x.astype(f32)
    scale = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if spans is None:
        return jnp.broadcast_to(w, x.shape) * (xf * scale).astype(x.dtype)
    parts = ((xf[..., a:b] * scale).astype(x.dtype) for a, b in spans)
    return tuple(jnp.broadcast_to(w[a:b], v.shape) * v for (a, b), v in zip(spans, parts, strict=True))


def gated_rms_norm(y, z, w, eps, n_groups, spans=None):
    """Mirrors transformers `MambaRMSNormGated` with norm_before_gate=False: gate first, then
    normalise each group of d_inner / g channels separately (docs/porting-bugs.md #2 and #3). With
    `spans`, the output comes as a tuple of those column blocks, bit for bit the same."""
    yf = y.astype(f32) * silu(z.astype(f32))
    *lead, e = yf.shape
    grouped = yf.reshape(*lead, n_groups, e // n_groups)
    scale = jax.lax.rsqrt(jnp.mean(grouped * grouped, axis=-1, keepdims=True) + eps)
    if spans is None:
        return jnp.broadcast_to(w, y.shape) * (grouped * scale).reshape(*lead, e).astype(y.dtype)
    scale = jnp.broadcast_to(scale, grouped.shape).reshape(*lead, e)  # per channel: fused, not stored
    parts = ((yf[..., a:b] * scale[..., a:b]).astype(y.dtype) for a, b in spans)
    return tuple(jnp.broadcast_to(w[a:b], v.shape) * v for (a, b), v in zip(spans, parts, strict=True))


def causal_conv(xBC, w, b, conv_state):
    """Depthwise causal conv1d + bias + SiLU over (b, l, c), continuing from `conv_state`
    (b, k-1, c) = the previous k-1 inputs (zeros at the start). Mirrors `causal_conv1d_fn`.
    Returns (out (b, l, c), new conv_state)."""
    k = w.shape[0]
    l = xBC.shape[1]
    window = jnp.concatenate([conv_state.astype(xBC.dtype), xBC], axis=1)  # b (k-1+l) c
    out = sum(window[:, j:j + l] * jnp.broadcast_to(w[j], xBC.shape) for j in range(k))
    if b is not None:
        out = out + jnp.broadcast_to(b, out.shape)
    return silu(out), window[:, l:]


def _masked(x, mask):
    """Zero padded positions (mirrors `apply_mask_to_padding_states`, docs/porting-bugs.md #6)."""
    if isinstance(x, tuple):
        return tuple(_masked(xb, mask) for xb in x)
    return x if mask is None else x * jnp.broadcast_to(mask[..., None], x.shape).astype(x.dtype)


def _split(a, sizes):
    out, start = [], 0
    for s in sizes:
        out.append(a[..., start:start + s])
        start += s
    return out


def _ssd_args(cfg: Mamba2Config, lp):
    return dict(D=lp["D"], dt_bias=lp["dt_bias"], dt_softplus=True, dt_limit=cfg.time_step_limit)


# ---------------------------------------------------------------------------------------------
# the sub-ops of one block, separately callable (the isolated mode feeds each its own inputs)


def mixer_in_proj(cfg, lp, normed, mask):
    return linear(_masked(normed, mask), lp["in_proj"], lp.get("in_proj_bias"))  # b l in_dim


def _xbc_dt(cfg, zxbcdt):
    """xBC and dt: the in_proj output's last conv_dim + n_heads columns. Taken from the end, so the
    projection may come with or without the gate z in front (see mixer_last_position)."""
    h = cfg.n_heads
    return zxbcdt[..., -(cfg.conv_dim + h):-h], zxbcdt[..., -h:]


def _x_b_c(cfg, conv_out):
    """The conv output (..., conv_dim) split into the SSD's x (..., h, p), B and C (..., g, n)."""
    g, n = cfg.n_groups, cfg.d_state
    x, B, C = _split(conv_out, (cfg.d_inner, g * n, g * n))
    lead = conv_out.shape[:-1]
    return x.reshape(*lead, cfg.n_heads, cfg.head_dim), B.reshape(*lead, g, n), C.reshape(*lead, g, n)


def mixer_conv(cfg, lp, zxbcdt, mask, conv_state):
    xBC, _ = _xbc_dt(cfg, zxbcdt)
    out, new_state = causal_conv(xBC, lp["conv_w"], lp.get("conv_b"), conv_state)
    return _masked(out, mask), new_state  # b l conv_dim


def mixer_ssm(cfg, lp, zxbcdt, conv_out, ssm_state, chunk_size):
    b, l, _ = conv_out.shape
    _, dt = _xbc_dt(cfg, zxbcdt)
    x, B, C = _x_b_c(cfg, conv_out)
    A = -jnp.exp(lp["A_log"].astype(f32))
    y, final = ssd_chunked(x, dt, A, B, C, chunk_size, initial_states=ssm_state,
                           return_final_states=True, **_ssd_args(cfg, lp))
    return y.reshape(b, l, cfg.d_inner), final  # b l e


def mixer_last_position(cfg, lp, normed, mask, conv_state, ssm_state, chunk_size):
    """The mixer when only the last position goes on (a prefill that returns the last logits):
    -> (its gated norm input y (b, 1, e), z (b, 1, e), the new conv and SSM states).

    The conv and the SSD still run over every position, since the cache covers them all, but the
    gate z is projected for the last position only, and y is read out of the SSD's final state
    (equiv.mamba2.ssd.ssd_readout), so the SSD's outputs at the other positions are never computed."""
    d = cfg.d_inner
    masked = _masked(normed, mask)
    w, bias = lp["in_proj"], lp.get("in_proj_bias")

    def columns(start, stop):  # in_proj (weight, bias) restricted to these output columns
        return cut_columns(w, start, stop), None if bias is None else bias[..., start:stop]

    xbcdt = linear(masked, *columns(d, None))
    last = tuple(m[:, -1:] for m in masked) if isinstance(masked, tuple) else masked[:, -1:]
    z = linear(last, *columns(0, d))
    conv_out, conv_state = mixer_conv(cfg, lp, xbcdt, mask, conv_state)
    _, ssm_state = mixer_ssm(cfg, lp, xbcdt, conv_out, ssm_state, chunk_size)  # its y is unused: dropped
    x, _, C = _x_b_c(cfg, conv_out[:, -1])
    y = ssd_readout(ssm_state, x, C, lp["D"])
    return y.reshape(conv_out.shape[0], 1, d), z, conv_state, ssm_state


def mixer_gated_norm(cfg, lp, zxbcdt, y, spans=None):
    z = zxbcdt[..., :cfg.d_inner]
    return gated_rms_norm(y, z, lp["gnorm"], cfg.norm_eps, cfg.n_groups, spans=spans)


def mixer_out_proj(cfg, lp, gated):
    return linear(gated, lp["out_proj"], lp.get("out_proj_bias"))


def block_norm(cfg, lp, hidden, spans=None):
    return rms_norm(hidden.astype(lp["norm"].dtype), lp["norm"], cfg.norm_eps, spans=spans)


def block_residual(cfg, hidden, mixer_out):
    residual = hidden.astype(f32) if cfg.residual_in_fp32 else hidden
    return residual + mixer_out


# ---------------------------------------------------------------------------------------------
# whole model


def embed(params, ids):
    # mode="fill" with NaN: an out-of-range id poisons its logits instead of being clamped to the
    # last row silently (JAX's default for gathers), also inside jit where we cannot raise.
    return jnp.take(params["embed"], ids, axis=0, mode="fill", fill_value=jnp.nan)


def lm_logits(cfg, params, hidden_normed):
    if cfg.tie_embeddings:  # contract with the (v, d) embedding as stored: a transposed copy of
        emb = params["embed"]  # the whole table per decode step would cost more than the matvec
        return jnp.einsum("...d,vd->...v", hidden_normed.astype(emb.dtype), emb)
    return linear(hidden_normed.astype(params["lm_head"].dtype), params["lm_head"])


def forward(params, cfg: Mamba2Config, ids, mask=None, cache: Cache | None = None, *,
            taps: bool = False, last_logits_only: bool = False, chunk_size: int | None = None):
    """ids (b, l) -> (logits, cache, taps).

    Continues from `cache` when given (chunked prefill: the conv window and the SSM state carry
    over, docs/porting-bugs.md #5 and #7). logits are (b, l, v), or (b, v) for the last position only
    when `last_logits_only` (prefill needs no more). `taps` is {} unless taps=True; then it holds
    every canonical tap of equiv/mamba2/taps.py (nothing extra is computed otherwise)."""
    chunk_size = chunk_size or cfg.chunk_size
    b = ids.shape[0]
    hidden = embed(params, ids)
    if cache is None:
        cache = empty_cache(cfg, b, params["embed"].dtype)

    conv_buf, ssm_buf, tap_dict = cache.conv, cache.ssm, {}
    if taps:
        tap_dict["embed"] = hidden
    for i, lp in enumerate(params["layers"]):
        normed = block_norm(cfg, lp, hidden, spans=k_spans(lp["in_proj"]))  # in blocks: see linear
        if last_logits_only and not taps and i == len(params["layers"]) - 1:
            # only the last position goes on to the logits: its gate, SSD output, gated norm and
            # out_proj are one position's (130m prefill 1-3% faster, two interleaved runs of 21);
            # the cache still covers every position
            y, zxbcdt, conv_state, ssm_state = mixer_last_position(
                cfg, lp, normed, mask, cache.conv[i], cache.ssm[i], chunk_size)
            hidden = hidden[:, -1:]
        else:
            zxbcdt = mixer_in_proj(cfg, lp, normed, mask)
            conv_out, conv_state = mixer_conv(cfg, lp, zxbcdt, mask, cache.conv[i])
            y, ssm_state = mixer_ssm(cfg, lp, zxbcdt, conv_out, cache.ssm[i], chunk_size)
        gated = mixer_gated_norm(cfg, lp, zxbcdt, y, spans=k_spans(lp["out_proj"]))
        out = mixer_out_proj(cfg, lp, gated)
        hidden = block_residual(cfg, hidden, out)
        # into the stacked cache in place: the state's last fusion writes its slice (stacking a
        # list copied every layer's state again; 130m prefill 1-2% faster, 4 interleaved runs)
        conv_buf = conv_buf.at[i].set(conv_state)
        ssm_buf = ssm_buf.at[i].set(ssm_state)
        if taps:
            t = f"layers.{i}"
            tap_dict |= {f"{t}.norm": whole(normed), f"{t}.mixer.in_proj": zxbcdt,
                         f"{t}.mixer.conv": conv_out, f"{t}.mixer.ssm": y,
                         f"{t}.mixer.gated_norm": whole(gated), f"{t}.mixer.out_proj": out, t: hidden}
    normed = rms_norm(hidden, params["norm_f"], cfg.norm_eps)
    logits = lm_logits(cfg, params, normed[:, -1] if last_logits_only else normed)
    if taps:
        tap_dict |= {"norm_f": normed, "logits": logits}
    return logits, Cache(conv_buf, ssm_buf), tap_dict


def decode_step(params, cfg: Mamba2Config, cache: Cache, tokens):
    """One token per sequence, tokens (b,) -> (logits (b, v), cache). Constant work per token:
    independent of the position and of chunk_size (no padding of one token to a chunk)."""
    hidden = embed(params, tokens)  # b d
    h, p = cfg.n_heads, cfg.head_dim
    b = tokens.shape[0]
    convs, ssms = [], []
    for i, lp in enumerate(params["layers"]):
        normed = block_norm(cfg, lp, hidden, spans=k_spans(lp["in_proj"]))
        zxbcdt = linear(normed, lp["in_proj"], lp.get("in_proj_bias"))  # b in_dim
        z, xBC, dt = _split(zxbcdt, (cfg.d_inner, cfg.conv_dim, h))
        conv_out, conv_state = causal_conv(xBC[:, None], lp["conv_w"], lp.get("conv_b"), cache.conv[i])
        x, B, C = _x_b_c(cfg, conv_out[:, 0])
        A = -jnp.exp(lp["A_log"].astype(f32))
        y, ssm_state = ssd_step(cache.ssm[i], x, dt, A, B, C, **_ssd_args(cfg, lp))
        gated = gated_rms_norm(y.reshape(b, h * p), z, lp["gnorm"], cfg.norm_eps, cfg.n_groups,
                               spans=k_spans(lp["out_proj"]))
        out = linear(gated, lp["out_proj"], lp.get("out_proj_bias"))
        hidden = block_residual(cfg, hidden, out)
        convs.append(conv_state)
        ssms.append(ssm_state)
    logits = lm_logits(cfg, params, rms_norm(hidden, params["norm_f"], cfg.norm_eps))
    # stacked, not written into the carried cache in place (.at[i].set, as forward does): in the
    # decode loop in-place writes measured slower on both backends (CPU 130m fp32 ~3% a step; H200
    # bf16 130m 0.555 against 0.477 ms, 2.7b 2.658 against 2.560 ms: XLA copies the carried state)
    return logits, Cache(jnp.stack(convs), jnp.stack(ssms))
