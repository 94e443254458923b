"""The built-in port: the pure-JAX Mamba-2 behind the port protocol (equiv/ports.py).

All entry points check their inputs on the host (equiv/inputs.py) and run under an explicit
`jax.default_matmul_precision` ("highest" by default: on GPU JAX's default runs float32 matmuls as
TF32, docs/porting-bugs.md #11); the setting is recorded in `info()`.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import equiv
from equiv.errors import EquivError
from equiv.inputs import check_tokens
from equiv.kblock import for_backend, layout_details
from equiv.mamba2 import model as m
from equiv.mamba2.config import Mamba2Config
from equiv.mamba2.convert import load_checkpoint
from equiv.mamba2.footprint import dominant_term, forward_bytes
from equiv.mamba2.generate import decode_step_jit, generate, prefill
from equiv.mamba2.taps import tap_names
from equiv.ports import GenerateResult, PortInfo


@partial(jax.jit, static_argnames=("cfg", "taps"))
def _forward_jit(params, cfg, ids, mask, taps):
    logits, _, tap_dict = m.forward(params, cfg, ids, mask, taps=taps)
    return tap_dict if taps else {"logits": logits}


@partial(jax.jit, static_argnames=("cfg",))
def _isolated_layer(cfg, lp, layer_in, normed_in, in_proj_in, conv_in, ssm_in, gated_in, out_proj_in, mask):
    """Each sub-op of one block computed from the reference's own inputs to it."""
    zero_conv = jnp.zeros((layer_in.shape[0], cfg.conv_kernel - 1, cfg.conv_dim), in_proj_in.dtype)
    zero_ssm = jnp.zeros((layer_in.shape[0], cfg.n_heads, cfg.head_dim, cfg.d_state), jnp.float32)
    return {
        "norm": m.block_norm(cfg, lp, layer_in),
        "mixer.in_proj": m.mixer_in_proj(cfg, lp, normed_in, mask),
        "mixer.conv": m.mixer_conv(cfg, lp, in_proj_in, mask, zero_conv)[0],
        "mixer.ssm": m.mixer_ssm(cfg, lp, in_proj_in, conv_in, zero_ssm, cfg.chunk_size)[0],
        "mixer.gated_norm": m.mixer_gated_norm(cfg, lp, in_proj_in, ssm_in),
        "mixer.out_proj": m.mixer_out_proj(cfg, lp, gated_in),
        "": m.block_residual(cfg, layer_in, out_proj_in),
    }


