"""The null distribution of the error-budget ratio: how far apart equally correct float32 computations
of the same model land, measured with the budget's own metric (equiv.compare.compare_tap).

The budget (README, "the error budget") passes a tap when err_port / max(err_ref, floor) <= budget.
A budget that means "as accurate as the reference" has to sit above the ratios that *correct*
float32 computations reach against the reference, and below what defects reach. This tool measures
the former: for every bundled fixture and several inputs it computes the ratio with an ALTERNATIVE
correct float32 computation standing in as the port, against the unchanged reference
(transformers float32, 1 torch thread, as the main job loads it) and the float64 oracle.

Alternatives (each a valid reordering of the same math; nothing about the model is changed):

  reference family (transformers float32, the reference runner itself, run in another order)
    torch-chunk-half / -double / -odd   every mixer's `chunk_size` (what `mamba2_chunk_scan` is called
                                        with) set to chunk//2, 2*chunk, or 3*chunk//4+1 (a non-divisor
                                        of every input length); the SSD is chunk-invariant in exact math
    torch-linear-kblock32 / -kblock64   `torch.nn.functional.linear` (every nn.Linear: in_proj, out_proj,
                                        lm_head) replaced during the run by a sum of K-block partial
                                        products x[..., k0:k1] @ w[:, k0:k1].T over blocks of 32 / 64,
                                        added in order, then + bias
    torch-linear-reversed               F.linear(x.flip(-1), w.flip(-1), b): the same dot products with
                                        the contraction axis reversed, so BLAS pairs and accumulates the
                                        terms in another order
    torch-threads2                      torch intra-op threads 2 instead of 1
    torch-chunk-half+kblock32, torch-chunk-odd+reversed+threads2
                                        several reorderings at once (a port reorders every op)
  random-rounding family (the reference run with Monte Carlo arithmetic; not a reordering, a model of
  another math library: the strict reorderings above share every elementwise op with the reference,
  so their errors stay correlated with its own and they under-sample the null)
    torch-mca-1..8                      every float32 result of an arithmetic torch op multiplied by
                                        (1 + xi 2^-23), xi ~ U(-1, 1) per element, rounded to float32
                                        (<= ~2 ulp per op; RandomRounding), 8 seeds
    torch-mca+chunk-odd+kblock32-1..2   the same with chunk-odd and kblock32
    torch-mca-half-1..4                 amplitude 2^-24 (<= ~1 ulp per op): the sensitivity check
  JAX family (the project's own pure-JAX port; reported separately)
    jax-builtin                         `resolve_port("builtin")` as shipped (K-blocks of 256)
    jax-kblock32 / jax-kblock64         in_proj/out_proj split into K-blocks of 32 / 64 (model.split_k)
    jax-unsplit                         one XLA dot per projection (no K-blocking)
    jax-chunk-half / jax-chunk-odd      the port's cfg.chunk_size changed as above

Modes: ACCUMULATED (each side one forward; what the main job's accumulated mode compares) for every
alternative; ISOLATED (each op fed the oracle's inputs, `forward_isolated`) for the JAX family only.
The torch reference has no op-by-op entry point, so torch reorderings are not measured isolated.

Optionally (repository checkout only) the planted cancellation defect of tests/planted_ssd.py
(segment sums as differences of cumulative sums) is measured the same way, as the signal the null
has to stay below.

    python -m equiv_reference.mamba2.calibration --out docs/calibration.json [--seeds N] [--fixtures ...]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from equiv.compare import FLOOR_ULPS, compare_tap, tolerance

SCHEMA = {"schema": "ssm-equiv/calibration", "schema_version": 1}
MODES = ("accumulated", "isolated")


# ---------------------------------------------------------------------------------------------
# the alternatives


def chunk_half(c: int) -> int:
    return max(c // 2, 1)


def chunk_double(c: int) -> int:
    return 2 * c


def chunk_odd(c: int) -> int:
    """3c/4 + 1: divides none of the input lengths used here (c, 2c + 5, 64)."""
    return 3 * c // 4 + 1


@dataclass(frozen=True)
class TorchAlt:
    name: str
    chunk: object = None  # callable(chunk) -> chunk, or None: the checkpoint's
    linear: str | None = None  # None, "kblock32", "kblock64", "reversed"
    threads: int = 1
    mca_seed: int | None = None  # random rounding at every op (RandomRounding), seeded per input
    mca_amplitude: float = 2.0 ** -23  # its relative amplitude
    family: str = "reference"


@dataclass(frozen=True)
class JaxAlt:
    name: str
    k_block: int | None = 256  # None: unsplit projections
    chunk: object = None
    family: str = "jax"


TORCH_ALTERNATIVES = (
    TorchAlt("torch-chunk-half", chunk=chunk_half),
    TorchAlt("torch-chunk-double", chunk=chunk_double),
    TorchAlt("torch-chunk-odd", chunk=chunk_odd),
    TorchAlt("torch-linear-kblock32", linear="kblock32"),
    TorchAlt("torch-linear-kblock64", linear="kblock64"),
    TorchAlt("torch-linear-reversed", linear="reversed"),
    TorchAlt("torch-threads2", threads=2),
    TorchAlt("torch-chunk-half+kblock32", chunk=chunk_half, linear="kblock32"),
    TorchAlt("torch-chunk-odd+reversed+threads2", chunk=chunk_odd, linear="reversed", threads=2),
    *(TorchAlt(f"torch-mca-{i}", mca_seed=i, family="reference-mca") for i in range(1, 9)),
    *(TorchAlt(f"torch-mca+chunk-odd+kblock32-{i}", chunk=chunk_odd, linear="kblock32", mca_seed=i,
               family="reference-mca") for i in range(1, 3)),
    *(TorchAlt(f"torch-mca-half-{i}", mca_seed=10 + i, mca_amplitude=2.0 ** -24, family="reference-mca-half")
      for i in range(1, 5)),
)
JAX_ALTERNATIVES = (
    JaxAlt("jax-builtin"),
    JaxAlt("jax-kblock32", k_block=32),
    JaxAlt("jax-kblock64", k_block=64),
    JaxAlt("jax-unsplit", k_block=None),
    JaxAlt("jax-chunk-half", chunk=chunk_half),
    JaxAlt("jax-chunk-odd", chunk=chunk_odd),
)
ALTERNATIVES = {a.name: a for a in (*TORCH_ALTERNATIVES, *JAX_ALTERNATIVES)}
ISOLATED_ALTERNATIVES = tuple(a.name for a in JAX_ALTERNATIVES)
DEFECT = "segsum_cumsum_difference"


class LinearPatch:
    """While active, `torch.nn.functional.linear` (what every nn.Linear.forward calls) computes the
    same product in another order; `calls` counts the calls it took over (proof that it ran)."""

    def __init__(self, how: str):
        import torch

        self.torch, self.how, self.calls = torch, how, 0
        self.original = torch.nn.functional.linear

    def _linear(self, x, w, b=None):
        self.calls += 1
        if self.how == "reversed":
            return self.original(x.flip(-1), w.flip(-1), b)
        block = int(self.how.removeprefix("kblock"))
        y = None
        for k0 in range(0, x.shape[-1], block):
            part = self.torch.matmul(x[..., k0:k0 + block], w[:, k0:k0 + block].t())
            y = part if y is None else y + part
        return y if b is None else y + b

    def __enter__(self):
        self.torch.nn.functional.linear = self._linear
        return self

    def __exit__(self, *exc):
        self.torch.nn.functional.linear = self.original


def _rounding_mode_class():
    from torch.overrides import TorchFunctionMode

    class RandomRounding(TorchFunctionMode):
        """Monte Carlo arithmetic's random rounding, at every arithmetic op of a float32 forward: each
        float32 result of an op in ARITHMETIC is multiplied by (1 + xi * amplitude), xi ~ U(-1, 1)
        drawn per element from a seeded generator, and rounded back to float32. With amplitude 2^-23
        a result moves by at most ~2 ulp (1 ulp is 2^-23 to 2^-24 relative): a model of another math
        library whose every op (exp, softplus, rsqrt, reductions...) lands within a couple of ulp of
        torch's, the most independent rounding a torch run can get without new code; 2^-24 (at most
        ~1 ulp) is the sensitivity check. `ops` counts the perturbed results."""

        def __init__(self, seed: int, amplitude: float = 2.0 ** -23):
            import torch

            super().__init__()
            self.torch, self.gen, self.ops = torch, torch.Generator().manual_seed(seed), 0
            self.amplitude = amplitude

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            torch = self.torch
            if (getattr(func, "__name__", "") in ARITHMETIC and isinstance(out, torch.Tensor)
                    and out.dtype is torch.float32 and out.numel()):
                xi = torch.rand(out.shape, generator=self.gen, dtype=torch.float64) * 2 - 1
                out = (out.double() * (1 + xi * self.amplitude)).float()
                self.ops += 1
            return out

    return RandomRounding


ARITHMETIC = frozenset({
    "matmul", "einsum", "mm", "bmm", "addmm", "linear", "conv1d", "add", "__add__", "__radd__", "sub",
    "__sub__", "__rsub__", "mul", "__mul__", "__rmul__", "div", "__truediv__", "__rtruediv__", "exp",
    "softplus", "rsqrt", "sqrt", "pow", "__pow__", "mean", "sum", "cumsum", "silu", "sigmoid", "log",
    "expm1", "log1p", "tanh"})
"""Out-of-place torch ops whose float32 result is rounded (random rounding perturbs these; views,
copies, casts, clamps, masks by indexing and in-place ops are left alone)."""


@contextlib.contextmanager
def torch_threads(n: int):
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def run_torch_alternative(runner, alt: TorchAlt, base_chunk: int, ids, input_index: int = 0
                          ) -> tuple[dict, dict]:
    """The float32 transformers runner `runner` run as `alt`; restores it afterwards. Random
    rounding is seeded by (alt.mca_seed, input_index), so every input gets its own draw."""
    chunk = alt.chunk(base_chunk) if alt.chunk else base_chunk
    mixers = [layer.mixer for layer in runner.model.backbone.layers]
    patch = LinearPatch(alt.linear) if alt.linear else contextlib.nullcontext()
    rounding = (_rounding_mode_class()(1000 * alt.mca_seed + input_index, alt.mca_amplitude)
                if alt.mca_seed is not None else contextlib.nullcontext())
    try:
        for mx in mixers:
            mx.chunk_size = chunk
        with torch_threads(alt.threads), patch, rounding:
            taps = runner.run(ids, None)
    finally:
        for mx in mixers:
            mx.chunk_size = base_chunk
    return taps, {"chunk_size": chunk, "linear_calls_patched": getattr(patch, "calls", 0),
                  "threads": alt.threads, "ops_randomly_rounded": getattr(rounding, "ops", 0)}


def jax_model(alt: JaxAlt, path: Path):
    """The built-in port loaded from `path`, with alt's K-blocking and chunk size."""
    from equiv.mamba2 import model as m
    from equiv.mamba2.convert import load_checkpoint
    from equiv.mamba2.port import Mamba2Model

    cfg, params, fmt = load_checkpoint(path, "float32")
    if alt.chunk:
        cfg = dataclasses.replace(cfg, chunk_size=alt.chunk(cfg.chunk_size))
    if alt.k_block is not None:
        split = {"in_proj", "out_proj"}
        params = params | {"layers": [{k: m.split_k(v, alt.k_block) if k in split else v
                                       for k, v in lp.items()} for lp in params["layers"]]}
    return Mamba2Model(cfg, params, "float32", str(path), fmt, "highest")


