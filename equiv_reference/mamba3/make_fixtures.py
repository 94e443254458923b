"""Tiny random Mamba-3 checkpoints in mamba_ssm's MambaLMHeadModel layout (ssm_cfg.layer "Mamba3").

    python -m equiv_reference.mamba3.make_fixtures [--out fixtures] [--only mamba3-tiny-mimo,...]

Each fixture is `config.json` (equiv.mamba3.config_mamba_ssm.config_to_mamba_ssm) + `model.safetensors`
(written by equiv.io.safetensors_io: sorted, no metadata) + `generator.json` (seed, parameters,
purpose, versions; `python -m equiv_reference.manifest` copies it into fixtures/manifest.json, which
this script leaves alone). Weights come from numpy's PCG64 with a fixed seed per fixture, drawn in
float64 and rounded to float32: the bytes depend on numpy alone. When mamba_ssm is importable, every
name and shape is checked against its Mamba3 (equiv_reference/mamba3/lm.py, strict=True).

Why not mamba_ssm's init: B_bias = C_bias = 1, D = 1, mimo_x = 1/R, norm weights of exactly 1 make
a port that ignores a bias, D, a norm weight or a MIMO projection still match. Here every tensor is
random around a meaningful value: dt_bias the inverse softplus of a log-uniform dt, in_proj's dd_A,
trap and angle rows scaled so A = -softplus(dd_A) spans about [-3, -0.05] (the A_floor fixture clamps
about a quarter of it), the trapezoid's lambda spans about [0.2, 0.8] and the rotation speeds vary;
biases 1 +- 0.3, D 1 +- 0.3, norm weights 1 +- 0.1, logits spread by several units.

Kernel constraints shape the sizes: the Triton SISO kernel needs head dims (headdim, d_state) that
are powers of two and tl.dot tiles of at least 16 (chunk_size >= 16); TileLang MIMO is tested for
headdim 32/64/128 and chunk_size x rank <= 64; mamba_ssm's decode step expands B/C from ngroups to
nheads with `expand`, which works only for ngroups 1 or ngroups = nheads. The odd sizes go where
they are allowed: nheads 3, d_model 48, vocab 97.
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

from equiv.io.safetensors_io import write_safetensors
from equiv.mamba3.config import Mamba3Config
from equiv.mamba3.config_mamba_ssm import config_to_mamba_ssm

GENERATOR = "equiv_reference.mamba3.make_fixtures"


@dataclass(frozen=True, kw_only=True)
class TinySpec:
    """name: directory name. seed: PCG64 seed. config: Mamba3Config fields. dt_range: the log-uniform
    range of dt_bias's softplus. purpose: the edge cases the fixture exercises."""

    name: str
    seed: int
    config: dict = field(default_factory=dict)
    dt_range: tuple[float, float] = (1e-3, 1e-1)
    purpose: str = ""

    def cfg(self) -> Mamba3Config:
        return Mamba3Config(**self.config)


SPECS = (
    TinySpec(name="mamba3-tiny-siso", seed=3001, config=dict(
        vocab_size=97, d_model=48, n_layers=2, d_state=16, expand=2, headdim=32, ngroups=1, rope_fraction=0.5,
        chunk_size=16, fused_add_norm=False),
        purpose="SISO, rope_fraction 0.5 (4 of 8 pairs rotate), odd nheads 3 and vocab 97, one B/C group "
                "shared by every head, tied lm_head, residual_in_fp32, chunk 16 (a 40-token input spans 3 "
                "chunks)"),
    TinySpec(name="mamba3-tiny-siso-rope1-outnorm", seed=3002, dt_range=(1e-2, 1.0), config=dict(
        vocab_size=96, d_model=32, n_layers=2, d_state=16, expand=2, headdim=16, ngroups=4, rope_fraction=1.0,
        is_outproj_norm=True, A_floor=0.3, chunk_size=16, residual_in_fp32=False, tie_embeddings=False,
        fused_add_norm=False),
        purpose="SISO, rope_fraction 1.0 (every pair rotates), is_outproj_norm (gated RMSNorm per head "
                "before out_proj, no silu gate in the kernel), A_floor 0.3 (the floor clamps A often), "
                "ngroups = nheads 4 (per-head B/C), large dt (angles pass 2 pi within a few tokens, fast "
                "decay), untied lm_head, residual_in_fp32 false"),
    TinySpec(name="mamba3-tiny-mimo", seed=3003, config=dict(
        vocab_size=96, d_model=32, n_layers=2, d_state=16, expand=2, headdim=32, ngroups=1, rope_fraction=0.5,
        is_mimo=True, mimo_rank=2, chunk_size=16, fused_add_norm=False),
        purpose="MIMO rank 2 (per-rank B/C, biases and mimo_x/z/o projections, rotate-half RoPE), "
                "rope_fraction 0.5, chunk 16 (chunk x rank 32), tied lm_head; the TileLang kernel "
                "needs a GPU"),
)


def _inverse_softplus(y: np.ndarray) -> np.ndarray:
    return y + np.log(-np.expm1(-y))


