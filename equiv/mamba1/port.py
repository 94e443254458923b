"""The built-in Mamba-1 / Falcon-Mamba port: the pure-JAX model behind the port protocol
(equiv/ports.py).

All entry points check their inputs on the host (equiv/inputs.py) and run under an explicit
`jax.default_matmul_precision` ("highest" by default: on GPU JAX's default runs float32 matmuls as
TF32); the setting is recorded in `info()`.
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
from equiv.kblock import HEAD, for_backend, layout_details
from equiv.mamba1 import model as m
from equiv.mamba1.config import Mamba1Config
from equiv.mamba1.convert import load_checkpoint
from equiv.mamba1.generate import decode_step_jit, generate, prefill
from equiv.mamba1.scan import MODES
from equiv.mamba1.taps import LAYER_SUBTAPS, tap_names
from equiv.ports import GenerateResult, PortInfo, TapUnavailable


@partial(jax.jit, static_argnames=("cfg", "taps", "scan_mode"))
def _forward_jit(params, cfg, ids, mask, taps, scan_mode):
    logits, _, tap_dict = m.forward(params, cfg, ids, mask, taps=taps, scan_mode=scan_mode)
    return tap_dict if taps else {"logits": logits}


@partial(jax.jit, static_argnames=("cfg", "scan_mode"))
def _isolated_layer(cfg, lp, given, mask, scan_mode):
    """Each sub-op of one block computed from the reference's own values of its inputs (`given`:
    the block input under "" and every sub-tap by its LAYER_SUBTAPS name)."""
    b, l = given[""].shape[:2]
    zero_conv = jnp.zeros((b, cfg.conv_kernel - 1, cfg.d_inner), given["mixer.in_proj"].dtype)
    zero_ssm = jnp.zeros((b, cfg.d_inner, cfg.d_state), jnp.float32)
    dt_low, B, C = m.mixer_x_proj(cfg, lp, given["mixer.conv"])
    return {
        "norm": m.block_norm(cfg, lp, given[""]),
        "mixer.in_proj": m.mixer_in_proj(cfg, lp, given["norm"], mask),
        "mixer.conv": m.mixer_conv(cfg, lp, given["mixer.in_proj"], mask, zero_conv)[0],
        "mixer.x_proj.dt": dt_low, "mixer.x_proj.B": B, "mixer.x_proj.C": C,
        "mixer.dt_proj": m.mixer_dt_proj(cfg, lp, given["mixer.x_proj.dt"]),
        "mixer.ssm": m.mixer_ssm(cfg, lp, given["mixer.conv"], given["mixer.dt_proj"],
                                 given["mixer.x_proj.B"], given["mixer.x_proj.C"], zero_ssm, scan_mode)[0],
        "mixer.gate": m.mixer_gate(cfg, given["mixer.in_proj"], given["mixer.ssm"]),
        "mixer.out_proj": m.mixer_out_proj(cfg, lp, given["mixer.gate"]),
        "": m.block_residual(cfg, given[""], given["mixer.out_proj"]),
    }


def _f32(x) -> np.ndarray:
    return np.asarray(x.astype(jnp.float32) if x.dtype != jnp.float32 else x)


class Mamba1Model:
    """A loaded checkpoint (the `LoadedModel` protocol)."""

    def __init__(self, cfg: Mamba1Config, params, dtype: str, source: str, fmt: str,
                 precision: str = "highest", scan_mode: str = "associative"):
        self.cfg, self.params, self.dtype, self.source, self.format = cfg, params, dtype, source, fmt
        self.precision, self.scan_mode = precision, scan_mode
        self.tap_names = tap_names(cfg.n_layers)
        self.vocab_size, self.decode_lengths = cfg.vocab_size, cfg.decode_lengths

    def info(self) -> PortInfo:
        return PortInfo(name="builtin", version=equiv.__version__, details={
            "implementation": "equiv.mamba1 (pure JAX)", "model_type": self.cfg.model_type,
            "jax": jax.__version__, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "dtype": self.dtype, "precision": self.precision,
            "jax_default_matmul_precision": self.precision, "scan": self.scan_mode,
            "checkpoint_format": self.format, "checkpoint": self.source,
            **layout_details(self.params, PROJECTIONS)})

    def _check(self, ids, mask):
        return check_tokens(ids, self.cfg.vocab_size, mask)

    def forward(self, ids, mask=None, taps=True) -> dict[str, np.ndarray]:
        ids, mask = self._check(ids, mask)
        with jax.default_matmul_precision(self.precision):
            out = _forward_jit(self.params, self.cfg, ids, mask, bool(taps), self.scan_mode)
        return {k: _f32(v) for k, v in out.items()}

    def forward_isolated(self, ids, mask, inputs) -> dict[str, np.ndarray]:
        """Each tap from the given (reference) values of the taps it reads: norm from the block
        input; in_proj from norm; conv from in_proj; x_proj.* from conv; dt_proj from x_proj.dt;
        ssm from conv, dt_proj, x_proj.B and x_proj.C; gate from ssm and in_proj's z; out_proj
        from gate; the block from its input and out_proj; logits from norm_f."""
        ids, mask = self._check(ids, mask)
        cfg, dt = self.cfg, self.params["embed"].dtype
        missing = [n for n in self.tap_names if n != "logits" and n not in inputs]
        if missing:
            raise TapUnavailable(f"isolated mode: expected the reference's values of every tap, missing "
                                 f"{len(missing)}: {missing[:5]}")
        resid = jnp.float32 if cfg.residual_in_fp32 else dt
        float32_taps = {"mixer.ssm"}  # the one float32 sub-tap in a bfloat16 model

        def get(name, dtype):
            return jnp.asarray(np.asarray(inputs[name], np.float32), dtype)

        out: dict[str, np.ndarray] = {}
        jmask = None if mask is None else jnp.asarray(mask)
        with jax.default_matmul_precision(self.precision):
            out["embed"] = _f32(m.embed(self.params, jnp.asarray(ids)))
            for i in range(cfg.n_layers):
                t = f"layers.{i}"
                given = {"": get("embed" if i == 0 else f"layers.{i - 1}", resid if i else dt)}
                given |= {sub: get(f"{t}.{sub}", jnp.float32 if sub in float32_taps else dt)
                          for sub in LAYER_SUBTAPS}
                res = _isolated_layer(cfg, self.params["layers"][i], given, jmask, self.scan_mode)
                out |= {(f"{t}.{k}" if k else t): _f32(v) for k, v in res.items()}
            last = get(f"layers.{cfg.n_layers - 1}", resid)
            out["norm_f"] = _f32(m.rms_norm(last, self.params["norm_f"], cfg.norm_eps))
            out["logits"] = _f32(m.lm_logits(cfg, self.params, get("norm_f", last.dtype)))
        return out

    def step_logits(self, ids, mask, prompt_len: int) -> np.ndarray:
        ids, mask = self._check(ids, mask)
        if isinstance(prompt_len, bool) or not isinstance(prompt_len, int | np.integer) \
                or not 1 <= prompt_len <= ids.shape[1]:
            raise EquivError(f"prompt_len: expected an int, 1 <= prompt_len <= l={ids.shape[1]}, "
                             f"got {prompt_len!r}")
        with jax.default_matmul_precision(self.precision):
            logits, cache = prefill(self.params, self.cfg, ids[:, :prompt_len],
                                    None if mask is None else mask[:, :prompt_len], self.scan_mode)
            steps = [_f32(logits)]
            for t in range(prompt_len, ids.shape[1]):
                logits, cache = decode_step_jit(self.params, self.cfg, cache, jnp.asarray(ids[:, t]))
                steps.append(_f32(logits))
        return np.stack(steps, axis=1)

    def generate(self, prompt, mask=None, max_new_tokens=32, eos_id=None) -> GenerateResult:
        prompt, mask = self._check(prompt, mask)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise EquivError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
        if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, int | np.integer)):
            raise EquivError(f"eos_id: expected a token id or None, got {eos_id!r}")
        with jax.default_matmul_precision(self.precision):
            tokens, margins, steps, _ = generate(self.params, self.cfg, prompt, mask, max_new_tokens, eos_id)
        steps = int(steps)
        return GenerateResult(np.asarray(tokens)[:, :steps], np.asarray(margins)[:, :steps], steps)


PROJECTIONS = ("in_proj", "x_proj", "out_proj")  # K-blocks on CPU, rows elsewhere (equiv/kblock.py)
ROWS_ALSO = ("dt_proj", *HEAD)  # short K (dt_rank) or the untied head: whole, or rows where the rest are


class Mamba1Port:
    """Registry name "builtin" (of the mamba1 family). `scan_mode` is the prefill's form of the
    selective scan (equiv.mamba1.scan.MODES; "associative" is the parallel one)."""

    name = "builtin"

    def __init__(self, precision: str = "highest", scan_mode: str = "associative"):
        if scan_mode not in MODES:
            raise EquivError(f"scan_mode: expected one of {MODES}, got {scan_mode!r}")
        self.precision, self.scan_mode = precision, scan_mode

    def load(self, checkpoint_dir: str | Path, dtype: str = "float32") -> Mamba1Model:
        cfg, params, fmt = load_checkpoint(checkpoint_dir, dtype)
        params = for_backend(params, PROJECTIONS, rows_also=ROWS_ALSO)
        return Mamba1Model(cfg, params, dtype, str(checkpoint_dir), fmt, self.precision, self.scan_mode)