# ---------------------------------------------------------------------------------------------
# measuring


def tap_kind(name: str) -> str:
    """'layers.3.mixer.ssm' -> 'layers.*.mixer.ssm'."""
    return re.sub(r"^layers\.\d+", "layers.*", name)


def ratios_for(alt_taps: dict, ref_taps: dict, oracle_taps: dict) -> dict[str, dict]:
    """{tap: {"ratio", "ratio_max", "identical", "err_alt", "err_ref"}} with the alternative as the
    port (equiv.compare.compare_tap). Taps that are exact on both sides (err 0: the embedding
    lookup) carry no rounding at all and are left out: their ratio is 0/floor by construction."""
    out = {}
    for name, ref in ref_taps.items():
        if name not in alt_taps or name not in oracle_taps:
            continue
        c = compare_tap(name, alt_taps[name], ref, oracle_taps[name], dtype="float32")
        if c.err_port == 0.0 and c.err_ref == 0.0:
            continue
        out[name] = {"ratio": c.ratio, "ratio_max": c.ratio_max, "err_alt": c.err_port,
                     "err_ref": c.err_ref,
                     "identical": bool(np.array_equal(np.asarray(alt_taps[name]), np.asarray(ref)))}
    return out


def inputs_for(path: Path, cfg: dict, seeds: int) -> list[tuple[str, np.ndarray]]:
    """('plan', the main job's layer-wise ids: equiv.check.plan_for) and `seeds` random-id inputs
    ('seed-1'..), each (2, 2 * chunk + 5) uniform over the vocabulary (seeds 1001, 1002, ...)."""
    from equiv.check import plan_for
    from equiv.mamba2.config_file import load_config

    chunk, vocab = cfg["chunk_size"], cfg["vocab_size"]
    # the lengths the built-in port declares (port protocol v1), as the main job passes them
    out = [("plan", plan_for(path, vocab, load_config(path)[0].decode_lengths).layerwise_ids)]
    for s in range(1, seeds + 1):
        rng = np.random.default_rng(1000 + s)
        out.append((f"seed-{s}", rng.integers(0, vocab, (2, 2 * chunk + 5)).astype(np.int32)))
    return out