def weights(cfg: Mamba3Config, rng: np.random.Generator, dt_range=(1e-3, 1e-1)) -> dict[str, np.ndarray]:
    """Every parameter of the layout, by name, float64 (rounded to float32 by the writer)."""
    d, v, e, h, n = cfg.d_model, cfg.vocab_size, cfg.d_inner, cfg.nheads, cfg.d_state
    r, p, bc = cfg.rank, cfg.headdim, cfg.bc_dim
    normal = lambda shape, std: rng.standard_normal(shape) * std  # noqa: E731
    around = lambda shape, centre, spread: centre + normal(shape, spread)  # noqa: E731
    w = {"backbone.embedding.weight": normal((v, d), 1.0)}
    for i in range(cfg.n_layers):
        pre = f"backbone.layers.{i}."
        m = pre + "mixer."
        w[pre + "norm.weight"] = around(d, 1.0, 0.1)
        # rows: z | x | B | C | dd_dt | dd_A | trap | angle, each scaled for its own role
        stds = [1.0, 1.0, 1.0, 1.0, 0.5, 1.5, 1.5, 1.5]
        w[m + "in_proj.weight"] = np.concatenate(
            [normal((size, d), std / math.sqrt(d)) for size, std in zip(cfg.in_proj_splits, stds)])
        dt = np.exp(rng.uniform(math.log(dt_range[0]), math.log(dt_range[1]), h))
        w[m + "dt_bias"] = _inverse_softplus(dt)
        w[m + "B_bias"] = around((h, r, n), 1.0, 0.3)
        w[m + "C_bias"] = around((h, r, n), 1.0, 0.3)
        w[m + "B_norm.weight"] = around(n, 1.0, 0.1)
        w[m + "C_norm.weight"] = around(n, 1.0, 0.1)
        if cfg.is_mimo:
            w[m + "mimo_x"] = around((h, r, p), 1.0 / r, 0.3 / r)
            w[m + "mimo_z"] = around((h, r, p), 1.0, 0.3)
            w[m + "mimo_o"] = around((h, r, p), 1.0 / r, 0.3 / r)
        w[m + "D"] = around(h, 1.0, 0.3)
        if cfg.is_outproj_norm:
            w[m + "norm.weight"] = around(e, 1.0, 0.1)
        w[m + "out_proj.weight"] = normal((d, e), 1.0 / math.sqrt(e))
    assert bc == cfg.rank * cfg.ngroups * n
    w["backbone.norm_f.weight"] = around(d, 1.0, 0.1)
    if not cfg.tie_embeddings:
        w["lm_head.weight"] = normal((v, d), 3.0 / math.sqrt(d))
    return w


def fixture_versions() -> dict:
    """numpy makes the bytes; torch, transformers and mamba_ssm (the layout check's environment, and what
    every fixture of the suite records) are read from their metadata, None when not installed."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(dist):
        try:
            return version(dist)
        except PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "numpy": np.__version__, "torch": installed("torch"),
            "transformers": installed("transformers"), "mamba_ssm": installed("mamba-ssm")}


def generator_record(spec: TinySpec) -> dict:
    return {"generator": GENERATOR, "seed": spec.seed, "model_type": "mamba3",
            "rng": f"numpy PCG64 (numpy.random.default_rng({spec.seed}))", "dt_range": list(spec.dt_range),
            "purpose": spec.purpose, "params": config_to_mamba_ssm(spec.cfg()),
            "versions": fixture_versions()}


def check_against_mamba_ssm(cfg: Mamba3Config, tensors: dict[str, np.ndarray]) -> str:
    """Names and shapes against mamba_ssm's Mamba3 stack; 'skipped (...)' when it cannot import."""
    try:
        from equiv_reference.mamba3.kernels import Mamba3Unavailable
        from equiv_reference.mamba3.lm import build
    except ImportError as e:
        return f"skipped ({e})"
    try:
        model = build(cfg)
    except Mamba3Unavailable as e:
        return f"skipped ({e})"
    want = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    got = {k: tuple(t.shape) for k, t in tensors.items()}
    if want != got:
        shapes = {k: (got[k], want[k]) for k in set(want) & set(got) if got[k] != want[k]}
        raise RuntimeError(f"tensors differ from mamba_ssm's Mamba3 layout: missing "
                           f"{sorted(set(want) - set(got))}, unknown {sorted(set(got) - set(want))}, "
                           f"shapes (ours, mamba_ssm's) {shapes}")
    return "checked against mamba_ssm's Mamba3 state_dict"


def write_fixture(spec: TinySpec, out_root: Path) -> tuple[Path, str]:
    cfg = spec.cfg()
    tensors = {k: v.astype(np.float32) for k, v in
               weights(cfg, np.random.default_rng(spec.seed), spec.dt_range).items()}
    checked = check_against_mamba_ssm(cfg, tensors)
    out = out_root / spec.name
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "model.safetensors", tensors)
    (out / "config.json").write_text(json.dumps(config_to_mamba_ssm(cfg), indent=1, sort_keys=True) + "\n")
    (out / "generator.json").write_text(json.dumps(generator_record(spec), indent=1, sort_keys=True) + "\n")
    return out, checked


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
    for spec in SPECS:
        if spec.name in wanted:
            out, checked = write_fixture(spec, args.out)
            sizes = ", ".join(f"{p.name} {p.stat().st_size:,} B" for p in sorted(out.iterdir()))
            print(f"wrote {out}: {sizes}; {checked}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
