"""Deliberately broken variants of the built-in port, one per row of known-bugs.md, built without
editing the port: `PlantedModel` wraps a loaded `Mamba2Model` and, for the duration of each of its
calls, swaps functions of equiv.mamba2.model / equiv.ssd for broken ones.

How a variant runs: the port's own code paths (`Mamba2Model.forward`, `forward_isolated`,
`step_logits`, `model.forward` with a cache) run un-jitted, and each sub-op they call
(`block_norm`, `mixer_in_proj`, `mixer_conv`, `mixer_ssm`, ..., `decode_step`) is jitted on its own.
Why: one whole-forward compile costs ~5 s on the 2-core CI box (nearly all of it the SSD), and
there are ~25 variants. Sub-ops a defect does not touch use one shared, correct jit per shape; a
sub-op that calls a broken function gets a fresh jit of a clone (jax caches traces per function
*object*: re-jitting the same function reuses its stale trace, measured), traced under the swap.
`_CALLERS` says which sub-ops call which function; if it is wrong the broken function is reached
while a shared op traces, and that raises instead of poisoning the shared cache. Every broken
function counts its traces (`PlantedModel.traced`), so a test asserts the defect really ran.

Also here: a float64 numpy Mamba-2 forward (the oracle for checkpoints the torch reference cannot
load, row 8) and builders of the two checkpoints the tests write to tmp_path (rows 8 and 10).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import types
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from equiv import ssd
from equiv.mamba2 import generate as gen
from equiv.mamba2 import model as m
from equiv.mamba2 import port as port_module
from equiv.mamba2.port import Mamba2Model

f32 = jnp.float32
_MODULES = (m, gen, port_module, ssd)  # every module that may hold a reference to a swapped function

# the correct functions, captured at import (a broken one calls these, never the swapped attribute)
_mixer_ssm, _mixer_conv, _mixer_in_proj = m.mixer_ssm, m.mixer_conv, m.mixer_in_proj
_gated_rms_norm, _linear, _decode_step, _ssd_args = m.gated_rms_norm, m.linear, m.decode_step, m._ssd_args
_ssd_chunked, _ssd_step, _causal_conv = ssd.ssd_chunked, ssd.ssd_step, m.causal_conv

# the sub-ops jitted one by one (model function -> static arguments)
OPS = {"block_norm": ("cfg",), "mixer_in_proj": ("cfg",), "mixer_conv": ("cfg",),
       "mixer_ssm": ("cfg", "chunk_size"), "mixer_gated_norm": ("cfg",), "mixer_out_proj": ("cfg",),
       "block_residual": ("cfg",), "rms_norm": ("eps",), "lm_logits": ("cfg",), "decode_step": ("cfg",)}
# function a defect may replace -> the sub-ops whose trace calls it (read off equiv/mamba2/model.py)
_CALLERS = {
    "gated_rms_norm": ("mixer_gated_norm", "decode_step"),
    "linear": ("mixer_in_proj", "mixer_out_proj", "lm_logits", "decode_step"),
    "causal_conv": ("mixer_conv", "decode_step"),
    "_ssd_args": ("mixer_ssm", "decode_step"),
    "ssd_chunked": ("mixer_ssm",),
    "segsum": ("mixer_ssm",),
    "ssd_step": ("decode_step",),
}
_ORIGINAL_OPS = {name: getattr(m, name) for name in OPS}
_SHARED: dict[str, object] = {}  # op -> the correct op's jit, shared by every PlantedModel
_TRACING_SHARED: list[str] = []  # shared ops being traced right now (a broken function must not run there)


def _clone(f):
    """A new function object with f's code and globals: jax traces it afresh."""
    g = types.FunctionType(f.__code__, f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    g.__kwdefaults__ = f.__kwdefaults__
    return g


def _shared_op(name):
    if name not in _SHARED:
        jitted = jax.jit(_clone(_ORIGINAL_OPS[name]), static_argnames=OPS[name])

        @functools.wraps(_ORIGINAL_OPS[name])
        def guarded(*args, **kwargs):
            _TRACING_SHARED.append(name)
            try:
                return jitted(*args, **kwargs)
            finally:
                _TRACING_SHARED.pop()

        _SHARED[name] = guarded
    return _SHARED[name]


@dataclass(frozen=True)
class Defect:
    """Attributes: name. row: known-bugs.md row ('' for extras). overrides: ((module, attribute,
    broken function), ...). description: what is wrong, in one line."""

    name: str
    row: str
    overrides: tuple = ()
    description: str = ""


class PlantedModel(Mamba2Model):
    """A `LoadedModel` running `defect` (no overrides: the correct port, through the same path)."""

    def __init__(self, base: Mamba2Model, defect: Defect):
        super().__init__(base.cfg, base.params, base.dtype, base.source, base.format, base.precision)
        self.defect = defect
        self.traced: Counter = Counter()  # broken function name -> times traced
        broken = {attr: self._counted(attr, fn) for _, attr, fn in defect.overrides}
        unknown = sorted(set(broken) - set(OPS) - set(_CALLERS))
        if unknown:
            raise ValueError(f"planted overrides {unknown}: expected a sub-op {sorted(OPS)} or a function "
                             f"listed in _CALLERS {sorted(_CALLERS)}")
        fresh = {op for attr in broken for op in _CALLERS.get(attr, ())} | (set(broken) & set(OPS))
        ops = {}
        for name, static in OPS.items():
            if name not in fresh:
                ops[name] = _shared_op(name)
            else:
                ops[name] = jax.jit(broken[name] if name in broken else _clone(_ORIGINAL_OPS[name]),
                                    static_argnames=static)
        unjitted = lambda f: f.__wrapped__  # noqa: E731  the port's jitted entry points, run eagerly
        # (home module, attribute) -> replacement, swapped wherever the original is referenced
        self._swaps = {(m, name): fn for name, fn in ops.items()}
        self._swaps |= {(home, attr): broken[attr] for home, attr, _ in defect.overrides if attr not in OPS}
        self._swaps |= {
            (port_module, "_forward_jit"): unjitted(port_module._forward_jit),
            (port_module, "_isolated_layer"): unjitted(port_module._isolated_layer),
            (gen, "prefill"): unjitted(gen.prefill),
            (gen, "decode_step_jit"): ops["decode_step"],
            (gen, "decode_loop"): jax.jit(_clone(gen.decode_loop.__wrapped__),
                                          static_argnames=("cfg", "max_new_tokens")),
        }

    def _counted(self, name, fn):
        @functools.wraps(fn)
        def broken(*args, **kwargs):
            if _TRACING_SHARED:
                raise RuntimeError(f"planted {name} reached while tracing the shared correct op "
                                   f"{_TRACING_SHARED[-1]}: list that op under {name!r} in _CALLERS")
            self.traced[name] += 1
            return fn(*args, **kwargs)
        return broken

    @contextlib.contextmanager
    def _planted(self):
        """Swap in the broken functions and the per-op jits wherever the originals are referenced."""
        swaps = [(mod, attr, new) for (home, attr), new in self._swaps.items()
                 for mod in _MODULES if getattr(mod, attr, None) is getattr(home, attr)]
        saved = [(mod, attr, getattr(mod, attr)) for mod, attr, _ in swaps]
        try:
            for mod, attr, new in swaps:
                setattr(mod, attr, new)
            with jax.default_matmul_precision(self.precision):
                yield
        finally:
            for mod, attr, old in reversed(saved):
                setattr(mod, attr, old)

    def forward(self, ids, mask=None, taps=True):
        with self._planted():
            return super().forward(ids, mask, taps)

    def forward_isolated(self, ids, mask, inputs):
        with self._planted():
            return super().forward_isolated(ids, mask, inputs)

    def step_logits(self, ids, mask, prompt_len):
        with self._planted():
            return super().step_logits(ids, mask, prompt_len)

    def generate(self, prompt, mask=None, max_new_tokens=32, eos_id=None):
        with self._planted():
            return super().generate(prompt, mask, max_new_tokens, eos_id)

    def continuation_logits(self, ids, split: int) -> np.ndarray:
        """Chunked prefill: `model.forward(ids[:, :split])`, then `model.forward(ids[:, split:],
        cache=...)` continuing from its cache; the logits of both calls joined, (b, l, v)."""
        ids, _ = self._check(ids, None)
        with self._planted():
            first, cache, _ = m.forward(self.params, self.cfg, jnp.asarray(ids[:, :split]))
            second, _, _ = m.forward(self.params, self.cfg, jnp.asarray(ids[:, split:]), cache=cache)
        return np.concatenate([np.asarray(first), np.asarray(second)], axis=1)


# ---------------------------------------------------------------------------------------------
# the broken functions, one per defect


def mixer_ssm_tiled_bc(cfg, lp, zxbcdt, conv_out, ssm_state, chunk_size):
    """Row 1: B/C expanded to heads with jnp.tile, so head j reads group j % g (not j // (h/g))."""
    b, l, _ = conv_out.shape
    g, n, h, p = cfg.n_groups, cfg.d_state, cfg.n_heads, cfg.head_dim
    dt = zxbcdt[..., cfg.d_inner + cfg.conv_dim:]
    x, B, C = m._split(conv_out, (cfg.d_inner, g * n, g * n))
    tile = lambda a: jnp.tile(a.reshape(b, l, g, n), (1, 1, h // g, 1))  # noqa: E731  b l h n
    y, final = ssd.ssd_chunked(x.reshape(b, l, h, p), dt, -jnp.exp(lp["A_log"].astype(f32)), tile(B), tile(C),
                               chunk_size, initial_states=ssm_state, return_final_states=True,
                               **m._ssd_args(cfg, lp))
    return y.reshape(b, l, h * p), final


def gated_norm_over_d_inner(y, z, w, eps, n_groups):
    """Row 2: one RMS over the whole d_inner (as if g = 1)."""
    return _gated_rms_norm(y, z, w, eps, 1)


def gated_norm_before_gate(y, z, w, eps, n_groups):
    """Row 3: normalise y per group first, then multiply by silu(z) (norm_before_gate=True)."""
    yf = y.astype(f32)
    *lead, e = yf.shape
    grouped = yf.reshape(*lead, n_groups, e // n_groups)
    grouped = grouped * jax.lax.rsqrt(jnp.mean(grouped * grouped, axis=-1, keepdims=True) + eps)
    out = grouped.reshape(*lead, e) * jax.nn.silu(z.astype(f32))
    return jnp.broadcast_to(w, y.shape) * out.astype(y.dtype)


def ssd_chunked_without_dt_limit(*args, dt_limit=None, **kwargs):
    """Row 4: the prefill path forgets time_step_limit."""
    return _ssd_chunked(*args, **kwargs)


def ssd_chunked_dt_limit_upper_only(*args, dt_limit=ssd.DEFAULT_DT_LIMIT, **kwargs):
    """Row 4: wrong bounds, (0, hi) instead of (lo, hi): the lower clamp is lost."""
    return _ssd_chunked(*args, dt_limit=(0.0, dt_limit[1]), **kwargs)


def ssd_step_without_dt_limit(*args, dt_limit=None, **kwargs):
    """Row 4: the decode step forgets time_step_limit (prefill still clamps)."""
    return _ssd_step(*args, **kwargs)


def mixer_ssm_zero_state(cfg, lp, zxbcdt, conv_out, ssm_state, chunk_size):
    """Row 5: a forward with a cache restarts the SSM from a zero state."""
    return _mixer_ssm(cfg, lp, zxbcdt, conv_out, jnp.zeros_like(ssm_state), chunk_size)


def mixer_conv_drops_window(cfg, lp, zxbcdt, mask, conv_state):
    """Row 5: a forward with a cache forgets the conv window (zeros instead of the last k-1 inputs)."""
    return _mixer_conv(cfg, lp, zxbcdt, mask, jnp.zeros_like(conv_state))


def mixer_in_proj_unmasked(cfg, lp, normed, mask):
    """Row 6: padded positions are not zeroed before in_proj."""
    return _mixer_in_proj(cfg, lp, normed, None)


def mixer_conv_unmasked(cfg, lp, zxbcdt, mask, conv_state):
    """Row 6: padded positions are not zeroed after the conv (they feed the SSM state)."""
    return _mixer_conv(cfg, lp, zxbcdt, None, conv_state)


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


def segsum_cumsum_difference(a, block=16):
    """Row 10: mamba2-jax 1.1.2's segsum, cs[i] - cs[j]: cancels when the cumulative decay is large."""
    cs = jnp.cumsum(a, axis=-1)
    q = a.shape[-1]
    grid = (*a.shape, q)
    diff = jnp.broadcast_to(cs[..., :, None], grid) - jnp.broadcast_to(cs[..., None, :], grid)
    return jnp.where(jnp.broadcast_to(jnp.tril(jnp.ones((q, q), bool)), grid), diff, -jnp.inf)


def round_to_tf32(x):
    """Round float32 to TF32 (10 explicit mantissa bits), nearest-even, as a GPU tensor core does."""
    u = jax.lax.bitcast_convert_type(x.astype(f32), jnp.uint32)
    lsb = (u >> 13) & jnp.uint32(1)
    u = (u + jnp.uint32(0xFFF) + lsb) & jnp.uint32(0xFFFFE000)
    return jax.lax.bitcast_convert_type(u, f32)


def linear_tf32(x, w, b=None):
    """Row 11: float32 matmuls run as TF32 (both operands rounded, float32 accumulation)."""
    w = tuple(round_to_tf32(blk) for blk in w) if isinstance(w, (tuple, list)) else round_to_tf32(w)
    return _linear(round_to_tf32(x), w, b)


def ssd_args_without_softplus(cfg, lp):
    """Extra: dt used raw, softplus forgotten."""
    return _ssd_args(cfg, lp) | {"dt_softplus": False}


def ssd_chunked_positive_a(x, dt, A, *args, **kwargs):
    """Extra: A = +exp(A_log) (the minus sign lost): the state grows instead of decaying."""
    return _ssd_chunked(x, dt, -A, *args, **kwargs)


def causal_conv_centered(xBC, w, b, conv_state):
    """Extra: 'same' padding instead of causal: position t sees inputs t+1 and t+2."""
    k, l = w.shape[0], xBC.shape[1]
    left = (k - 1) // 2
    window = jnp.pad(xBC, [(0, 0), (left, k - 1 - left), (0, 0)])
    out = sum(window[:, j:j + l] * jnp.broadcast_to(w[j], xBC.shape) for j in range(k))
    if b is not None:
        out = out + jnp.broadcast_to(b, out.shape)
    return jax.nn.silu(out), jnp.concatenate([conv_state.astype(xBC.dtype), xBC], axis=1)[:, l:]


DEFECTS = {d.name: d for d in (
    Defect("tiled_bc", "1", ((m, "mixer_ssm", mixer_ssm_tiled_bc),), "B/C expanded with tile"),
    Defect("gated_norm_over_d_inner", "2", ((m, "gated_rms_norm", gated_norm_over_d_inner),),
           "gated RMSNorm over d_inner, not per group"),
    Defect("norm_before_gate", "3", ((m, "gated_rms_norm", gated_norm_before_gate),), "norm before gate"),
    Defect("dt_limit_skipped_in_prefill", "4", ((m, "ssd_chunked", ssd_chunked_without_dt_limit),),
           "dt clamp skipped in prefill"),
    Defect("dt_limit_upper_only", "4", ((m, "ssd_chunked", ssd_chunked_dt_limit_upper_only),),
           "dt clamp with the wrong bounds (0, hi)"),
    Defect("dt_limit_skipped_in_decode", "4", ((m, "ssd_step", ssd_step_without_dt_limit),),
           "dt clamp skipped in decode_step"),
    Defect("continuation_zero_state", "5", ((m, "mixer_ssm", mixer_ssm_zero_state),),
           "forward with a cache restarts from a zero SSM state"),
    Defect("continuation_drops_conv_window", "5", ((m, "mixer_conv", mixer_conv_drops_window),),
           "forward with a cache drops the conv window"),
    Defect("padding_unmasked_before_in_proj", "6", ((m, "mixer_in_proj", mixer_in_proj_unmasked),),
           "left padding not masked before in_proj"),
    Defect("padding_unmasked_after_conv", "6", ((m, "mixer_conv", mixer_conv_unmasked),),
           "left padding not masked after the conv"),
    Defect("d_hdim_per_head_in_step", "8", ((m, "ssd_step", ssd_step_d_per_head),),
           "per-head-dim D read as per-head in the step"),
    Defect("bf16_ssm_state", "9", ((m, "decode_step", decode_step_bf16_state),),
           "bf16 SSM state in the cache"),
    Defect("segsum_cumsum_difference", "10", ((ssd, "segsum", segsum_cumsum_difference),),
           "segsum as a difference of cumulative sums"),
    Defect("tf32_matmuls", "11", ((m, "linear", linear_tf32),), "float32 matmuls rounded to TF32"),
    Defect("softplus_missing", "", ((m, "_ssd_args", ssd_args_without_softplus),), "dt softplus missing"),
    Defect("a_positive", "", ((m, "ssd_chunked", ssd_chunked_positive_a),), "A = +exp(A_log)"),
    Defect("conv_not_causal", "", ((m, "causal_conv", causal_conv_centered),), "conv with 'same' padding"),
)}


def decay_from_chunk_start(offset: int) -> Defect:
    return Defect(f"initial_state_decay_from_chunk_start@{offset}", "7",
                  ((m, "ssd_chunked", ssd_chunked_decay_from_chunk_start(offset)),),
                  "initial-state decay from the chunk start at an unaligned offset")


def plant(base: Mamba2Model, defect: Defect | str | None) -> PlantedModel:
    defect = DEFECTS[defect] if isinstance(defect, str) else defect or Defect("correct", "")
    return PlantedModel(base, defect)


# ---------------------------------------------------------------------------------------------
# float64 oracle and checkpoint builders


def numpy_forward_fp64(cfg, params, ids) -> np.ndarray:
    """Mamba-2 logits (b, l, v) in float64 numpy, token by token (the SSM as a plain recurrence):
    independent of both the port's SSD and transformers. Mirrors transformers `Mamba2Mixer.torch_forward`
    with D of shape (h,) or (h, p)."""
    P = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    e, g, n, h, p = cfg.d_inner, cfg.n_groups, cfg.d_state, cfg.n_heads, cfg.head_dim
    silu = lambda v: v / (1.0 + np.exp(-v))  # noqa: E731
    rms = lambda v, w: w * v / np.sqrt(np.mean(v * v, -1, keepdims=True) + cfg.norm_eps)  # noqa: E731
    hidden = P["embed"][ids]  # b l d
    b, l, _ = hidden.shape
    for lp in P["layers"]:
        dense = lambda w: np.concatenate(w) if isinstance(w, tuple) else w  # noqa: E731 - K-blocks
        zxbcdt = rms(hidden, lp["norm"]) @ dense(lp["in_proj"]) + lp.get("in_proj_bias", 0.0)
        z, xbc, dt = zxbcdt[..., :e], zxbcdt[..., e:e + cfg.conv_dim], zxbcdt[..., e + cfg.conv_dim:]
        window = np.concatenate([np.zeros((b, cfg.conv_kernel - 1, cfg.conv_dim)), xbc], axis=1)
        conv = silu(sum(window[:, j:j + l] * lp["conv_w"][j] for j in range(cfg.conv_kernel))
                    + lp.get("conv_b", 0.0))
        x = conv[..., :e].reshape(b, l, h, p)
        Bh, Ch = (np.repeat(conv[..., s].reshape(b, l, g, n), h // g, axis=2)  # b l h n
                  for s in (slice(e, e + g * n), slice(e + g * n, None)))
        dt = np.logaddexp(0.0, dt + lp["dt_bias"])  # softplus
        if tuple(cfg.time_step_limit) != (0.0, math.inf):
            dt = np.clip(dt, *cfg.time_step_limit)
        A = -np.exp(lp["A_log"])
        D = lp["D"] if lp["D"].ndim == 2 else lp["D"][:, None]  # h p
        state, ys = np.zeros((b, h, p, n)), []
        for t in range(l):
            state = (np.exp(dt[:, t] * A)[..., None, None] * state
                     + np.einsum("bh,bhp,bhn->bhpn", dt[:, t], x[:, t], Bh[:, t]))
            ys.append(np.einsum("bhpn,bhn->bhp", state, Ch[:, t]) + D * x[:, t])
        y = (np.stack(ys, 1) * silu(z).reshape(b, l, h, p)).reshape(b, l, g, e // g)
        gated = (y / np.sqrt(np.mean(y * y, -1, keepdims=True) + cfg.norm_eps)).reshape(b, l, e) * lp["gnorm"]
        hidden = hidden + gated @ dense(lp["out_proj"]) + lp.get("out_proj_bias", 0.0)
    normed = rms(hidden, P["norm_f"])
    return normed @ P["embed"].T if cfg.tie_embeddings else normed @ P["lm_head"]


def write_d_hdim_checkpoint(src: Path, out: Path, seed: int = 0) -> Path:
    """A mamba_ssm-format copy of a transformers-format fixture (config with ssm_cfg.D_has_hdim) whose
    D is (h * p,): the fixture's per-head D plus per-channel noise, head-major ("(h p)")."""
    from equiv.mamba2.config_file import load_config
    from equiv.mamba2.convert import _PREFIX
    from equiv.safetensors_io import read_safetensors, write_safetensors

    cfg, fmt = load_config(src)
    if fmt != "transformers" or not cfg.tie_embeddings:
        raise ValueError(f"expected a tied transformers-format fixture, got {fmt} "
                         f"(tied={cfg.tie_embeddings})")
    rng = np.random.default_rng(seed)
    tensors = {}
    for key, value in read_safetensors(src / "model.safetensors").items():
        if key == _PREFIX["transformers"][0]:
            key = _PREFIX["mamba_ssm"][0]
        if key.endswith("mixer.D"):
            value = (np.repeat(value, cfg.head_dim) + rng.uniform(-1.0, 1.0, cfg.d_inner)).astype(np.float32)
        tensors[key] = value
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "model.safetensors", tensors)
    lo, hi = cfg.time_step_limit
    config = {"d_model": cfg.d_model, "n_layer": cfg.n_layers, "vocab_size": cfg.vocab_size,
              "pad_vocab_size_multiple": 8, "tie_embeddings": True, "residual_in_fp32": cfg.residual_in_fp32,
              "rms_norm": True, "ssm_cfg": {
                  "layer": "Mamba2", "d_state": cfg.d_state, "d_conv": cfg.conv_kernel, "expand": cfg.expand,
                  "headdim": cfg.head_dim, "ngroups": cfg.n_groups, "chunk_size": cfg.chunk_size,
                  "bias": cfg.use_bias, "conv_bias": cfg.use_conv_bias, "D_has_hdim": True,
                  **({} if (lo, hi) == (0.0, math.inf) else {"dt_limit": [lo, hi]})}}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


def write_strong_decay_checkpoint(out: Path, seed: int = 2010) -> Path:
    """Row 10's model: transformers format, 1 layer, d 64, n 32, p 16, h 8, g 1, vocab 64, chunk 256,
    every head A in [-16, -1] and dt_bias ~ U(-1, 1), so A * dt reaches -10 per step and the
    cumulative decay over a chunk reaches the thousands (where cumsum differences cancel)."""
    import torch

    from reference.make_fixtures import TinySpec, build_model

    spec = TinySpec(name="strong-decay", seed=seed, overrides=dict(
        hidden_size=64, state_size=32, head_dim=16, num_heads=8, num_hidden_layers=1, vocab_size=64,
        chunk_size=256, n_groups=1))
    model = build_model(spec)
    rng = np.random.default_rng(seed)
    mixer = model.backbone.layers[0].mixer
    with torch.no_grad():
        mixer.A_log.copy_(torch.from_numpy(np.log(np.linspace(1.0, 16.0, 8))).float())
        mixer.dt_bias.copy_(torch.from_numpy(rng.uniform(-1.0, 1.0, 8)).float())
    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").unlink(missing_ok=True)
    return out