def measure_fixture(name: str, seeds: int, alternatives, modes=MODES, defect: bool = False,
                    progress=print) -> tuple[list[dict], dict]:
    """Rows {mode, alternative, family, fixture, input, tap, kind, ratio, ratio_max, identical} for one
    fixture, and run details (chunk sizes, patched-linear call counts, bit-identity per alternative)."""
    from equiv.fixtures import fixture_dir, verify_fixture
    from equiv.references import load_reference

    verify_fixture(name)
    path = fixture_dir(name)
    cfg = json.loads((path / "config.json").read_text())
    oracle = load_reference("transformers", path, "float64")  # threads=1, as the main job
    reference = load_reference("transformers", path, "float32")
    alt_runner = load_reference("transformers", path, "float32")
    base_chunk = alt_runner.model.backbone.layers[0].mixer.chunk_size
    torch_alts = [a for a in alternatives if isinstance(a, TorchAlt)]
    jax_alts = [a for a in alternatives if isinstance(a, JaxAlt)]
    models = {a.name: jax_model(a, path) for a in jax_alts}
    planted = None
    if defect:
        from tests.planted_defects import plant  # a repository checkout only

        planted = plant(jax_model(JaxAlt("jax-builtin"), path), DEFECT)
    rows, details = [], {}

    def add(mode, alt_name, family, label, taps, ref_taps, oracle_taps):
        for tap, r in ratios_for(taps, ref_taps, oracle_taps).items():
            rows.append({"mode": mode, "alternative": alt_name, "family": family, "fixture": name,
                         "input": label, "tap": tap, "kind": tap_kind(tap), **r})

    for index, (label, ids) in enumerate(inputs_for(path, cfg, seeds)):
        progress(f"[{name}] {label} {tuple(ids.shape)}")
        oracle_taps, ref_taps = oracle.run(ids, None), reference.run(ids, None)
        fed = {k: np.asarray(v, np.float64).astype(np.float32) for k, v in oracle_taps.items()}
        for alt in torch_alts:
            taps, info = run_torch_alternative(alt_runner, alt, base_chunk, ids, index)
            d = details.setdefault(alt.name, {})
            counted = ("linear_calls_patched", "ops_randomly_rounded")
            d.update({k: v for k, v in info.items() if k not in counted})
            for k in counted:
                d[k] = d.get(k, 0) + info[k]
            same = all(np.array_equal(taps[k], ref_taps[k]) for k in ref_taps)
            d["bit_identical_inputs"] = d.get("bit_identical_inputs", 0) + int(same)
            if "accumulated" in modes:
                add("accumulated", alt.name, alt.family, label, taps, ref_taps, oracle_taps)
        for alt in jax_alts:
            model = models[alt.name]
            details.setdefault(alt.name, {"chunk_size": model.cfg.chunk_size,
                                          "k_block": alt.k_block or "unsplit"})
            if "accumulated" in modes:
                add("accumulated", alt.name, alt.family, label, model.forward(ids, None, taps=True),
                    ref_taps, oracle_taps)
            if "isolated" in modes:
                add("isolated", alt.name, alt.family, label, model.forward_isolated(ids, None, fed),
                    ref_taps, oracle_taps)
        if planted is not None:
            for mode in modes:
                taps = (planted.forward(ids, None, taps=True) if mode == "accumulated"
                        else planted.forward_isolated(ids, None, fed))
                add(mode, DEFECT, "defect", label, taps, ref_taps, oracle_taps)
    details["_reference"] = {"chunk_size": base_chunk, "threads": 1}
    return rows, details


