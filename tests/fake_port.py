"""A tiny model-agnostic fake for testing the harness (layerwise, report, cli) without Mamba-2.

A 3-layer numpy toy whose port, reference and oracle versions the tests control:

    embed        (b, l, d)  E[ids]
    layers.i.a   (b, l, d)  tanh(h @ W_i)
    layers.i.mix (b, l, d)  causal running mean of a over l (masked): the "sequence mixer"
    layers.i     (b, l, d)  h + mix @ U_i
    norm_f       (b, l, d)  RMSNorm(h)
    logits       (b, l, v)  norm_f @ E.T

The reference computes the running mean as a lower-triangular matmul, the port as a cumulative sum:
two legitimate float32 orders, so the port's error is not identical to the reference's and the
budget ratio is a real measurement (around 1), not exactly 1. A `Defect` plants a relative
perturbation at one tap of the port; in accumulated mode it propagates downstream like a real bug.

The checkpoint is a directory with config.json: {"vocab_size", "d_model", "n_layers", "seed"} and,
read by the port only, "fake_defects": [{"tap": ..., "size": ...}]; a missing directory or config
raises CheckpointError like a real port.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np

from equiv.errors import CheckpointError
from equiv.ports import PortInfo, TapUnavailable

DTYPES = {"float32": np.float32, "float64": np.float64, "bfloat16": np.float32}


@dataclass(frozen=True)
class Defect:
    """Multiply the port's value at `tap` by (1 + size * pattern), pattern a fixed +-1 mix."""

    tap: str
    size: float = 1e-3


@dataclass(frozen=True)
class FakeConfig:
    vocab_size: int = 16
    d_model: int = 8
    n_layers: int = 3
    seed: int = 0


def write_checkpoint(path: Path, cfg: FakeConfig = FakeConfig(), defects=(), **extra) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    body = {"vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "n_layers": cfg.n_layers,
            "seed": cfg.seed, "fake_defects": [{"tap": d.tap, "size": d.size} for d in defects], **extra}
    (path / "config.json").write_text(json.dumps(body))
    return path


def read_checkpoint(path) -> tuple[FakeConfig, list[Defect]]:
    cfg_path = Path(path) / "config.json"
    try:
        body = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"fake checkpoint: expected a readable {cfg_path}, got {e}") from None
    cfg = FakeConfig(body["vocab_size"], body["d_model"], body["n_layers"], body["seed"])
    return cfg, [Defect(d["tap"], d["size"]) for d in body.get("fake_defects", [])]


def weights(cfg: FakeConfig) -> dict[str, np.ndarray]:
    """float32 weights, as a checkpoint stores them; the oracle reads the same values in float64."""
    rng = np.random.default_rng(cfg.seed)
    d = cfg.d_model
    w = {"E": rng.standard_normal((cfg.vocab_size, d)).astype(np.float32)}
    for i in range(cfg.n_layers):
        w[f"W{i}"] = (rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32)
        w[f"U{i}"] = (rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32)
    return w


def tap_names(n_layers: int, extra: tuple[str, ...] = ()) -> list[str]:
    names = ["embed"]
    for i in range(n_layers):
        names += [f"layers.{i}.a", f"layers.{i}.mix", f"layers.{i}"]
        names += [f"layers.{i}.{e}" for e in extra]
    return names + ["norm_f", "logits"]


class _Ops:
    """The toy's ops in one compute dtype; bfloat16 rounds every op's output to bf16."""

    def __init__(self, dtype: str, cumsum_mean: bool):
        self.np_dtype, self.bf16, self.cumsum_mean = DTYPES[dtype], dtype == "bfloat16", cumsum_mean

    def round(self, x):
        x = np.asarray(x, self.np_dtype)
        return x.astype(ml_dtypes.bfloat16).astype(np.float32) if self.bf16 else x

    def a(self, h, W):
        return self.round(np.tanh(h @ W.astype(self.np_dtype)))

    def mix(self, a, mask):
        a = a * mask[..., None].astype(self.np_dtype)  # b l d
        count = np.maximum(np.cumsum(mask, axis=1), 1).astype(self.np_dtype)[..., None]  # b l 1
        if self.cumsum_mean:
            total = np.cumsum(a, axis=1)
        else:
            l = a.shape[1]
            tri = np.tril(np.ones((l, l), self.np_dtype))  # l l
            total = np.einsum("ls,bsd->bld", tri, a)
        return self.round(total / count)

    def block(self, h, mix, U):
        return self.round(h + mix @ U.astype(self.np_dtype))

    def norm(self, h):
        return self.round(h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + 1e-6))

    def logits(self, n, E):
        return self.round(n @ E.astype(self.np_dtype).T)


def _perturb(name: str, x: np.ndarray, defects) -> np.ndarray:
    for d in defects:
        if d.tap == name:
            pattern = np.where(np.arange(x.size).reshape(x.shape) % 3 == 0, 1.0, -1.0)
            x = (x * (1 + d.size * pattern)).astype(x.dtype)
    return x


