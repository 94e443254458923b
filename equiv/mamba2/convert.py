"""Checkpoint directory -> (Mamba2Config, params pytree). Strict: every key mapped, every shape
checked, missing and unexpected keys listed together in one error.

Formats: transformers (`config.json` + `model.safetensors` or a sharded
`model.safetensors.index.json`) and mamba_ssm (`config.json` with `ssm_cfg` + safetensors or
`pytorch_model.bin`). safetensors is preferred: a `.bin` is a pickle, opened only through
`torch.load(weights_only=True)`, which refuses to run code.

Params layout (a list of per-layer dicts; see equiv/mamba2/model.py for why not stacked):

    embed (v, d)   norm_f (d,)   lm_head (d, v) or absent when tied
    layers[i]: norm (d,)  in_proj (d, in_dim)  [in_proj_bias (in_dim,)]  conv_w (k, conv_dim)
               [conv_b (conv_dim,)]  dt_bias (h,)  A_log (h,)  D (h,) or (h, p)
               gnorm (e,)  out_proj (e, d)  [out_proj_bias (d,)]
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from equiv.errors import CheckpointError, EquivError
from equiv.mamba2.config import Mamba2Config, load_config
from equiv.safetensors_io import read_safetensors

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


def read_tensors(checkpoint_dir: Path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory, whichever of the supported file layouts it uses."""
    index = checkpoint_dir / "model.safetensors.index.json"
    single = checkpoint_dir / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: expected JSON with a 'weight_map' object, got an error: {e}") from None
        tensors = {}
        for name in files:
            if "/" in name or "\\" in name or name.startswith("."):
                raise CheckpointError(f"{index}: shard names must be plain file names, got {name!r}")
            shard = read_safetensors(checkpoint_dir / name)
            tensors |= shard
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(f"{index}: keys listed in weight_map but in no shard: {missing[:8]}")
        return tensors
    if single.is_file():
        return read_safetensors(single)
    bins = sorted(checkpoint_dir.glob("*.bin"))
    if bins:
        return _read_torch_bin(bins[0])
    raise CheckpointError(f"{checkpoint_dir}: expected model.safetensors, model.safetensors.index.json or "
                          f"pytorch_model.bin, found {sorted(p.name for p in checkpoint_dir.iterdir())[:10]}")


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    """A pickle checkpoint, only through torch.load(weights_only=True): no code from the file runs."""
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: .bin checkpoints need torch (pip install torch); "
                              "prefer safetensors, which needs nothing") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: refused or unreadable by torch.load(weights_only=True): {first[:300]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a flat state dict of tensors, got {type(state).__name__}")
    return {k: v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
            for k, v in state.items()}


def map_tensors(cfg: Mamba2Config, fmt: str, tensors: dict[str, np.ndarray], dtype: str = "float32") -> dict:
    """Checkpoint tensors -> params pytree (see module docstring). Raises CheckpointError listing every
    missing, unexpected and misshapen key at once."""
    if dtype not in DTYPES:
        raise EquivError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    np_dtype = DTYPES[dtype]
    embed_key, layer_prefix = _PREFIX[fmt]
    shapes = expected_shapes(cfg)
    top = {embed_key: ("embed", (cfg.vocab_size, cfg.d_model)),
           "backbone.norm_f.weight": ("norm_f", (cfg.d_model,))}
    if not cfg.tie_embeddings:
        top["lm_head.weight"] = ("lm_head", (cfg.vocab_size, cfg.d_model))
    wanted = dict(top)
    for i in range(cfg.n_layers):
        for suffix, (ours, _) in _LAYER_KEYS.items():
            if ours in shapes:
                wanted[f"{layer_prefix}.{i}.{suffix}"] = ((ours, i), shapes[ours])
    tied_extra = []
    if cfg.tie_embeddings and "lm_head.weight" in tensors and embed_key in tensors:
        # save_pretrained may write the tied head too; accept it only if it really is the embedding
        if not np.array_equal(tensors["lm_head.weight"], tensors[embed_key]):
            tied_extra.append("lm_head.weight (present and different from the embedding although "
                              "tie_word_embeddings is true)")
    missing = sorted(set(wanted) - set(tensors))
    tied_head = {"lm_head.weight"} if cfg.tie_embeddings else set()
    unexpected = sorted(set(tensors) - set(wanted) - tied_head) + tied_extra
    misshapen = [f"{k}: expected {shape}, got {tuple(tensors[k].shape)}"
                 for k, (_, shape) in wanted.items() if k in tensors and tuple(tensors[k].shape) != shape]
    bad_dtype = [f"{k}: {tensors[k].dtype}" for k in wanted if k in tensors
                 and not np.issubdtype(np.asarray(tensors[k][:0]).dtype, np.floating)
                 and tensors[k].dtype != ml_dtypes.bfloat16]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing[:12])}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:12])}")
    if misshapen:
        problems.append("wrong shapes: " + "; ".join(misshapen[:12]))
    if bad_dtype:
        problems.append("expected floating tensors, got: " + ", ".join(bad_dtype[:12]))
    if problems:
        raise CheckpointError(f"{fmt} checkpoint does not match its config.json: " + " | ".join(problems))

    def conv(name, arr):
        arr = np.asarray(arr).astype(np.float32)
        if name == "in_proj" or name == "out_proj":
            return arr.T  # (out, in) -> (in, out) for x @ W
        if name == "conv_w":
            return arr[:, 0, :].T  # (conv_dim, 1, k) -> (k, conv_dim)
        if name == "D" and cfg.d_has_hdim:
            return arr.reshape(cfg.n_heads, cfg.head_dim)
        return arr

    layers: dict[str, list] = {}
    params: dict = {}
    for key, (ours, _) in wanted.items():
        if isinstance(ours, tuple):
            name, i = ours
            layers.setdefault(name, [None] * cfg.n_layers)[i] = conv(name, tensors[key])
        else:
            params[ours] = conv(ours, tensors[key])
    if "lm_head" in params:
        params["lm_head"] = params["lm_head"].T  # (v, d) -> (d, v)
    params["layers"] = [{name: arrs[i] for name, arrs in layers.items()} for i in range(cfg.n_layers)]
    # A_log, dt_bias and D are rounded to the model dtype (as `model.to(dtype)` does to the
    # reference) but held in float32: every consumer upcasts them first anyway.
    keep_fp32 = {"A_log", "dt_bias", "D"}

    def cast(name, a):
        a = np.asarray(a).astype(np_dtype)
        return jnp.asarray(a.astype(np.float32) if name in keep_fp32 else a)

    params["layers"] = [{k: cast(k, v) for k, v in lp.items()} for lp in params["layers"]]
    return {k: (v if k == "layers" else cast(k, v)) for k, v in params.items()}


def load_checkpoint(checkpoint_dir: str | Path, dtype: str = "float32") -> tuple[Mamba2Config, dict, str]:
    """Read and convert a checkpoint directory. Returns (config, params, format)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise CheckpointError(f"checkpoint: expected a directory, got {checkpoint_dir} "
                              f"({'a file' if checkpoint_dir.exists() else 'does not exist'})")
    cfg, fmt = load_config(checkpoint_dir)
    params = map_tensors(cfg, fmt, read_tensors(checkpoint_dir), dtype)
    return cfg, params, fmt
