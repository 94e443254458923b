"""The two checkpoints the planted-defect tests write to tmp_path (rows 8 and 10: porting bugs
#8 and #10 of docs/porting-bugs.md), and a float64 numpy Mamba-2 forward: the oracle for the row 8
checkpoint, which the torch reference cannot load."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import numpy as np


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
    from equiv.io.safetensors_io import read_safetensors, write_safetensors
    from equiv.mamba2.config_file import load_config
    from equiv.mamba2.convert import _PREFIX

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

    from equiv_reference.mamba2.make_fixtures import TinySpec, build_model

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
