"""Tiny random transformers-format Mamba-1 and Falcon-Mamba checkpoints for the tests and the main job.

    python -m equiv_reference.mamba1.make_fixtures [--out fixtures] [--only mamba1-tiny-oddrank,...]

Each fixture is `config.json` + `model.safetensors` (`save_pretrained(safe_serialization=True)`) plus
`generator.json` (seed, parameters, purpose, versions; `python -m equiv_reference.manifest` copies it
into fixtures/manifest.json, which this script leaves alone). Weights come from numpy's PCG64 with a
fixed seed per fixture, drawn in float64 and rounded to float32, so a regeneration is bit-identical.

Why not transformers' default init: it sets D = 1, A_log = log(1..n) in every channel, zero conv bias and
norm weights of exactly 1, so a port that ignores D, a norm weight or the conv bias, or that reads A_log
transposed, still matches. Here every tensor is random around a meaningful value: A_log = log(1..n)
plus per-entry jitter (each channel decays differently), dt_proj.bias the inverse softplus of a
log-uniform dt in [1e-3, 1e-1] (the range Mamba is trained in: long memory, the scan's carried state
matters), D ~ 1 +- 0.3, norm weights 1 +- noise, projections scaled so activations are O(1) and logits
spread by several units.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from equiv_reference.mamba1.provenance import CLASSES, import_modeling

GENERATOR = "equiv_reference.mamba1.make_fixtures"

# d=48 (e=96, n=12, k=4): small enough for seconds per harness run, d/16 = 3 for the "auto" rank.
BASE = dict(vocab_size=96, hidden_size=48, num_hidden_layers=2, state_size=12, expand=2, conv_kernel=4,
            time_step_rank=3, layer_norm_epsilon=1e-5, residual_in_fp32=True, use_conv_bias=True,
            use_bias=False, tie_word_embeddings=True, hidden_act="silu", use_mambapy=False,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)


@dataclass(frozen=True, kw_only=True)
class TinySpec:
    """Attributes: name: directory name. seed: PCG64 seed. model_type: "mamba" or "falcon_mamba".
    overrides: config changes from BASE. purpose: the edge case the fixture exercises."""

    name: str
    seed: int
    model_type: str = "mamba"
    overrides: dict = field(default_factory=dict)
    purpose: str = ""

    def config_kwargs(self) -> dict:
        return BASE | self.overrides


SPECS = (
    TinySpec(name="mamba1-tiny-oddrank", seed=2001, overrides=dict(time_step_rank=5),
             purpose="odd time_step_rank 5 (x_proj's dt/B/C split is not a multiple of anything), tied "
                     "lm_head, conv bias, residual_in_fp32=True"),
    TinySpec(name="mamba1-tiny-untied-bias", seed=2002, overrides=dict(
        hidden_size=64, time_step_rank=4, state_size=16, use_bias=True, tie_word_embeddings=False,
        residual_in_fp32=False),
        purpose="separate lm_head weight, in_proj/out_proj biases (a padded position's in_proj output is "
                "its bias), residual_in_fp32=False"),
    TinySpec(name="mamba1-tiny-noconvbias", seed=2003, overrides=dict(use_conv_bias=False, conv_kernel=3,
                                                                      state_size=8),
             purpose="conv1d without bias and conv_kernel 3 (conv state of width 2)"),
    TinySpec(name="falcon-mamba-tiny", seed=2004, model_type="falcon_mamba",
             overrides=dict(hidden_size=64, time_step_rank=4, state_size=16, mixer_rms_eps=1e-6,
                            tie_word_embeddings=False),
             purpose="Falcon-Mamba: weightless RMS norms (mixer_rms_eps) on dt, B and C before dt_proj and "
                     "the scan; untied lm_head"),
)


def _inverse_softplus(y: np.ndarray) -> np.ndarray:
    return y + np.log(-np.expm1(-y))


def _weights(cfg, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every parameter of the model, by its transformers name, float64 (rounded later)."""
    d, v, e = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    n, k, r = cfg.state_size, cfg.conv_kernel, int(cfg.time_step_rank)
    normal = lambda shape, std: rng.standard_normal(shape) * std  # noqa: E731
    around_one = lambda size: 1.0 + normal(size, 0.1)  # noqa: E731
    w = {"backbone.embeddings.weight": normal((v, d), 1.0)}
    for i in range(cfg.num_hidden_layers):
        p = f"backbone.layers.{i}."
        w[p + "norm.weight"] = around_one(d)
        w[p + "mixer.in_proj.weight"] = normal((2 * e, d), 1.0 / math.sqrt(d))
        w[p + "mixer.conv1d.weight"] = normal((e, 1, k), 0.5)  # sum of k terms: O(1)
        if cfg.use_conv_bias:
            w[p + "mixer.conv1d.bias"] = normal(e, 0.2)
        w[p + "mixer.x_proj.weight"] = normal((r + 2 * n, e), 1.0 / math.sqrt(e))
        # dt_proj(dt_low) moves softplus(dt) by a factor ~e^(+-0.5) around its bias's value
        w[p + "mixer.dt_proj.weight"] = normal((e, r), 0.5 / math.sqrt(r))
        dt = np.exp(rng.uniform(math.log(1e-3), math.log(1e-1), e))
        w[p + "mixer.dt_proj.bias"] = _inverse_softplus(dt)
        w[p + "mixer.A_log"] = np.log(np.arange(1, n + 1))[None, :] + rng.uniform(-0.3, 0.3, (e, n))
        w[p + "mixer.D"] = 1.0 + normal(e, 0.3)
        w[p + "mixer.out_proj.weight"] = normal((d, e), 1.0 / math.sqrt(e))
        if cfg.use_bias:
            w[p + "mixer.in_proj.bias"] = normal(2 * e, 0.2)
            w[p + "mixer.out_proj.bias"] = normal(d, 0.2)
    w["backbone.norm_f.weight"] = around_one(d)
    if not cfg.tie_word_embeddings:
        w["lm_head.weight"] = normal((v, d), 3.0 / math.sqrt(d))  # logits std ~3
    return w