class Mamba2Model:
    """A loaded checkpoint (the `LoadedModel` protocol)."""

    def __init__(self, cfg: Mamba2Config, params, dtype: str, source: str, fmt: str,
                 precision: str = "highest"):
        self.cfg, self.params, self.dtype, self.source, self.format = cfg, params, dtype, source, fmt
        self.precision = precision
        self.tap_names = tap_names(cfg.n_layers)
        self.vocab_size, self.decode_lengths = cfg.vocab_size, cfg.decode_lengths

    def info(self) -> PortInfo:
        return PortInfo(name="builtin", version=equiv.__version__, details={
            "implementation": "equiv.mamba2 (pure JAX)", "jax": jax.__version__,
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "dtype": self.dtype, "jax_default_matmul_precision": self.precision,
            "chunk_size": self.cfg.chunk_size, "checkpoint_format": self.format, "checkpoint": self.source,
            **layout_details(self.params, PROJECTIONS)})

    def memory_estimate(self, batch: int, seq_len: int) -> int:
        """Bytes of the largest forward of (batch, seq_len) tokens (equiv/mamba2/footprint.py); the
        torch reference runs the same computation, so the same figure bounds it."""
        return forward_bytes(self.cfg, batch, seq_len)

    def memory_detail(self, batch: int, seq_len: int) -> str:
        """What dominates `memory_estimate`, for the harness's refusal."""
        return dominant_term(self.cfg, batch, seq_len)

    def _check(self, ids, mask):
        return check_tokens(ids, self.cfg.vocab_size, mask)

    def forward(self, ids, mask=None, taps=True) -> dict[str, np.ndarray]:
        ids, mask = self._check(ids, mask)
        with jax.default_matmul_precision(self.precision):
            out = self._forward_device(ids, mask, taps)
        return {k: np.asarray(v.astype(jnp.float32) if v.dtype == jnp.bfloat16 else v)
                for k, v in out.items()}

    def forward_isolated(self, ids, mask, inputs) -> dict[str, np.ndarray]:
        ids, mask = self._check(ids, mask)
        cfg, dt = self.cfg, self.params["embed"].dtype
        need = [n for n in self.tap_names if n not in ("logits",)]
        missing = [n for n in need if n not in inputs]
        if missing:
            from equiv.ports import TapUnavailable
            raise TapUnavailable(f"isolated mode needs the reference's taps {missing[:5]}")
        get = lambda name, dtype=dt: jnp.asarray(np.asarray(inputs[name]), dtype)  # noqa: E731
        resid = jnp.float32 if cfg.residual_in_fp32 else dt
        out: dict[str, np.ndarray] = {}
        with jax.default_matmul_precision(self.precision):
            out["embed"] = np.asarray(m.embed(self.params, jnp.asarray(ids)).astype(jnp.float32))
            for i in range(cfg.n_layers):
                prev = "embed" if i == 0 else f"layers.{i - 1}"
                t = f"layers.{i}"
                mixer = [get(f"{t}.mixer.{o}") for o in ("in_proj", "conv", "ssm", "gated_norm", "out_proj")]
                res = self._isolated_device(i, get(prev, resid if i else dt), get(f"{t}.norm"), *mixer,
                                            None if mask is None else jnp.asarray(mask))
                for k, v in res.items():
                    out[f"{t}.{k}" if k else t] = np.asarray(v.astype(jnp.float32))
            last = get(f"layers.{cfg.n_layers - 1}", resid)
            norm_f = m.rms_norm(last, self.params["norm_f"], cfg.norm_eps)
            out["norm_f"] = np.asarray(norm_f.astype(jnp.float32))
            logits = m.lm_logits(cfg, self.params, get("norm_f", last.dtype))
            out["logits"] = np.asarray(logits.astype(jnp.float32))
        return out

    def step_logits(self, ids, mask, prompt_len: int) -> np.ndarray:
        ids, mask = self._check(ids, mask)
        if not 1 <= prompt_len <= ids.shape[1]:
            raise EquivError(f"prompt_len: expected 1 <= prompt_len <= l={ids.shape[1]}, got {prompt_len}")
        with jax.default_matmul_precision(self.precision):
            logits, cache = self._prefill(ids[:, :prompt_len], None if mask is None else mask[:, :prompt_len])
            steps = [np.asarray(logits, np.float32)]
            for t in range(prompt_len, ids.shape[1]):
                logits, cache = self._decode_step(cache, ids[:, t])
                steps.append(np.asarray(logits, np.float32))
        return np.stack(steps, axis=1)

    def generate(self, prompt, mask=None, max_new_tokens=32, eos_id=None) -> GenerateResult:
        prompt, mask = self._check(prompt, mask, )
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise EquivError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
        with jax.default_matmul_precision(self.precision):
            tokens, margins, steps, _ = self._generate(prompt, mask, max_new_tokens, eos_id)
        steps = int(steps)
        return GenerateResult(np.asarray(tokens)[:, :steps], np.asarray(margins)[:, :steps], steps)

    # Where computation is placed: inputs are checked host arrays, outputs device or host arrays. A
    # subclass runs the same model over a device mesh (equiv/mamba2/sharding.py) by overriding these.
    def _forward_device(self, ids, mask, taps):
        return _forward_jit(self.params, self.cfg, ids, mask, taps)

    def _isolated_device(self, i, *inputs):
        return _isolated_layer(self.cfg, self.params["layers"][i], *inputs)

    def _prefill(self, ids, mask):
        return prefill(self.params, self.cfg, ids, mask)

    def _decode_step(self, cache, tokens):
        return decode_step_jit(self.params, self.cfg, cache, jnp.asarray(tokens))

    def _generate(self, prompt, mask, max_new_tokens, eos_id):
        return generate(self.params, self.cfg, prompt, mask, max_new_tokens, eos_id)


PROJECTIONS = ("in_proj", "out_proj")  # K-blocks on CPU, rows elsewhere (equiv/kblock.py)


class Mamba2Port:
    """Registry name "builtin"."""

    name = "builtin"

    def __init__(self, precision: str = "highest"):
        self.precision = precision

    def load(self, checkpoint_dir: str | Path, dtype: str = "float32") -> Mamba2Model:
        cfg, params, fmt = load_checkpoint(checkpoint_dir, dtype)
        params = for_backend(params, PROJECTIONS)
        return Mamba2Model(cfg, params, dtype, str(checkpoint_dir), fmt, self.precision)