# ---------------------------------------------------------------------------------------------
# aggregation


GROUPS = {
    "reference": lambda r: r["family"] == "reference",
    "reference+mca": lambda r: r["family"] in ("reference", "reference-mca", "reference-mca-half"),
    "mca-half": lambda r: r["family"] == "reference-mca-half",
    "jax-builtin": lambda r: r["alternative"] == "jax-builtin",
    "jax-all": lambda r: r["family"] == "jax",
    "null-all": lambda r: r["family"] in ("reference", "reference-mca", "reference-mca-half", "jax"),
    "defect": lambda r: r["family"] == "defect",
}


def stats(values: list[float]) -> dict:
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return {"n": 0}
    return {"n": int(v.size), "max": float(v.max()), "p99": float(np.percentile(v, 99)),
            "median": float(np.median(v))}


def where_max(rows: list[dict]) -> dict | None:
    if not rows:
        return None
    r = max(rows, key=lambda r: r["ratio"])
    return {k: r[k] for k in ("alternative", "fixture", "input", "tap", "ratio")}


def aggregate(rows: list[dict]) -> dict:
    """{mode: {group: {kind: {"ratio": stats, "ratio_max": stats, "argmax": ...}}}} plus per
    alternative {mode: {alternative: {kind: max ratio}}}."""
    out: dict = {"by_group": {}, "by_alternative": {}}
    for mode in MODES:
        in_mode = [r for r in rows if r["mode"] == mode]
        if not in_mode:
            continue
        kinds = sorted({r["kind"] for r in in_mode}, key=kind_order)
        for group, pick in GROUPS.items():
            chosen = [r for r in in_mode if pick(r)]
            if not chosen:
                continue
            g = out["by_group"].setdefault(mode, {}).setdefault(group, {})
            for kind in ["*", *kinds]:
                sel = [r for r in chosen if kind == "*" or r["kind"] == kind]
                if sel:
                    g[kind] = {"ratio": stats([r["ratio"] for r in sel]),
                               "ratio_max": stats([r["ratio_max"] for r in sel]), "argmax": where_max(sel)}
        for alt in sorted({r["alternative"] for r in in_mode}):
            sel = [r for r in in_mode if r["alternative"] == alt]
            out["by_alternative"].setdefault(mode, {})[alt] = {
                kind: float(max(r["ratio"] for r in sel if r["kind"] == kind))
                for kind in kinds if any(r["kind"] == kind for r in sel)} | {
                "*": float(max(r["ratio"] for r in sel)),
                "*ratio_max": float(max(r["ratio_max"] for r in sel)),
                "identical_fraction": float(np.mean([r["identical"] for r in sel]))}
    return out