def build_model(spec: TinySpec):
    """The fixture's model (float32, every parameter set from the spec's seed)."""
    mm = import_modeling(spec.model_type)
    config_cls, model_cls = (getattr(mm, name) for name in CLASSES[spec.model_type])
    cfg = config_cls(**spec.config_kwargs())
    torch.manual_seed(spec.seed)  # the default init runs first; every value is then overwritten
    model = model_cls(cfg).eval()
    weights = _weights(cfg, np.random.default_rng(spec.seed))
    params = dict(model.named_parameters())  # tied lm_head.weight is the embedding itself: listed once
    missing, unknown = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if missing or unknown:
        raise RuntimeError(f"{spec.name}: parameters not randomised {missing}; unknown names {unknown}")
    with torch.no_grad():
        for name, value in weights.items():
            if tuple(value.shape) != tuple(params[name].shape):
                raise RuntimeError(f"{spec.name}: {name} expected shape {tuple(params[name].shape)}, "
                                   f"got {value.shape}")
            params[name].copy_(torch.from_numpy(value.astype(np.float32)))
    return model


def fixture_versions() -> dict:
    """The packages whose version can change a fixture's bytes."""
    import safetensors
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__,
            "safetensors": safetensors.__version__}


def generator_record(spec: TinySpec) -> dict:
    return {"generator": GENERATOR, "seed": spec.seed, "model_type": spec.model_type,
            "rng": f"numpy PCG64 (numpy.random.default_rng({spec.seed}))",
            "purpose": spec.purpose, "params": spec.config_kwargs(), "versions": fixture_versions()}


def write_fixture(spec: TinySpec, out_root: Path) -> Path:
    out = out_root / spec.name
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("model.safetensors", "config.json", "generation_config.json", "generator.json"):
        (out / stale).unlink(missing_ok=True)
    build_model(spec).save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").unlink(missing_ok=True)  # generation defaults come from the caller
    (out / "generator.json").write_text(json.dumps(generator_record(spec), indent=1, sort_keys=True) + "\n")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("fixtures"), help="fixtures root (default: fixtures)")
    ap.add_argument("--only", default="", help="comma-separated fixture names (default: all)")
    args = ap.parse_args(argv)
    names = [s.name for s in SPECS]
    wanted = [n for n in args.only.split(",") if n] or names
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        ap.error(f"--only: expected names from {names}, got {unknown}")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    for spec in SPECS:
        if spec.name in wanted:
            out = write_fixture(spec, args.out)
            sizes = ", ".join(f"{p.name} {p.stat().st_size:,} B" for p in sorted(out.iterdir()))
            print(f"wrote {out}: {sizes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
