"""Layer-wise diff: every tap of the port against the reference and the float64 oracle, in the port's
execution order, with the first divergence located and explained.

Two modes:

* accumulated: one forward per side (port, reference in the compared dtype, oracle in float64), so
  each tap carries every upstream rounding error. It answers "does the port compute the same thing
  end to end?", but a defect smears: every tap after it fails too.
* isolated: the port recomputes each tap from the oracle's values of its inputs
  (`LoadedModel.forward_isolated`), so each op is judged alone and a second defect downstream of a
  first one is still seen.

The harness is model-agnostic: tap names and their order come from the port's `tap_names`; taps
present on one side only are listed (port-only, reference-only), never dropped.
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import ml_dtypes
import numpy as np

from equiv import tested_versions
from equiv.compare import (
    FLOOR_ULPS,
    TapComparison,
    compare_tap,
    max_error_guard,
    reference_implausible,
    tolerance,
)
from equiv.errors import EquivError
from equiv.ports import TapUnavailable

MODES = ("accumulated", "isolated")
DTYPES = ("float32", "bfloat16")

ISOLATED_APPROXIMATION = (
    "isolated mode: each port tap is computed from the oracle's inputs to it (cast to the compared "
    "dtype) and compared with the oracle; the budget's denominator is the reference's *accumulated* "
    "error at that tap (the reference is not re-run op by op), which is usually larger than its per-op "
    "error, so the ratio leans lenient by about the reference's upstream error growth")


@dataclass
class FirstDivergence:
    tap: str
    index: int  # position in `LayerwiseResult.taps` (execution order)
    ratio: float
    explanation: str  # one line


@dataclass
class LayerwiseResult:
    mode: str
    dtype: str
    budget: float
    taps: list[TapComparison]  # execution order; one-sided taps included as 'unavailable'
    port_only: list[str]
    reference_only: list[str]
    first_divergence: FirstDivergence | None
    explanations: dict[str, str]  # one line per failing tap
    verdict: str  # 'equivalent', 'divergent' or 'inconclusive' (no tap could be compared)
    inputs: dict
    port: dict
    reference: dict
    oracle: dict
    settings: dict
    notes: list[str] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        verdicts = [t.verdict for t in self.taps]
        return {"total": len(self.taps), "pass": verdicts.count("pass"), "fail": verdicts.count("fail"),
                "unavailable": verdicts.count("unavailable"), "port_only": len(self.port_only),
                "reference_only": len(self.reference_only)}

    def tap(self, name: str) -> TapComparison:
        for t in self.taps:
            if t.name == name:
                return t
        raise KeyError(name)


# ---------------------------------------------------------------------------------------------
# alignment


def align_taps(port_order: list[str], reference_order: list[str]) -> tuple[list[str], list[str], list[str]]:
    """The union of both sides' taps in execution order: the port's order, with each reference-only
    tap placed after the last shared tap that precedes it on the reference side. Returns (order,
    port_only, reference_only)."""
    ref_set, port_set = set(reference_order), set(port_order)
    port_only = [t for t in port_order if t not in ref_set]
    reference_only = [t for t in reference_order if t not in port_set]
    after: dict[str | None, list[str]] = {}
    anchor = None
    for t in reference_order:
        if t in port_set:
            anchor = t
        else:
            after.setdefault(anchor, []).append(t)
    order = list(after.get(None, []))
    for t in port_order:
        order.append(t)
        order += after.get(t, [])
    return order, port_only, reference_only


def _one_sided(name: str, side: str, dtype: str, budget: float) -> TapComparison:
    other = "reference" if side == "port" else "port"
    return TapComparison(name=name, dtype=dtype, budget=budget, verdict="unavailable",
                         reason=f"{side} only: the {other} does not produce this tap")


def _in_compute_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """The oracle's value as the port would hold it: rounded to the compared dtype, handed over as
    float32 (bf16 values are exactly representable) so any numpy-speaking port can take it."""
    x = np.asarray(x, np.float64)
    if dtype == "bfloat16":
        return x.astype(ml_dtypes.bfloat16).astype(np.float32)
    return x.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# first divergence


def format_ratio(r: float | None) -> str:
    """'0.53x', '41.2x', '4163x', '2.10e+07x'; '-' when unknown."""
    if r is None or not math.isfinite(r):
        return "-"
    return f"{r:.2f}x" if r < 10 else f"{r:.1f}x" if r < 100 else f"{r:.0f}x" if r < 1e5 else f"{r:.2e}x"


def _ratio_text(t: TapComparison, dtype: str) -> str:
    if reference_implausible(t.ref_rel_error, t.judged_precision):
        return t.reason
    if math.isfinite(t.ratio) and not t.nonfinite.get("port_mismatch_count"):
        return f"{format_ratio(t.ratio)} the reference's {dtype} error"
    return t.reason


def explain(taps: list[TapComparison], index: int, mode: str, dtype: str) -> str:
    """One line saying why tap `index` failed and whether the defect is in its own op: only when the
    tap just before it was compared and passed. Taps not compared in between (unavailable, or
    produced by one side only) leave the defect "at or before" this op."""
    t = taps[index]
    head = f"{t.name}: {_ratio_text(t, dtype)}"
    if mode == "isolated":
        return f"{head}; fed the oracle's inputs, this op alone is off, so the defect is in this op"
    upstream = taps[:index]
    failed = [u.name for u in upstream if u.verdict == "fail"]
    if failed:
        return (f"{head}; upstream tap {failed[0]} already diverged, so this may only be its "
                f"consequence (--mode isolated judges this op alone)")
    # Taps run in execution order; a compared tap within budget vouches for what precedes it. A tap
    # not compared (unavailable, or produced by one side only) vouches for nothing: when such taps
    # lie between the last passing tap and this one, the defect may be in any of them.
    passed = [j for j in range(index) if taps[j].verdict == "pass"]
    last = passed[-1] if passed else -1
    gap = [u.name for u in taps[last + 1:index]]
    if gap:
        shown = ", ".join(gap[:3]) + (f" and {len(gap) - 3} more" if len(gap) > 3 else "")
        n, after = len(gap), (f"after {taps[last].name} (within budget) and " if last >= 0 else "")
        return (f"{head}; the first compared tap to fail, but {n} tap{'s' if n > 1 else ''} before it "
                f"{'were' if n > 1 else 'was'} not compared ({shown}): the defect is {after}at or before "
                "this op")
    if any(u.verdict != "pass" for u in upstream):
        return f"{head}; the tap before it, {taps[last].name}, is within budget, so the defect is in this op"
    return f"{head}; every upstream tap is within budget, so the defect is in this op"


def find_first_divergence(taps: list[TapComparison], mode: str, dtype: str) -> FirstDivergence | None:
    for i, t in enumerate(taps):
        if t.verdict == "fail":
            return FirstDivergence(t.name, i, t.ratio, explain(taps, i, mode, dtype))
    return None


# ---------------------------------------------------------------------------------------------
# the run


def _settings(dtype: str, budget: float, mode: str, port_details: dict, installed: dict) -> dict:
    precision = port_details.get("jax_default_matmul_precision")
    if precision is None and "jax" in sys.modules:
        precision = str(sys.modules["jax"].config.jax_default_matmul_precision)
    default = tolerance(dtype, "error_budget_accumulated" if mode == "accumulated" else "error_budget")
    reason = default.reason if budget == default.budget else (
        f"given with --budget (this mode's default is {default.budget:g}: {default.reason})")
    return {"dtype": dtype, "budget": budget, "budget_reason": reason, "mode": mode,
            "max_error_guard": max_error_guard(dtype, budget, mode),
            "floor_ulps": FLOOR_ULPS, "matmul_precision": precision or "unknown",
            "versions": {k: v for k, v in installed.items() if v is not None},
            "untested_versions": tested_versions.untested(installed)}


def describe_inputs(ids: np.ndarray, mask: np.ndarray | None, seed: int | None) -> dict:
    ids = np.ascontiguousarray(ids, dtype="<i4")  # little-endian int32, so the hash is portable
    return {"seed": seed, "shape": list(ids.shape), "ids_sha256": hashlib.sha256(ids.tobytes()).hexdigest(),
            "padded_positions": 0 if mask is None else int((np.asarray(mask) == 0).sum())}


def _validate(mode: str, dtype: str, budget) -> float:
    if mode not in MODES:
        raise EquivError(f"mode: expected one of {list(MODES)}, got {mode!r}")
    if dtype not in DTYPES:
        raise EquivError(f"dtype: expected one of {list(DTYPES)}, got {dtype!r}")
    if budget is None:  # accumulated taps inherit amplified upstream differences: own table entry
        key = "error_budget_accumulated" if mode == "accumulated" else "error_budget"
        return tolerance(dtype, key).budget
    if isinstance(budget, bool) or not isinstance(budget, int | float) or not (0 < budget < math.inf):
        raise EquivError(f"budget: expected a finite number > 0, got {budget!r}")
    return float(budget)


def run_layerwise(model, reference, oracle, ids, mask=None, mode: str = "accumulated",
                  dtype: str = "float32", budget: float | None = None,
                  progress: Callable[[str], None] | None = None, seed: int | None = None) -> LayerwiseResult:
    """Compare `model` (a LoadedModel) with `reference` (run in `dtype`) against `oracle` (the same
    reference run in float64). `reference` and `oracle` provide run(ids, mask) -> {tap: array} and
    provenance() -> dict. `progress(stage)` is told each stage as it starts."""
    budget = _validate(mode, dtype, budget)
    stage = progress or (lambda _stage: None)
    ids = np.asarray(ids)
    notes = [ISOLATED_APPROXIMATION] if mode == "isolated" else []

    stage("oracle forward (float64)")
    oracle_taps = oracle.run(ids, mask)
    stage(f"reference forward ({dtype})")
    ref_taps = reference.run(ids, mask)
    port_order = list(model.tap_names)
    if mode == "accumulated":
        stage("port forward")
        port_taps = model.forward(ids, mask, taps=True)
    else:
        stage("port forward (isolated)")
        fed = {k: _in_compute_dtype(v, dtype) for k, v in oracle_taps.items()}
        try:
            if not callable(getattr(model, "forward_isolated", None)):  # optional in the protocol
                raise TapUnavailable("its loaded model has no forward_isolated (optional in protocol v1)")
            port_taps = model.forward_isolated(ids, mask, fed)
        except TapUnavailable as e:
            port_taps = None
            notes.append(f"the port cannot run isolated mode: {e}")
    port_order += [k for k in (port_taps or {}) if k not in port_order]

    stage("comparing")
    guard = max_error_guard(dtype, budget, mode)
    order, port_only, reference_only = align_taps(port_order, list(ref_taps))
    one_sided = one_sided_taps(port_only, reference_only)
    # a reference that rounds coarser than `dtype` says so (e.g. mamba_ssm's Mamba-3 kernels on a GPU)
    precision = getattr(reference, "judged_precision", None)
    taps = [compare_aligned(name, one_sided, port_taps, ref_taps, oracle_taps, dtype, budget, guard,
                            precision) for name in order]
    return assemble_result(taps, port_only, reference_only, mode, dtype, budget, notes, model.info(),
                           reference.provenance(), oracle.provenance(), ids, mask, seed)


def one_sided_taps(port_only: list[str], reference_only: list[str]) -> dict[str, str]:
    """Tap -> the one side that produces it."""
    return {**{t: "port" for t in port_only}, **{t: "reference" for t in reference_only}}


def compare_aligned(name: str, one_sided: dict[str, str], port_taps: dict | None, ref_taps: dict,
                    oracle_taps: dict, dtype: str, budget: float, guard: float,
                    reference_precision: str | None = None) -> TapComparison:
    """One tap of the aligned order: one-sided, not run by the port (`port_taps` None: it cannot run
    isolated mode), or compared. The taps may be the whole run's or one layer's (equiv/stream)."""
    if name in one_sided:
        return _one_sided(name, one_sided[name], dtype, budget)
    if port_taps is None:
        return TapComparison(name=name, dtype=dtype, budget=budget, verdict="unavailable",
                             reason="the port cannot run this tap isolated")
    return compare_tap(name, port_taps.get(name), ref_taps.get(name), oracle_taps.get(name),
                       dtype=dtype, budget=budget, max_budget=guard, reference_precision=reference_precision)


def assemble_result(taps: list[TapComparison], port_only: list[str], reference_only: list[str], mode: str,
                    dtype: str, budget: float, notes: list[str], info, reference_provenance,
                    oracle_provenance, ids, mask, seed: int | None) -> LayerwiseResult:
    """The result from the per-tap comparisons in execution order: verdict, first divergence,
    explanations, settings and notes. Shared by the in-memory run and the layer-streamed one."""
    counts = [t.verdict for t in taps]
    verdict = "divergent" if "fail" in counts else "equivalent" if "pass" in counts else "inconclusive"
    installed = tested_versions.installed_versions()  # read once: the settings and the note
    untested = tested_versions.untested_note(installed)
    if untested:
        notes.append(untested)
    return LayerwiseResult(
        mode=mode, dtype=dtype, budget=budget, taps=taps, port_only=port_only, reference_only=reference_only,
        first_divergence=find_first_divergence(taps, mode, dtype),
        explanations={t.name: explain(taps, i, mode, dtype)
                      for i, t in enumerate(taps) if t.verdict == "fail"},
        verdict=verdict, inputs=describe_inputs(ids, mask, seed), port=asdict(info),
        reference=dict(reference_provenance), oracle=dict(oracle_provenance),
        settings=_settings(dtype, budget, mode, info.details, installed), notes=notes)
