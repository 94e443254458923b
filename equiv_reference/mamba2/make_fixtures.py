"""Tiny random transformers-format Mamba-2 checkpoints for the tests and the main job.

    python -m equiv_reference.mamba2.make_fixtures [--out fixtures] [--only tiny-g1,...] [--no-manifest]

Each fixture is `config.json` + `model.safetensors` (`save_pretrained(safe_serialization=True)`)
plus `generator.json` (seed, parameters, versions; copied into fixtures/manifest.json). Weights come
from numpy's PCG64 with a fixed seed per fixture, drawn in float64 and rounded to float32, so a
regeneration is bit-identical (same numpy: PCG64 streams are stable across platforms).

Why not transformers' default init: it sets A = -(1..h), D = 1, zero conv bias and norm weights of
exactly 1, so a port that ignores D, a norm weight or the conv bias still matches. Every tensor here is
random: A = -exp(A_log) in [-16, -1] for some heads (fast decay) and in [-0.01, -0.001] for others
(long memory, so state carried across chunk boundaries matters), dt_bias spread so softplus(dt) spans
~1e-3..1, D random with both signs, norm weights 1 +- noise, projections scaled so activations are
O(1) and logits spread by several units (greedy decodes are not near-ties).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from equiv_reference.mamba2.dispatch import import_modeling_mamba2

GENERATOR = "equiv_reference.mamba2.make_fixtures"

# Shared shape (d=64, e=128, h=8 heads of p=16, n=16, k=4). chunk_size 16 is small so that short
# inputs cross chunk boundaries (the inter-chunk recurrence runs).
BASE = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, state_size=16, head_dim=16, num_heads=8,
            expand=2, conv_kernel=4, chunk_size=16, layer_norm_epsilon=1e-5, residual_in_fp32=True,
            use_conv_bias=True, use_bias=False, tie_word_embeddings=True, n_groups=1,
            time_step_limit=(0.0, float("inf")), bos_token_id=1, eos_token_id=2, pad_token_id=0)


@dataclass(frozen=True, kw_only=True)
class TinySpec:
    """Attributes: name: directory name. seed: PCG64 seed. overrides: transformers config changes
    from BASE. purpose: what the fixture exercises (numbers of docs/porting-bugs.md)."""

    name: str
    seed: int
    overrides: dict = field(default_factory=dict)
    purpose: str = ""

    def config_kwargs(self) -> dict:
        return BASE | self.overrides


SPECS = (
    TinySpec(name="tiny-g1", seed=1001, purpose="n_groups=1: B/C shared by all heads"),
    TinySpec(name="tiny-g2", seed=1002, overrides=dict(n_groups=2),
             purpose="1 < g < h: B/C expansion order and per-group gated norm (docs/porting-bugs.md #1, #2)"),
    TinySpec(name="tiny-gh", seed=1003, overrides=dict(n_groups=8), purpose="g = h: one group per head"),
    TinySpec(name="tiny-untied", seed=1004, overrides=dict(n_groups=2, tie_word_embeddings=False),
             purpose="separate lm_head weight"),
    TinySpec(name="tiny-dtlimit-bias", seed=1005,
             overrides=dict(n_groups=2, time_step_limit=(0.05, 0.5), use_bias=True),
             purpose="dt clamp active on both bounds (docs/porting-bugs.md #4) and in/out_proj biases"),
)


def _weights(cfg, rng: np.random.Generator, dt_limited: bool) -> dict[str, np.ndarray]:
    """Every parameter of Mamba2ForCausalLM, by its transformers name, float64 (rounded later)."""
    d, v, e = cfg.hidden_size, cfg.vocab_size, cfg.expand * cfg.hidden_size
    h, g, n, k = cfg.num_heads, cfg.n_groups, cfg.state_size, cfg.conv_kernel
    conv_dim = e + 2 * g * n
    normal = lambda shape, std: rng.standard_normal(shape) * std  # noqa: E731
    around_one = lambda size: 1.0 + normal(size, 0.1)  # noqa: E731
    w = {"backbone.embeddings.weight": normal((v, d), 1.0)}
    for i in range(cfg.num_hidden_layers):
        p = f"backbone.layers.{i}."
        w[p + "norm.weight"] = around_one(d)
        w[p + "mixer.in_proj.weight"] = normal((2 * e + 2 * g * n + h, d), 1.0 / math.sqrt(d))
        w[p + "mixer.conv1d.weight"] = normal((conv_dim, 1, k), 0.5)  # sum of k terms: O(1)
        w[p + "mixer.conv1d.bias"] = normal(conv_dim, 0.2)
        # half the heads decay fast (A in [-16, -1]), half barely (A in [-0.01, -0.001]), shuffled
        fast = rng.permutation(np.arange(h) < h // 2)
        a_fast, a_slow = rng.uniform(0.0, math.log(16.0), h), rng.uniform(math.log(1e-3), math.log(1e-2), h)
        w[p + "mixer.A_log"] = np.where(fast, a_fast, a_slow)
        # softplus(raw + dt_bias): the clamp fixture straddles both bounds (0.05, 0.5); the others
        # spread dt over ~1e-3..1
        w[p + "mixer.dt_bias"] = rng.uniform(-4.0, 1.0, h) if dt_limited else rng.uniform(-6.0, 0.5, h)
        w[p + "mixer.D"] = rng.uniform(-1.0, 2.0, h)
        w[p + "mixer.norm.weight"] = around_one(e)
        w[p + "mixer.out_proj.weight"] = normal((d, e), 1.0 / math.sqrt(e))
        if cfg.use_bias:
            w[p + "mixer.in_proj.bias"] = normal(2 * e + 2 * g * n + h, 0.2)
            w[p + "mixer.out_proj.bias"] = normal(d, 0.2)
    w["backbone.norm_f.weight"] = around_one(d)
    if not cfg.tie_word_embeddings:
        w["lm_head.weight"] = normal((v, d), 3.0 / math.sqrt(d))  # logits std ~3
    return w


def build_model(spec: TinySpec):
    """The fixture's Mamba2ForCausalLM (float32, every parameter set from the spec's seed)."""
    mm = import_modeling_mamba2()
    cfg = mm.Mamba2Config(**spec.config_kwargs())
    torch.manual_seed(spec.seed)  # the default init runs first; every value is then overwritten
    model = mm.Mamba2ForCausalLM(cfg).eval()
    lo, hi = cfg.time_step_limit
    weights = _weights(cfg, np.random.default_rng(spec.seed), dt_limited=(lo, hi) != (0.0, math.inf))
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
    """The packages whose version can change a fixture's bytes (config.json records transformers';
    the weights depend on numpy's PCG64 and float rounding, the file on safetensors)."""
    import platform

    import safetensors
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__,
            "safetensors": safetensors.__version__}


