"""Checkpoint directory -> (Mamba1Config, params pytree). Strict: every key mapped, every shape
checked, every weight finite, missing, unexpected and misshapen keys listed together in one error.

Formats: transformers (`MambaForCausalLM` / `FalconMambaForCausalLM`: `backbone.embeddings.weight`)
and mamba_ssm (`MambaLMHeadModel` with Mamba1 blocks: `backbone.embedding.weight`); the layers'
names are the same in both. Files are read by equiv.io.checkpoint_files.read_tensors, in
transformers' order, so the port reads the very tensors the reference reads.

Params layout (a list of per-layer dicts, as equiv/mamba2's: unrolled under jit):

    embed (v, d)   norm_f (d,)   lm_head (d, v) or absent when tied
    layers[i]: norm (d,)  in_proj (d, 2e)  [in_proj_bias (2e,)]  conv_w (k, e)  [conv_b (e,)]
               x_proj (e, r + 2n)  dt_proj (r, e)  dt_bias (e,)  A_log (e, n)  D (e,)
               out_proj (e, d)  [out_proj_bias (d,)]

Matmul weights are stored (in, out) for x @ W; dt_bias, A_log and D are rounded to the model dtype
(as `model.to(dtype)` rounds the reference's) but held in float32, since every use upcasts them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from equiv.errors import CheckpointError, ConfigError, DtypeError
from equiv.io.checkpoint_files import read_tensors
from equiv.mamba1.config import Mamba1Config
from equiv.mamba1.config_file import load_config

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}

# checkpoint suffix -> (our name, transform); "t" is an nn.Linear weight stored (out, in)
_LAYER_KEYS = {
    "norm.weight": ("norm", None),
    "mixer.in_proj.weight": ("in_proj", "t"),
    "mixer.in_proj.bias": ("in_proj_bias", None),
    "mixer.conv1d.weight": ("conv_w", "conv"),
    "mixer.conv1d.bias": ("conv_b", None),
    "mixer.x_proj.weight": ("x_proj", "t"),
    "mixer.dt_proj.weight": ("dt_proj", "t"),
    "mixer.dt_proj.bias": ("dt_bias", None),
    "mixer.A_log": ("A_log", None),
    "mixer.D": ("D", None),
    "mixer.out_proj.weight": ("out_proj", "t"),
    "mixer.out_proj.bias": ("out_proj_bias", None),
}
_TRANSFORM = {ours: how for ours, how in _LAYER_KEYS.values()} | {"lm_head": "t"}
_KEEP_FP32 = {"dt_bias", "A_log", "D"}
_PREFIX = {"transformers": ("backbone.embeddings.weight", "backbone.layers"),
           "mamba_ssm": ("backbone.embedding.weight", "backbone.layers")}
# Dimension names per tensor (checkpoint layout), for messages: "expected (d_inner=96, dt_rank=5)".
_DIMS = {"embed": ("vocab_size", "d_model"), "lm_head": ("vocab_size", "d_model"), "norm_f": ("d_model",),
         "norm": ("d_model",), "in_proj": ("2 x d_inner", "d_model"), "in_proj_bias": ("2 x d_inner",),
         "conv_w": ("d_inner", "", "conv_kernel"), "conv_b": ("d_inner",),
         "x_proj": ("dt_rank + 2 x d_state", "d_inner"), "dt_proj": ("d_inner", "dt_rank"),
         "dt_bias": ("d_inner",), "A_log": ("d_inner", "d_state"), "D": ("d_inner",),
         "out_proj": ("d_model", "d_inner"), "out_proj_bias": ("d_model",)}


def expected_shapes(cfg: Mamba1Config) -> dict[str, tuple]:
    """Checkpoint-layout (torch) shapes of every per-layer tensor, by our name."""
    e = cfg.d_inner
    shapes = {"norm": (cfg.d_model,), "in_proj": (2 * e, cfg.d_model), "conv_w": (e, 1, cfg.conv_kernel),
              "x_proj": (cfg.x_proj_dim, e), "dt_proj": (e, cfg.dt_rank), "dt_bias": (e,),
              "A_log": (e, cfg.d_state), "D": (e,), "out_proj": (cfg.d_model, e)}
    if cfg.use_bias:
        shapes |= {"in_proj_bias": (2 * e,), "out_proj_bias": (cfg.d_model,)}
    if cfg.use_conv_bias:
        shapes["conv_b"] = (e,)
    return shapes


def _named_shape(ours: str, shape: tuple) -> str:
    return "(" + ", ".join(f"{d}={s}" if d else str(s) for d, s in zip(_DIMS[ours], shape)) + ")"


def _layer_indices(tensors, layer_prefix: str) -> list[int]:
    pat = re.compile(re.escape(layer_prefix) + r"\.(\d{1,9})\.")
    return sorted({int(m.group(1)) for k in tensors if (m := pat.match(k))})


def _is_float(a) -> bool:
    return a.dtype.kind == "f" or a.dtype == ml_dtypes.bfloat16


def _check_dtype(dtype) -> type:
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise DtypeError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r} ({type(dtype).__name__})")
    return DTYPES[dtype]


def _wanted(cfg: Mamba1Config, fmt: str, n_tensors: int) -> dict[str, tuple]:
    """Every key the config implies -> (our name or (name, layer), checkpoint shape)."""
    embed_key, layer_prefix = _PREFIX[fmt]
    wanted = {embed_key: ("embed", (cfg.vocab_size, cfg.d_model)),
              "backbone.norm_f.weight": ("norm_f", (cfg.d_model,))}
    if not cfg.tie_embeddings:
        wanted["lm_head.weight"] = ("lm_head", (cfg.vocab_size, cfg.d_model))
    shapes = expected_shapes(cfg)
    # bounded by the tensor count: a config claiming 2**31 layers must not build a 2**31-row table
    for i in range(min(cfg.n_layers, n_tensors + 1)):
        for suffix, (ours, _) in _LAYER_KEYS.items():
            if ours in shapes:
                wanted[f"{layer_prefix}.{i}.{suffix}"] = ((ours, i), shapes[ours])
    return wanted


def map_tensors(cfg: Mamba1Config, fmt: str, tensors: dict[str, np.ndarray], dtype: str = "float32") -> dict:
    """Checkpoint tensors -> params pytree (see module docstring). Raises CheckpointError listing every
    missing, unexpected, misshapen and non-float key at once (then non-finite weights)."""
    np_dtype = _check_dtype(dtype)
    if fmt not in _PREFIX:
        raise ConfigError(f"checkpoint format: expected one of {sorted(_PREFIX)}, got {fmt!r}")
    bad_keys = [repr(k)[:60] for k, v in tensors.items()
                if not isinstance(k, str) or not isinstance(v, np.ndarray)]
    if bad_keys:
        raise CheckpointError(f"{fmt} checkpoint: expected str -> array entries, got "
                              f"{', '.join(bad_keys[:8])}")
    embed_key, layer_prefix = _PREFIX[fmt]
    wanted = _wanted(cfg, fmt, len(tensors))
    hints = []
    present = _layer_indices(tensors, layer_prefix)
    if len(present) != cfg.n_layers or (present and present[-1] != cfg.n_layers - 1):  # sorted, distinct
        got = f"{present[0]}..{present[-1]} ({len(present)} distinct)" if present else "none"
        hints.append(f"n_layers: config.json says {cfg.n_layers}, the checkpoint has layer indices {got}")
    emb = tensors.get(embed_key)
    if emb is not None and emb.ndim == 2 and emb.shape[1] == cfg.d_model and emb.shape[0] != cfg.vocab_size:
        hints.append(f"vocab_size: config.json says {cfg.vocab_size}, the embedding has {emb.shape[0]} rows")
    tied_extra = []
    if cfg.tie_embeddings and "lm_head.weight" in tensors and emb is not None:
        # a tied head may be written too (mamba_ssm's state_dict has it); only if it is the embedding
        if not np.array_equal(tensors["lm_head.weight"], emb):
            tied_extra.append("lm_head.weight (present and different from the embedding although the "
                              "embeddings are tied)")
    tied_head = {"lm_head.weight"} if cfg.tie_embeddings else set()
    missing = sorted(set(wanted) - set(tensors))
    unexpected = sorted(set(tensors) - set(wanted) - tied_head) + tied_extra
    misshapen = [f"{k}: expected {_named_shape(ours if isinstance(ours, str) else ours[0], shape)}, "
                 f"got {tuple(tensors[k].shape)}"
                 for k, (ours, shape) in wanted.items() if k in tensors and tuple(tensors[k].shape) != shape]
    bad_dtype = [f"{k}: {tensors[k].dtype}" for k in wanted if k in tensors and not _is_float(tensors[k])]
    problems = []
    if missing:
        problems.append(f"expected keys missing ({len(missing)}): {', '.join(missing[:12])}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:12])}")
    if misshapen:
        problems.append(f"wrong shapes ({len(misshapen)}): " + "; ".join(misshapen[:12]))
    if bad_dtype:
        problems.append("expected floating tensors, got: " + ", ".join(bad_dtype[:12]))
    if problems:
        raise CheckpointError(f"{fmt} checkpoint: expected the tensors its config.json implies, got: "
                              + " | ".join(hints + problems))
    try:
        return _to_params(cfg, wanted, tensors, np_dtype, fmt)
    except (MemoryError, jax.errors.JaxRuntimeError) as e:  # a checkpoint too big for this machine
        if isinstance(e, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" not in str(e):
            raise
        need = sum(tensors[k].size for k in wanted) * np.dtype(np_dtype).itemsize
        raise CheckpointError(f"{fmt} checkpoint: expected room for {need} bytes of {dtype} weights, "
                              f"allocation failed ({type(e).__name__})") from None


def _convert(name: str, arr, np_dtype):
    a = np.asarray(arr).astype(np.float32).astype(np_dtype)  # via float32, as the reference loads
    if name in _KEEP_FP32:
        a = a.astype(np.float32)
    how = _TRANSFORM.get(name)
    if how == "t":
        return a.T  # (out, in) -> (in, out)
    if how == "conv":
        return a[:, 0, :].T  # (e, 1, k) -> (k, e)
    return a


def _to_params(cfg: Mamba1Config, wanted: dict, tensors: dict, np_dtype, fmt: str) -> dict:
    """Checked tensors -> params, rounded to the model dtype. Non-finite weights (NaN/inf stored, or
    a value beyond the dtype's range) are refused: every comparison built on them is meaningless."""
    layers: list[dict] = [{} for _ in range(cfg.n_layers)]
    params: dict = {}
    nonfinite = []
    for key, (ours, _) in wanted.items():
        name = ours[0] if isinstance(ours, tuple) else ours
        with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is reported just below
            a = _convert(name, tensors[key], np_dtype)
        if not np.isfinite(a).all():
            nonfinite.append(f"{key} ({int(a.size - np.isfinite(a).sum())} of {a.size})")
        if isinstance(ours, tuple):
            layers[ours[1]][name] = a
        else:
            params[name] = a
    if nonfinite:
        raise CheckpointError(f"{fmt} checkpoint: expected finite weights in {np.dtype(np_dtype).name}, got "
                              f"NaN/inf in {len(nonfinite)} tensors: {', '.join(nonfinite[:8])}")
    params = {k: jnp.asarray(v) for k, v in params.items()}
    params["layers"] = [{k: jnp.asarray(v) for k, v in lp.items()} for lp in layers]
    return params


def load_checkpoint(checkpoint_dir: str | Path, dtype: str = "float32") -> tuple[Mamba1Config, dict, str]:
    """Read and convert a checkpoint directory. Returns (config, params, format)."""
    _check_dtype(dtype)  # before reading gigabytes
    if not isinstance(checkpoint_dir, (str, os.PathLike)) or str(checkpoint_dir) == "":
        raise CheckpointError(f"checkpoint: expected a directory path, got {checkpoint_dir!r}")
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        shown = str(checkpoint_dir) if str(checkpoint_dir).isprintable() else repr(str(checkpoint_dir))
        raise CheckpointError(f"checkpoint: expected a directory, got {shown} "
                              f"({'a file' if checkpoint_dir.exists() else 'does not exist'})")
    cfg, fmt = load_config(checkpoint_dir)
    params = map_tensors(cfg, fmt, read_tensors(checkpoint_dir), dtype)
    return cfg, params, fmt
