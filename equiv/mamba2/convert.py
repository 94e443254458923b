"""Checkpoint directory -> (Mamba2Config, params pytree). Strict: every key mapped, every shape
checked, every weight finite, missing, unexpected and misshapen keys listed together in one error.

Formats: transformers (`config.json` + `model.safetensors` or a sharded
`model.safetensors.index.json`) and mamba_ssm (`config.json` with `ssm_cfg` + safetensors or
`pytorch_model.bin`). Files are chosen in transformers' order (`_get_resolved_checkpoint_files`:
model.safetensors, its index, pytorch_model.bin, its index), so the port reads the very tensors the
reference reads. safetensors is preferred: a `.bin` is a pickle, opened only through
`torch.load(weights_only=True)`, which refuses to run code (UnsafeCheckpointError).

Params layout (a list of per-layer dicts; see equiv/mamba2/model.py for why not stacked):

    embed (v, d)   norm_f (d,)   lm_head (d, v) or absent when tied
    layers[i]: norm (d,)  in_proj (d, in_dim)  [in_proj_bias (in_dim,)]  conv_w (k, conv_dim)
               [conv_b (conv_dim,)]  dt_bias (h,)  A_log (h,)  D (h,) or (h, p)
               gnorm (e,)  out_proj (e, d)  [out_proj_bias (d,)]

with in_dim = 2e + 2gn + h (z | x B C | dt) and conv_dim = e + 2gn (x B C).
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from equiv.errors import CheckpointError, ConfigError, DtypeError, bare_or_quoted, clip, quote
from equiv.inputs import require_checkpoint_dir
from equiv.io.checkpoint_files import read_tensors
from equiv.mamba2.config import Mamba2Config
from equiv.mamba2.config_file import load_config

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}

# Readable key table (bonsai `params.py` style): checkpoint suffix -> (our name, transform).
# transform turns torch's layout into ours; `t` is a matmul weight stored (out, in) by nn.Linear.
_LAYER_KEYS = {
    "norm.weight": ("norm", None),
    "mixer.in_proj.weight": ("in_proj", "t"),
    "mixer.in_proj.bias": ("in_proj_bias", None),
    "mixer.conv1d.weight": ("conv_w", "conv"),
    "mixer.conv1d.bias": ("conv_b", None),
    "mixer.dt_bias": ("dt_bias", None),
    "mixer.A_log": ("A_log", None),
    "mixer.D": ("D", None),
    "mixer.norm.weight": ("gnorm", None),
    "mixer.out_proj.weight": ("out_proj", "t"),
    "mixer.out_proj.bias": ("out_proj_bias", None),
}
_PREFIX = {"transformers": ("backbone.embeddings.weight", "backbone.layers"),
           "mamba_ssm": ("backbone.embedding.weight", "backbone.layers")}
# Dimension names per tensor (checkpoint layout), for messages: "expected (conv_dim=192, 1, conv_kernel=4)".
_DIMS = {"embed": ("vocab_size", "d_model"), "lm_head": ("vocab_size", "d_model"), "norm_f": ("d_model",),
         "norm": ("d_model",), "in_proj": ("in_proj_dim", "d_model"), "in_proj_bias": ("in_proj_dim",),
         "conv_w": ("conv_dim", "", "conv_kernel"), "conv_b": ("conv_dim",), "dt_bias": ("n_heads",),
         "A_log": ("n_heads",), "gnorm": ("d_inner",), "out_proj": ("d_model", "d_inner"),
         "out_proj_bias": ("d_model",)}


def expected_shapes(cfg: Mamba2Config) -> dict[str, tuple]:
    """Checkpoint-layout (torch) shapes of every per-layer tensor, by our name."""
    shapes = {"norm": (cfg.d_model,), "in_proj": (cfg.in_proj_dim, cfg.d_model),
              "conv_w": (cfg.conv_dim, 1, cfg.conv_kernel), "dt_bias": (cfg.n_heads,),
              "A_log": (cfg.n_heads,), "D": (cfg.d_inner,) if cfg.d_has_hdim else (cfg.n_heads,),
              "gnorm": (cfg.d_inner,), "out_proj": (cfg.d_model, cfg.d_inner)}
    if cfg.use_bias:
        shapes |= {"in_proj_bias": (cfg.in_proj_dim,), "out_proj_bias": (cfg.d_model,)}
    if cfg.use_conv_bias:
        shapes["conv_b"] = (cfg.conv_dim,)
    return shapes


def _named_shape(cfg: Mamba2Config, ours: str, shape: tuple) -> str:
    dims = ("d_inner",) if ours == "D" and cfg.d_has_hdim else ("n_heads",) if ours == "D" else _DIMS[ours]
    return "(" + ", ".join(f"{d}={s}" if d else str(s) for d, s in zip(dims, shape)) + ")"


# ---------------------------------------------------------------------------------------------
# files -> tensors


# ---------------------------------------------------------------------------------------------
# tensors -> params


def _layer_indices(tensors, layer_prefix: str) -> list[int]:
    pat = re.compile(re.escape(layer_prefix) + r"\.(\d{1,9})\.")
    return sorted({int(m.group(1)) for k in tensors if (m := pat.match(k))})


def _is_float(a) -> bool:
    return a.dtype.kind == "f" or a.dtype == ml_dtypes.bfloat16


def _check_dtype(dtype) -> type:
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise DtypeError(f"dtype: expected one of {sorted(DTYPES)}, got {clip(repr(dtype), 30)} "
                         f"({type(dtype).__name__})")
    return DTYPES[dtype]


def map_tensors(cfg: Mamba2Config, fmt: str, tensors: dict[str, np.ndarray], dtype: str = "float32") -> dict:
    """Checkpoint tensors -> params pytree (see module docstring). Raises CheckpointError listing every
    missing, unexpected, misshapen, non-float and non-finite key at once."""
    np_dtype = _check_dtype(dtype)
    wanted = check_tensors(cfg, fmt, tensors)
    try:
        return _to_params(cfg, wanted, tensors, np_dtype, fmt)
    except (MemoryError, jax.errors.JaxRuntimeError) as e:  # a checkpoint too big for this machine
        if isinstance(e, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" not in str(e):
            raise
        need = sum(tensors[k].size for k in wanted) * np.dtype(np_dtype).itemsize
        raise CheckpointError(f"{fmt} checkpoint: expected room for {need} bytes of {dtype} weights, "
                              f"allocation failed ({type(e).__name__})") from None


def check_tensors(cfg: Mamba2Config, fmt: str, tensors: dict[str, np.ndarray]) -> dict:
    """Every key, shape and dtype the config implies, checked from the arrays' shapes and dtypes
    alone (their values only for a tied lm_head); -> {checkpoint key: (our name or (name, layer),
    checkpoint shape)}. CheckpointError lists every problem at once."""
    if fmt not in _PREFIX:
        raise ConfigError(f"checkpoint format: expected one of {sorted(_PREFIX)}, got {fmt!r}")
    bad_keys = [quote(k) for k, v in tensors.items()
                if not isinstance(k, str) or not isinstance(v, np.ndarray)]
    if bad_keys:
        raise CheckpointError(f"{fmt} checkpoint: expected str -> array entries, got "
                              f"{', '.join(bad_keys[:8])}")
    embed_key, layer_prefix = _PREFIX[fmt]
    shapes = expected_shapes(cfg)
    top = {embed_key: ("embed", (cfg.vocab_size, cfg.d_model)),
           "backbone.norm_f.weight": ("norm_f", (cfg.d_model,))}
    if not cfg.tie_embeddings:
        top["lm_head.weight"] = ("lm_head", (cfg.vocab_size, cfg.d_model))
    wanted = dict(top)
    hints = []
    present = _layer_indices(tensors, layer_prefix)
    if len(present) != cfg.n_layers or (present and present[-1] != cfg.n_layers - 1):  # sorted, distinct
        got = f"{present[0]}..{present[-1]} ({len(present)} distinct)" if present else "none"
        hints.append(f"n_layers: config.json says {cfg.n_layers}, the checkpoint has layer indices {got}")
    # Bounded by the tensor count: a config claiming 2**31 layers must not build a 2**31-row table
    for i in range(min(cfg.n_layers, len(tensors) + 1)):
        for suffix, (ours, _) in _LAYER_KEYS.items():
            if ours in shapes:
                wanted[f"{layer_prefix}.{i}.{suffix}"] = ((ours, i), shapes[ours])
    emb = tensors.get(embed_key)
    if emb is not None and emb.ndim == 2 and emb.shape[1] == cfg.d_model and emb.shape[0] != cfg.vocab_size:
        hints.append(f"vocab_size: config.json says {cfg.vocab_size}, the embedding has {emb.shape[0]} rows")
    tied_extra = []
    if cfg.tie_embeddings and "lm_head.weight" in tensors and emb is not None:
        # save_pretrained may write the tied head too; accept it only if it really is the embedding
        if not np.array_equal(tensors["lm_head.weight"], emb):
            tied_extra.append("lm_head.weight (present and different from the embedding although "
                              "tie_word_embeddings is true)")
    missing = sorted(set(wanted) - set(tensors))
    tied_head = {"lm_head.weight"} if cfg.tie_embeddings else set()
    unexpected = [bare_or_quoted(k) for k in sorted(set(tensors) - set(wanted) - tied_head)] + tied_extra
    misshapen = [f"{k}: expected {_named_shape(cfg, ours if isinstance(ours, str) else ours[0], shape)}, "
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
    return wanted


def to_port_layout(cfg: Mamba2Config, name: str, arr, np_dtype) -> np.ndarray:
    """One checkpoint tensor (our name) as the port holds it: rounded to the model dtype via float32,
    as the reference loads; A_log, dt_bias and D are rounded to the model dtype (as `model.to(dtype)`
    does to the reference) but held in float32, since every consumer upcasts them first anyway."""
    a = np.asarray(arr).astype(np.float32, copy=False).astype(np_dtype, copy=False)  # no copy if float32
    if name in ("A_log", "dt_bias", "D"):
        a = a.astype(np.float32, copy=False)
    if name in ("in_proj", "out_proj", "lm_head"):
        return a.T  # (out, in) -> (in, out) for x @ W
    if name == "conv_w":
        return a[:, 0, :].T  # (conv_dim, 1, k) -> (k, conv_dim)
    if name == "D" and cfg.d_has_hdim:
        return a.reshape(cfg.n_heads, cfg.head_dim)
    return a


def _to_params(cfg: Mamba2Config, wanted: dict, tensors: dict, np_dtype, fmt: str) -> dict:
    """Checked tensors -> params, rounded to the model dtype. Non-finite weights (NaN/inf stored, or
    a value beyond the dtype's range) are refused: every comparison built on them is meaningless."""
    layers: list[dict] = [{} for _ in range(cfg.n_layers)]
    params: dict = {}
    nonfinite = []
    for key, (ours, _) in wanted.items():
        name = ours[0] if isinstance(ours, tuple) else ours
        with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is reported just below
            a = to_port_layout(cfg, name, tensors[key], np_dtype)
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


def load_checkpoint(checkpoint_dir: str | Path, dtype: str = "float32") -> tuple[Mamba2Config, dict, str]:
    """Read and convert a checkpoint directory. Returns (config, params, format)."""
    _check_dtype(dtype)  # before reading gigabytes
    checkpoint_dir = require_checkpoint_dir(checkpoint_dir)
    cfg, fmt = load_config(checkpoint_dir)
    params = map_tensors(cfg, fmt, read_tensors(checkpoint_dir), dtype)
    return cfg, params, fmt