def kind_order(kind: str) -> tuple:
    from equiv.mamba2.taps import LAYER_SUBTAPS

    order = ["embed", *[f"layers.*.{s}" for s in LAYER_SUBTAPS], "layers.*", "norm_f", "logits"]
    return (order.index(kind) if kind in order else len(order), kind)


def current_budget(mode: str) -> float:
    key = "error_budget_accumulated" if mode == "accumulated" else "error_budget"
    return tolerance("float32", key).budget


def current_guard(mode: str) -> float:
    """The max-error guard as compare_tap scales it: guard * budget / the per-op budget."""
    return tolerance("float32", "max_error_guard").budget * current_budget(mode) / tolerance("float32").budget


def table(agg: dict, metric: str = "ratio") -> str:
    """mode x tap kind for `metric` ("ratio": the RMS budget's ratio; "ratio_max": the max-error
    guard's): null max of the strict reference reorderings (and their p99 / median), with the
    random-rounding runs added, with the shipped JAX port added, with every JAX variant added (= the
    whole null), the limit now, limit / whole-null max, and the planted defect's median and max."""
    limit_of = current_budget if metric == "ratio" else current_guard
    cols = ("reorder", "reorder", "reorder", "+mca", "+builtin", "+jax all", "budget" if metric == "ratio"
            else "guard", "limit/", "defect", "defect")
    sub = ("max", "p99", "median", "max", "max", "max", "now", "null max", "median", "max")
    lines = [f"{metric:<11} {'tap kind':<24}" + "".join(f"{c:>9}" for c in cols),
             f"{'mode':<11} {'':<24}" + "".join(f"{c:>9}" for c in sub)]
    lines.append("-" * len(lines[0]))
    for mode, groups in agg["by_group"].items():
        limit = limit_of(mode)
        kinds = sorted({k for g in groups.values() for k in g}, key=lambda k: (k != "*", kind_order(k)))
        for kind in kinds:
            def get(group, stat="max", groups=groups, kind=kind):
                return groups.get(group, {}).get(kind, {}).get(metric, {}).get(stat)

            def upto(*groups_, get=get):
                v = [x for x in map(get, groups_) if x is not None]
                return max(v) if v else None

            null_all = get("null-all")
            cells = (get("reference"), get("reference", "p99"), get("reference", "median"),
                     upto("reference+mca"), upto("reference+mca", "jax-builtin"), null_all, limit,
                     limit / null_all if null_all else None, get("defect", "median"), get("defect"))
            lines.append(f"{mode:<11} {('all taps' if kind == '*' else kind):<24}"
                         + "".join(f"{'-':>9}" if c is None else f"{c:>9.2f}" for c in cells))
        lines.append("")
    return "\n".join(lines)


