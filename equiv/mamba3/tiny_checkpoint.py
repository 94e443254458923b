"""Random Mamba-3 checkpoints in the project's layout (docs/mamba3-layout.md), written with numpy
alone: for the port's tests and the oracle's self-checks, before (and besides) the torch-built
fixtures. Values are drawn near `Mamba3.__init__`'s initialisation, spread wider so every op
matters: dt from exp(U[log 1e-3, log 1e-1]) as its dt_bias init (times `dt_scale`), B/C biases and
norm weights around 1, D around 1, mimo_x and mimo_o around 1/R, mimo_z around 1, the linears
N(0, 1/fan_in)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from equiv.io.safetensors_io import write_safetensors
from equiv.mamba3.config import Mamba3Config
from equiv.mamba3.config_mamba_ssm import config_to_mamba_ssm


def random_tensors(cfg: Mamba3Config, seed: int = 0, dt_scale: float = 1.0, angle_scale: float = 1.0) -> dict:
    """{checkpoint key: float32 array} for `cfg`. `dt_scale` multiplies the initial dt (larger:
    stronger decay and faster rotation); `angle_scale` scales in_proj's angle rows."""
    rng = np.random.default_rng(seed)
    d, e, h, p, n, r = cfg.d_model, cfg.d_inner, cfg.nheads, cfg.headdim, cfg.d_state, cfg.rank
    f = np.float32

    def normal(shape, std):
        return (rng.standard_normal(shape) * std).astype(f)

    def around(shape, centre, spread):
        return (centre + spread * rng.standard_normal(shape)).astype(f)

    out = {"backbone.embedding.weight": normal((cfg.vocab_size, d), 1.0),
           "backbone.norm_f.weight": around((d,), 1.0, 0.1)}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = normal((cfg.vocab_size, d), 1 / math.sqrt(d))
    for i in range(cfg.n_layers):
        pre = f"backbone.layers.{i}."
        in_proj = normal((cfg.in_proj_dim, d), 1 / math.sqrt(d))
        in_proj[cfg.in_proj_dim - cfg.num_rope_angles:] *= angle_scale
        dt = np.exp(rng.uniform(math.log(1e-3), math.log(1e-1), h)) * dt_scale
        layer = {"norm.weight": around((d,), 1.0, 0.1), "mixer.in_proj.weight": in_proj,
                 "mixer.dt_bias": (dt + np.log(-np.expm1(-dt))).astype(f),
                 "mixer.B_bias": around((h, r, n), 1.0, 0.2), "mixer.C_bias": around((h, r, n), 1.0, 0.2),
                 "mixer.B_norm.weight": around((n,), 1.0, 0.1), "mixer.C_norm.weight": around((n,), 1.0, 0.1),
                 "mixer.D": around((h,), 1.0, 0.3), "mixer.out_proj.weight": normal((d, e), 1 / math.sqrt(e))}
        if cfg.is_mimo:
            layer |= {"mixer.mimo_x": around((h, r, p), 1 / r, 0.2),
                      "mixer.mimo_z": around((h, r, p), 1.0, 0.2),
                      "mixer.mimo_o": around((h, r, p), 1 / r, 0.2)}
        if cfg.is_outproj_norm:
            layer["mixer.norm.weight"] = around((e,), 1.0, 0.1)
        out |= {pre + k: v for k, v in layer.items()}
    return out


def write_checkpoint(path: str | Path, cfg: Mamba3Config, seed: int = 0, tensors: dict | None = None,
                     **draw) -> Path:
    """config.json + model.safetensors in `path` (created). `tensors` replaces the drawn ones."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config_to_mamba_ssm(cfg), indent=2))
    tensors = random_tensors(cfg, seed, **draw) if tensors is None else tensors
    write_safetensors(path / "model.safetensors", tensors)
    return path
