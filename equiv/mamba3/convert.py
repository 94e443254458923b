"""Checkpoint directory -> (Mamba3Config, params). Strict: every key mapped, every shape checked,
every weight finite, missing, unexpected and misshapen keys listed together in one error.

Format: mamba_ssm's `MambaLMHeadModel` with Mamba3 blocks (docs/mamba3-layout.md):
`backbone.embedding.weight`, `backbone.layers.{i}.norm.weight`, `backbone.layers.{i}.mixer.<Mamba3's
own parameter names>`, `backbone.norm_f.weight`, `lm_head.weight` (absent, or equal to the
embedding, when tied). Files are read by equiv.io.checkpoint_files.read_tensors.

Two stages, so the numpy float64 oracle (equiv/mamba3/oracle.py) reads the very tensors the port
reads without importing JAX: `read_checkpoint` checks and returns numpy arrays in the checkpoint's
own (torch) layout by our name; `load_checkpoint` turns them into the port's JAX params:

    embed (v, d)   norm_f (d,)   lm_head (d, v) or absent when tied
    layers[i]: norm (d,)  in_proj (d, in_proj_dim)  dt_bias (h,)  B_bias, C_bias (h, R, n)
               B_norm, C_norm (n,)  [mimo_x, mimo_z, mimo_o (h, R, p)]  D (h,)  [out_norm (e,)]
               out_proj (e, d)

Matmul weights are stored (in, out) for x @ W. dt_bias, B_bias, C_bias, D and the mimo projections
stay float32 in every model dtype, unrounded: `Mamba3.__init__` creates them float32 whatever its
`dtype` argument (its kernels take them as float32 "model parameters"); the norms' weights and the
linears are rounded to the model dtype.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import ml_dtypes
import numpy as np

from equiv.errors import CheckpointError, DtypeError
from equiv.io.checkpoint_files import read_tensors
from equiv.mamba3.config import Mamba3Config
from equiv.mamba3.config_file import load_config

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}

# checkpoint suffix -> (our name, transform); "t" is an nn.Linear weight stored (out, in)
_LAYER_KEYS = {
    "norm.weight": ("norm", None),
    "mixer.in_proj.weight": ("in_proj", "t"),
    "mixer.dt_bias": ("dt_bias", None),
    "mixer.B_bias": ("B_bias", None),
    "mixer.C_bias": ("C_bias", None),
    "mixer.B_norm.weight": ("B_norm", None),
    "mixer.C_norm.weight": ("C_norm", None),
    "mixer.mimo_x": ("mimo_x", None),
    "mixer.mimo_z": ("mimo_z", None),
    "mixer.mimo_o": ("mimo_o", None),
    "mixer.D": ("D", None),
    "mixer.norm.weight": ("out_norm", None),
    "mixer.out_proj.weight": ("out_proj", "t"),
}
_TRANSFORM = {ours: how for ours, how in _LAYER_KEYS.values()} | {"lm_head": "t"}
KEEP_FP32 = frozenset({"dt_bias", "B_bias", "C_bias", "D", "mimo_x", "mimo_z", "mimo_o"})
EMBED_KEY, LAYER_PREFIX = "backbone.embedding.weight", "backbone.layers"
FORMAT = "mamba_ssm"
# Dimension names per tensor (checkpoint layout), for messages: "expected (nheads=4, mimo_rank=1, ...)".
_DIMS = {"embed": ("vocab_size", "d_model"), "lm_head": ("vocab_size", "d_model"), "norm_f": ("d_model",),
         "norm": ("d_model",), "in_proj": ("2e + 2Rgn + 3h + a", "d_model"), "dt_bias": ("nheads",),
         "B_bias": ("nheads", "mimo_rank", "d_state"), "C_bias": ("nheads", "mimo_rank", "d_state"),
         "B_norm": ("d_state",), "C_norm": ("d_state",), "mimo_x": ("nheads", "mimo_rank", "headdim"),
         "mimo_z": ("nheads", "mimo_rank", "headdim"), "mimo_o": ("nheads", "mimo_rank", "headdim"),
         "D": ("nheads",), "out_norm": ("d_inner",), "out_proj": ("d_model", "d_inner")}


def expected_shapes(cfg: Mamba3Config) -> dict[str, tuple]:
    """Checkpoint-layout (torch) shapes of every per-layer tensor the config implies, by our name."""
    h, r, n, e, d = cfg.nheads, cfg.rank, cfg.d_state, cfg.d_inner, cfg.d_model
    shapes = {"norm": (d,), "in_proj": (cfg.in_proj_dim, d), "dt_bias": (h,), "B_bias": (h, r, n),
              "C_bias": (h, r, n), "B_norm": (n,), "C_norm": (n,), "D": (h,), "out_proj": (d, e)}
    if cfg.is_mimo:
        shapes |= {name: (h, r, cfg.headdim) for name in ("mimo_x", "mimo_z", "mimo_o")}
    if cfg.is_outproj_norm:
        shapes["out_norm"] = (e,)
    return shapes


def _named_shape(ours: str, shape: tuple) -> str:
    return "(" + ", ".join(f"{d}={s}" for d, s in zip(_DIMS[ours], shape)) + ")"


def _layer_indices(tensors) -> list[int]:
    pat = re.compile(re.escape(LAYER_PREFIX) + r"\.(\d{1,9})\.")
    return sorted({int(m.group(1)) for k in tensors if isinstance(k, str) and (m := pat.match(k))})


def _is_float(a) -> bool:
    return a.dtype.kind == "f" or a.dtype == ml_dtypes.bfloat16


def check_dtype(dtype) -> type:
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise DtypeError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r} ({type(dtype).__name__})")
    return DTYPES[dtype]


def _wanted(cfg: Mamba3Config, n_tensors: int) -> dict[str, tuple]:
    """Every key the config implies -> (our name or (name, layer), checkpoint shape)."""
    wanted = {EMBED_KEY: ("embed", (cfg.vocab_size, cfg.d_model)),
              "backbone.norm_f.weight": ("norm_f", (cfg.d_model,))}
    if not cfg.tie_embeddings:
        wanted["lm_head.weight"] = ("lm_head", (cfg.vocab_size, cfg.d_model))
    shapes = expected_shapes(cfg)
    # bounded by the tensor count: a config claiming 2**31 layers must not build a 2**31-row table
    for i in range(min(cfg.n_layers, n_tensors + 1)):
        for suffix, (ours, _) in _LAYER_KEYS.items():
            if ours in shapes:
                wanted[f"{LAYER_PREFIX}.{i}.{suffix}"] = ((ours, i), shapes[ours])
    return wanted


def check_tensors(cfg: Mamba3Config, tensors: dict) -> dict[str, tuple]:
    """Raise CheckpointError listing every missing, unexpected, misshapen and non-float key at once;
    returns the wanted table (key -> (our name, shape))."""
    bad_keys = [repr(k)[:60] for k, v in tensors.items()
                if not isinstance(k, str) or not isinstance(v, np.ndarray)]
    if bad_keys:
        raise CheckpointError(f"{FORMAT} checkpoint: expected str -> array entries, got "
                              f"{', '.join(bad_keys[:8])}")
    wanted = _wanted(cfg, len(tensors))
    hints = []
    present = _layer_indices(tensors)
    if len(present) != cfg.n_layers or (present and present[-1] != cfg.n_layers - 1):
        got = f"{present[0]}..{present[-1]} ({len(present)} distinct)" if present else "none"
        hints.append(f"n_layers: config.json says {cfg.n_layers}, the checkpoint has layer indices {got}")
    emb = tensors.get(EMBED_KEY)
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
        raise CheckpointError(f"{FORMAT} checkpoint: expected the tensors its config.json implies, got: "
                              + " | ".join(hints + problems))
    return wanted


def map_tensors(cfg: Mamba3Config, tensors: dict, np_dtype=np.float64) -> dict:
    """Checked tensors -> {name: array, "layers": [{name: array}]} in the checkpoint's (torch)
    layout, each rounded to `np_dtype` via float32 (as the reference loads), KEEP_FP32 ones held
    in float32 unrounded (float64 asked: everything float64, the oracle's exact copy of the
    stored values). Non-finite weights are refused: every comparison built on them is meaningless."""
    wanted = check_tensors(cfg, tensors)
    layers: list[dict] = [{} for _ in range(cfg.n_layers)]
    params: dict = {}
    nonfinite = []
    for key, (ours, _) in wanted.items():
        name = ours[0] if isinstance(ours, tuple) else ours
        with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is reported just below
            a = np.asarray(tensors[key]).astype(np.float32)
            if np_dtype == np.float64:
                a = np.asarray(tensors[key]).astype(np.float64)
            elif name not in KEEP_FP32:
                a = a.astype(np_dtype)
        if not np.isfinite(a).all():
            nonfinite.append(f"{key} ({int(a.size - np.isfinite(a).sum())} of {a.size})")
        if isinstance(ours, tuple):
            layers[ours[1]][name] = a
        else:
            params[name] = a
    if nonfinite:
        raise CheckpointError(f"{FORMAT} checkpoint: expected finite weights in "
                              f"{np.dtype(np_dtype).name}, got NaN/inf in {len(nonfinite)} tensors: "
                              f"{', '.join(nonfinite[:8])}")
    params["layers"] = layers
    return params


def _checked_dir(checkpoint_dir) -> Path:
    if not isinstance(checkpoint_dir, (str, os.PathLike)) or str(checkpoint_dir) == "":
        raise CheckpointError(f"checkpoint: expected a directory path, got {checkpoint_dir!r}")
    path = Path(checkpoint_dir)
    if not path.is_dir():
        shown = str(path) if str(path).isprintable() else repr(str(path))
        raise CheckpointError(f"checkpoint: expected a directory, got {shown} "
                              f"({'a file' if path.exists() else 'does not exist'})")
    return path


def read_checkpoint(checkpoint_dir: str | Path, np_dtype=np.float64) -> tuple[Mamba3Config, dict, str]:
    """(config, numpy params in the checkpoint layout, format); no JAX (the oracle's loader)."""
    path = _checked_dir(checkpoint_dir)
    cfg, fmt = load_config(path)
    return cfg, map_tensors(cfg, read_tensors(path), np_dtype), fmt


def to_port_params(params: dict) -> dict:
    """Numpy checkpoint-layout params (map_tensors) -> the port's JAX pytree (module docstring)."""
    import jax.numpy as jnp

    def conv(name, a):
        return jnp.asarray(a.T if _TRANSFORM.get(name) == "t" else a)

    out = {k: conv(k, v) for k, v in params.items() if k != "layers"}
    out["layers"] = [{k: conv(k, v) for k, v in lp.items()} for lp in params["layers"]]
    return out


def load_checkpoint(checkpoint_dir: str | Path, dtype: str = "float32") -> tuple[Mamba3Config, dict, str]:
    """Read and convert a checkpoint directory for the port. Returns (config, params, format)."""
    np_dtype = check_dtype(dtype)  # before reading gigabytes
    cfg, params, fmt = read_checkpoint(checkpoint_dir, np_dtype)
    try:
        return cfg, to_port_params(params), fmt
    except MemoryError:
        raise CheckpointError(f"{fmt} checkpoint: allocation of the {dtype} weights failed") from None