def defect_table(rows: list[dict]) -> str:
    """The planted defect's ratio per fixture, mode and tap kind (min / median / max over inputs and
    layers), with the whole null's max for the same fixture, mode and kind beside it."""
    d = [r for r in rows if r["family"] == "defect"]
    if not d:
        return ""
    lines = [f"planted {DEFECT}: RMS ratio min / median / max over inputs x layers | null max (same "
             "fixture, mode, kind) | plan input's max"]
    for fixture in sorted({r["fixture"] for r in d}):
        for mode in MODES:
            for kind in sorted({r["kind"] for r in d if r["mode"] == mode}, key=kind_order):
                if not kind.endswith(("mixer.ssm", "gated_norm")) and kind != "layers.*":
                    continue
                sel = [r for r in d if (r["fixture"], r["mode"], r["kind"]) == (fixture, mode, kind)]
                if not sel:
                    continue
                v = [r["ratio"] for r in sel]
                null = [r["ratio"] for r in rows if r["family"] != "defect"
                        and (r["fixture"], r["mode"], r["kind"]) == (fixture, mode, kind)]
                plan = [r["ratio"] for r in sel if r["input"] == "plan"]
                lines.append(f"  {fixture:<18} {mode:<11} {kind:<22} {min(v):>7.2f} "
                             f"{float(np.median(v)):>7.2f} {max(v):>7.2f} | "
                             f"{max(null) if null else float('nan'):>7.2f} | "
                             f"{max(plan) if plan else float('nan'):>7.2f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the run


def family_of(result: dict, alternative: str) -> str:
    return result["alternatives"].get(alternative, {}).get("family", "defect")


def rows_of(result: dict) -> list[dict]:
    """The JSON's nested `ratios` {mode: {alternative: {fixture: {input: {tap: [ratio, ratio_max,
    identical]}}}}} as flat rows {mode, alternative, family, fixture, input, tap, kind, ratio,
    ratio_max, identical}."""
    out = []
    for mode, by_alt in result["ratios"].items():
        for alt, by_fixture in by_alt.items():
            for fixture, by_input in by_fixture.items():
                for label, taps in by_input.items():
                    for tap, (ratio, ratio_max, identical) in taps.items():
                        out.append({"mode": mode, "alternative": alt, "family": family_of(result, alt),
                                    "fixture": fixture, "input": label, "tap": tap, "kind": tap_kind(tap),
                                    "ratio": ratio, "ratio_max": ratio_max, "identical": bool(identical)})
    return out


def nested(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        (out.setdefault(r["mode"], {}).setdefault(r["alternative"], {}).setdefault(r["fixture"], {})
         .setdefault(r["input"], {}))[r["tap"]] = [float(f"{r['ratio']:.5g}"), float(f"{r['ratio_max']:.5g}"),
                                                   int(r["identical"])]
    return out


def calibrate(fixtures: list[str] | None = None, seeds: int = 4, alternatives: list[str] | None = None,
              modes=MODES, defect_fixtures: list[str] | None = None, progress=print) -> dict:
    """Everything the JSON holds (see the module docstring)."""
    from equiv import tested_versions
    from equiv.fixtures import list_fixtures

    names = fixtures or [n for n in list_fixtures() if n != "golden"]
    alts = [ALTERNATIVES[a] for a in (alternatives or list(ALTERNATIVES))]
    defect_fixtures = [] if defect_fixtures is None else defect_fixtures
    t0 = time.perf_counter()
    rows, details, seconds = [], {}, {}
    for name in names:
        t = time.perf_counter()
        r, d = measure_fixture(name, seeds, alts, modes, defect=name in defect_fixtures, progress=progress)
        rows += r
        details[name] = d
        seconds[name] = round(time.perf_counter() - t, 1)
    import torch

    return SCHEMA | {
        "what": "ratio err_alt / max(err_ref, floor) (equiv.compare.compare_tap, float32, floor "
                f"{FLOOR_ULPS} ULPs) of alternative correct float32 computations against the float32 "
                "reference (transformers, 1 thread) and the float64 oracle; taps exact on both sides "
                "(err 0) left out",
        "fixtures": names, "seeds": seeds, "modes": list(modes),
        "inputs": "plan (equiv.check.plan_for layer-wise ids) + seed-1..seed-N: (2, 2*chunk+5) random ids, "
                  "numpy default_rng(1000+s)",
        "alternatives": {a.name: {"family": a.family, **{k: (v.__name__ if callable(v) else v)
                                                          for k, v in dataclasses.asdict(a).items()
                                                          if k not in ("name", "family")}} for a in alts},
        "isolated_measured_for": ([a.name for a in alts if a.name in ISOLATED_ALTERNATIVES]
                                  if "isolated" in modes else []),
        "defect": {"name": DEFECT, "fixtures": defect_fixtures,
                   "source": "tests/planted_ssd.py ssd_chunked_cumsum_difference via "
                             "tests.planted_defects.plant"},
        "budgets_now": {m: current_budget(m) for m in MODES},
        "max_guards_now": {m: current_guard(m) for m in MODES},
        "run_details": details,
        "aggregate": aggregate(rows),
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0],
                    "torch_threads_reference": 1, "cpu_count": os.cpu_count()},
        "versions": ({k: v for k, v in tested_versions.installed_versions().items() if v}
                     | {"torch": torch.__version__}),
        "seconds": seconds | {"total": round(time.perf_counter() - t0, 1)},
        "ratios_layout": "ratios[mode][alternative][fixture][input][tap] = [ratio, ratio_max, identical "
                         "(1: the alternative's tap is bit-identical to the reference's)]",
        "ratios": nested(rows),
    }


