"""The built-in Mamba-3 port: the pure-JAX model behind the port protocol (equiv/ports.py).

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
from equiv.mamba3 import model as m
from equiv.mamba3.config import Mamba3Config
from equiv.mamba3.convert import load_checkpoint
from equiv.mamba3.generate import decode_step_jit, generate, prefill
from equiv.mamba3.ssm import MODES
from equiv.mamba3.taps import LAYER_SUBTAPS, tap_names
from equiv.ports import GenerateResult, PortInfo, TapUnavailable

FLOAT32_SUBTAPS = frozenset({"mixer.dt", "mixer.A", "mixer.trap", "mixer.angles", "mixer.B", "mixer.C",
                             "mixer.ssm"})
"""The sub-taps the port holds in float32 whatever the model dtype (mixer.gate too, with MIMO and
is_outproj_norm: equiv.mamba3.model.mixer_gate)."""


@partial(jax.jit, static_argnames=("cfg", "taps", "mode"))
def _forward_jit(params, cfg, ids, mask, taps, mode):
    logits, _, tap_dict = m.forward(params, cfg, ids, mask, taps=taps, mode=mode)
    return tap_dict if taps else {"logits": logits}


@partial(jax.jit, static_argnames=("cfg", "mode"))
def _isolated_layer(cfg, lp, given, mask, mode):
    """Each sub-op of one block computed from the reference's own values of its inputs (`given`:
    the block input under "" and every sub-tap by its LAYER_SUBTAPS name)."""
    proj = given["mixer.in_proj"]
    ssm_in = (given["mixer.dt"], given["mixer.A"], given["mixer.trap"], given["mixer.B"], given["mixer.C"])
    y = given["mixer.ssm"]
    return {
        "norm": m.block_norm(cfg, lp, given[""]),
        "mixer.in_proj": m.mixer_in_proj(cfg, lp, given["norm"], mask),
        "mixer.dt": m.mixer_dt(cfg, lp, proj), "mixer.A": m.mixer_A(cfg, lp, proj),
        "mixer.trap": m.mixer_trap(cfg, lp, proj), "mixer.B": m.mixer_B(cfg, lp, proj),
        "mixer.C": m.mixer_C(cfg, lp, proj),
        "mixer.angles": m.mixer_angles(cfg, proj, given["mixer.dt"], cfg.chunk_size),
        "mixer.ssm": m.mixer_ssm(cfg, lp, proj, *ssm_in, None, mode)[0].reshape(y.shape),
        "mixer.gate": m.mixer_gate(cfg, lp, proj, y.reshape(*y.shape[:3], cfg.nheads, cfg.headdim)),
        "mixer.out_proj": m.mixer_out_proj(cfg, lp, given["mixer.gate"]),
        "": m.block_residual(cfg, given[""], given["mixer.out_proj"]),
    }


def _f32(x) -> np.ndarray:
    return np.asarray(x.astype(jnp.float32) if x.dtype != jnp.float32 else x)


class Mamba3Model:
    """A loaded checkpoint (the `LoadedModel` protocol)."""

    def __init__(self, cfg: Mamba3Config, params, dtype: str, source: str, fmt: str,
                 precision: str = "highest", mode: str = "chunked"):
        self.cfg, self.params, self.dtype, self.source, self.format = cfg, params, dtype, source, fmt
        self.precision, self.mode = precision, mode
        self.tap_names = tap_names(cfg.n_layers)
        self.vocab_size, self.decode_lengths = cfg.vocab_size, cfg.decode_lengths

    def info(self) -> PortInfo:
        return PortInfo(name="builtin", version=equiv.__version__, details={
            "implementation": "equiv.mamba3 (pure JAX)", "model_type": self.cfg.model_type,
            "jax": jax.__version__, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "dtype": self.dtype, "precision": self.precision,
            "jax_default_matmul_precision": self.precision, "ssm": self.mode,
            "chunk_size": self.cfg.chunk_size, "mimo_rank": self.cfg.rank,
            "checkpoint_format": self.format, "checkpoint": self.source})

    def _check(self, ids, mask):
        return check_tokens(ids, self.cfg.vocab_size, mask)

    def forward(self, ids, mask=None, taps=True) -> dict[str, np.ndarray]:
        ids, mask = self._check(ids, mask)
        with jax.default_matmul_precision(self.precision):
            out = _forward_jit(self.params, self.cfg, ids, mask, bool(taps), self.mode)
        return {k: _f32(v) for k, v in out.items()}

    def forward_isolated(self, ids, mask, inputs) -> dict[str, np.ndarray]:
        """Each tap from the given (reference) values of the taps it reads: norm from the block
        input; in_proj from norm; dt, A, trap, B and C from in_proj; angles from in_proj's angle
        slice and dt; ssm from in_proj's x and angle, dt, A, trap, B and C; gate from ssm and
        in_proj's z; out_proj from gate; the block from its input and out_proj; logits from norm_f."""
        ids, mask = self._check(ids, mask)
        cfg, dt = self.cfg, self.params["embed"].dtype
        missing = [n for n in self.tap_names if n != "logits" and n not in inputs]
        if missing:
            raise TapUnavailable(f"isolated mode: expected the reference's values of every tap, missing "
                                 f"{len(missing)}: {missing[:5]}")
        resid = jnp.float32 if cfg.residual_in_fp32 else dt
        float32_taps = FLOAT32_SUBTAPS | ({"mixer.gate"} if cfg.is_mimo and cfg.is_outproj_norm else set())

        def get(name, dtype):
            return jnp.asarray(np.asarray(inputs[name], np.float32), dtype)

        out: dict[str, np.ndarray] = {}
        jmask = None if mask is None else jnp.asarray(mask)
        with jax.default_matmul_precision(self.precision):
            out["embed"] = _f32(m.embed(self.params, jnp.asarray(ids)))
            for i in range(cfg.n_layers):
                t = f"layers.{i}"
                given = {"": get("embed" if i == 0 else f"layers.{i - 1}", resid if i else dt)}
                if i == 0:
                    given[""] = given[""].astype(resid)
                given |= {sub: get(f"{t}.{sub}", jnp.float32 if sub in float32_taps else dt)
                          for sub in LAYER_SUBTAPS}
                res = _isolated_layer(cfg, self.params["layers"][i], given, jmask, self.mode)
                out |= {(f"{t}.{k}" if k else t): _f32(v) for k, v in res.items()}
            last = get(f"layers.{cfg.n_layers - 1}", resid)
            out["norm_f"] = _f32(m.final_norm(cfg, self.params, last))
            out["logits"] = _f32(m.lm_logits(cfg, self.params, get("norm_f", dt)))
        return out

    def step_logits(self, ids, mask, prompt_len: int) -> np.ndarray:
        ids, mask = self._check(ids, mask)
        if isinstance(prompt_len, bool) or not isinstance(prompt_len, int | np.integer) \
                or not 1 <= prompt_len <= ids.shape[1]:
            raise EquivError(f"prompt_len: expected an int, 1 <= prompt_len <= l={ids.shape[1]}, "
                             f"got {prompt_len!r}")
        with jax.default_matmul_precision(self.precision):
            logits, cache = prefill(self.params, self.cfg, ids[:, :prompt_len],
                                    None if mask is None else mask[:, :prompt_len], self.mode)
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


def with_split_projections(params: dict) -> dict:
    """The long-K projections as K-block tuples (equiv.mamba1.model.linear says why)."""
    split = {"in_proj", "out_proj"}
    layers = [{k: m.split_k(v) if k in split else v for k, v in lp.items()} for lp in params["layers"]]
    return params | {"layers": layers}


class Mamba3Port:
    """Registry name "builtin" (of the mamba3 family). `mode` is the prefill's form of the SSM
    (equiv.mamba3.ssm.MODES; "chunked" is the parallel one, at the config's chunk_size)."""

    name = "builtin"

    def __init__(self, precision: str = "highest", mode: str = "chunked"):
        if mode not in MODES:
            raise EquivError(f"mode: expected one of {MODES}, got {mode!r}")
        self.precision, self.mode = precision, mode

    def load(self, checkpoint_dir: str | Path, dtype: str = "float32") -> Mamba3Model:
        cfg, params, fmt = load_checkpoint(checkpoint_dir, dtype)
        return Mamba3Model(cfg, with_split_projections(params), dtype, str(checkpoint_dir), fmt,
                           self.precision, self.mode)