def _mask(ids, mask):
    return np.ones(ids.shape, np.int64) if mask is None else np.asarray(mask, np.int64)


def full_forward(ops: _Ops, w, cfg: FakeConfig, ids, mask, defects=(), extra=()) -> dict[str, np.ndarray]:
    m = _mask(ids, mask)
    out = {}

    def tap(name, x):
        out[name] = _perturb(name, x, defects)
        return out[name]

    h = tap("embed", ops.round(w["E"].astype(ops.np_dtype)[ids]))
    for i in range(cfg.n_layers):
        a = tap(f"layers.{i}.a", ops.a(h, w[f"W{i}"]))
        mix = tap(f"layers.{i}.mix", ops.mix(a, m))
        for e in extra:
            out[f"layers.{i}.{e}"] = a
        h = tap(f"layers.{i}", ops.block(h, mix, w[f"U{i}"]))
    n = tap("norm_f", ops.norm(h))
    tap("logits", ops.logits(n, w["E"]))
    return {k: np.asarray(v) for k, v in out.items()}


class FakeModel:
    """The port side (LoadedModel protocol)."""

    def __init__(self, cfg: FakeConfig, dtype: str, defects=(), extra_taps=(), isolated=True):
        self.cfg, self.dtype, self.defects = cfg, dtype, list(defects)
        self.extra_taps, self.isolated = tuple(extra_taps), isolated
        self.w = weights(cfg)
        self.ops = _Ops(dtype, cumsum_mean=True)
        self.tap_names = tap_names(cfg.n_layers, self.extra_taps)
        self.vocab_size = cfg.vocab_size

    def info(self) -> PortInfo:
        return PortInfo("fake", "0", {"dtype": self.dtype, "defects": [d.tap for d in self.defects],
                                      "jax_default_matmul_precision": "n/a (numpy)"})

    def forward(self, ids, mask=None, taps=True):
        out = full_forward(self.ops, self.w, self.cfg, ids, mask, self.defects, self.extra_taps)
        return out if taps else {"logits": out["logits"]}

    def forward_isolated(self, ids, mask, inputs):
        if not self.isolated:
            raise TapUnavailable("fake port: isolated mode switched off")
        m, ops, out = _mask(ids, mask), self.ops, {}
        get = lambda name: np.asarray(inputs[name], ops.np_dtype)  # noqa: E731
        out["embed"] = ops.round(self.w["E"][ids])
        for i in range(self.cfg.n_layers):
            prev = "embed" if i == 0 else f"layers.{i - 1}"
            out[f"layers.{i}.a"] = ops.a(get(prev), self.w[f"W{i}"])
            out[f"layers.{i}.mix"] = ops.mix(get(f"layers.{i}.a"), m)
            out[f"layers.{i}"] = ops.block(get(prev), get(f"layers.{i}.mix"), self.w[f"U{i}"])
        out["norm_f"] = ops.norm(get(f"layers.{self.cfg.n_layers - 1}"))
        out["logits"] = ops.logits(get("norm_f"), self.w["E"])
        return {k: _perturb(k, v, self.defects) for k, v in out.items()}


class FakePort:
    """`--port tests.fake_port:FakePort`: defects come from the checkpoint's "fake_defects"."""

    def __init__(self, defects=(), extra_taps=(), isolated=True):
        self.name = "fake"  # an instance attribute: the class itself must not pass as a Port
        self.defects, self.extra_taps, self.isolated = list(defects), tuple(extra_taps), isolated

    def load(self, checkpoint_dir, dtype="float32") -> FakeModel:
        cfg, defects = read_checkpoint(checkpoint_dir)
        return FakeModel(cfg, dtype, self.defects + defects, self.extra_taps, self.isolated)


@dataclass
class FakeRunner:
    """The reference side: run(ids, mask) in float32 / bfloat16, or float64 as the oracle."""

    cfg: FakeConfig
    dtype: str
    extra_taps: tuple = ()
    calls: list = field(default_factory=list)

    def run(self, ids, mask=None) -> dict[str, np.ndarray]:
        self.calls.append(ids.shape)
        ops = _Ops(self.dtype, cumsum_mean=False)
        return full_forward(ops, weights(self.cfg), self.cfg, ids, mask, (), self.extra_taps)

    def provenance(self) -> dict:
        return {"runner": "fake", "code_path": "numpy triangular-matmul mean", "dtype": self.dtype,
                "versions": {"numpy": np.__version__}}


def load_fake_reference(checkpoint_dir, dtype="float32") -> FakeRunner:
    """`--reference tests.fake_port:load_fake_reference`."""
    cfg, _ = read_checkpoint(checkpoint_dir)
    return FakeRunner(cfg, dtype)


def NoIsolatedFakePort() -> FakePort:  # noqa: N802 (a factory standing in for a class in `--port`)
    """`--port tests.fake_port:NoIsolatedFakePort`: raises TapUnavailable in isolated mode."""
    return FakePort(isolated=False)