def to_json(result: dict) -> str:
    """Indented down to the inputs; each input's {tap: [...]} on one line."""
    def dump(x, depth, level=1):
        if depth == 0 or not isinstance(x, dict):
            return json.dumps(x, allow_nan=False)
        pad = " " * (level + 1)
        items = (f"{pad}{json.dumps(k)}: {dump(v, depth - 1, level + 1)}" for k, v in x.items())
        return "{\n" + ",\n".join(items) + "}"

    head = json.dumps({k: v for k, v in result.items() if k != "ratios"}, indent=1, allow_nan=False)
    return head[:-2] + ',\n "ratios": ' + dump(result["ratios"], 4) + "\n}\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m equiv_reference.mamba2.calibration",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="where to write the JSON")
    p.add_argument("--seeds", type=int, default=4, help="random-id inputs per fixture besides the plan's")
    p.add_argument("--fixtures", nargs="*", default=None, help="default: every bundled fixture")
    p.add_argument("--alternatives", nargs="*", default=None, choices=sorted(ALTERNATIVES),
                   help="default: all")
    p.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    p.add_argument("--defect-fixtures", nargs="*", default=None,
                   help=f"fixtures on which to measure the planted {DEFECT} too (default: all measured; "
                        "needs the checkout's tests/ importable; pass none to skip)")
    a = p.parse_args(argv)
    progress = lambda msg: print(f"calibration: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    if a.defect_fixtures is None:
        from equiv.fixtures import list_fixtures

        a.defect_fixtures = a.fixtures or [n for n in list_fixtures() if n != "golden"]
    try:
        import tests.planted_defects  # noqa: F401
    except ImportError as e:
        if a.defect_fixtures:
            progress(f"planted defect not measured: cannot import tests.planted_defects ({e})")
        a.defect_fixtures = []
    result = calibrate(a.fixtures, a.seeds, a.alternatives, tuple(a.modes), a.defect_fixtures, progress)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(to_json(result))
    print(table(result["aggregate"]))
    print(table(result["aggregate"], "ratio_max"))
    rows = rows_of(result)
    print(defect_table(rows))
    print(f"\n{len(rows)} ratios, {result['seconds']['total']:.0f} s; written to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