def generator_record(spec: TinySpec) -> dict:
    """What manifest.py copies into fixtures/manifest.json for this fixture."""
    kw = spec.config_kwargs()
    kw["time_step_limit"] = [float(x) if math.isfinite(x) else "inf" for x in kw["time_step_limit"]]
    return {"generator": GENERATOR, "seed": spec.seed,
            "rng": f"numpy PCG64 (numpy.random.default_rng({spec.seed}))",
            "purpose": spec.purpose, "params": kw, "versions": fixture_versions()}


def write_fixture(spec: TinySpec, out_root: Path) -> Path:
    out = out_root / spec.name
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("model.safetensors", "config.json", "generation_config.json", "generator.json"):
        (out / stale).unlink(missing_ok=True)
    model = build_model(spec)
    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").unlink(missing_ok=True)  # generation defaults come from the caller
    (out / "generator.json").write_text(json.dumps(generator_record(spec), indent=1, sort_keys=True) + "\n")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("fixtures"), help="fixtures root (default: fixtures)")
    ap.add_argument("--only", default="", help="comma-separated fixture names (default: all)")
    ap.add_argument("--no-manifest", action="store_true", help="do not rewrite <out>/manifest.json")
    args = ap.parse_args(argv)
    names = [s.name for s in SPECS]
    wanted = [n for n in args.only.split(",") if n] or names
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        ap.error(f"--only: expected names from {names}, got {unknown}")
    torch.set_num_threads(1)
    for spec in SPECS:
        if spec.name in wanted:
            out = write_fixture(spec, args.out)
            sizes = ", ".join(f"{p.name} {p.stat().st_size:,} B" for p in sorted(out.iterdir()))
            print(f"wrote {out}: {sizes}")
    if not args.no_manifest:
        from equiv_reference.manifest import write_manifest

        path = write_manifest(args.out)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
