"""What every report of a layer-wise diff says, whatever its format: numbers printed on the right
side of their budget, each tap's reason for its verdict, the coverage of the comparison, the
summary line, and the statement of a golden replay. equiv/report.py renders these as the terminal
table, JSON and Markdown; equiv/report_html.py as the HTML page and its plot.

Everything here reads a `LayerwiseResult`; nothing knows the model: tap kinds and layer indices are
parsed from the tap names (the first all-digit component is the layer index).
"""

from __future__ import annotations

import math

import numpy as np

from equiv.compare import max_error_guard, not_compared_kind, reference_implausible, tolerance
from equiv.layerwise import LayerwiseResult
from equiv.layerwise import format_ratio as _layerwise_ratio

# ---------------------------------------------------------------------------------------------
# numbers that agree with the verdict


def fmt_budget(b) -> str:
    """A budget or guard exactly as it is applied: '3', '12', '2.5', '1e+09'; never rounded."""
    if b is None or not math.isfinite(b):
        return "-"
    b = float(b)
    short = f"{b:g}"
    return short if float(short) == b else repr(b)


def _sig(r: float, digits: int) -> str:
    """`r` (finite, >= 0) with at least `digits` significant digits: fixed notation from 1e-3 to
    1e5 (so 4163 prints whole), scientific outside."""
    if r == 0:
        return "0"
    if r >= 1e5 or r < 1e-3:
        return f"{r:.{digits - 1}e}"
    return f"{r:.{max(0, digits - 1 - math.floor(math.log10(r)))}f}"


def fmt_number(value, limit=None) -> str:
    """At least 3 significant digits, and when `limit` is given as many more as it takes for the
    printed value to sit on the same side of `limit` as the value itself: 3.0047 against 3 prints
    '3.005', never '3.00'. '-' when unknown, 'inf' for infinity."""
    if value is None or math.isnan(value):
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    value = float(value)
    sign, r = ("-", -value) if value < 0 else ("", value)
    for digits in range(3, 18):
        text = sign + _sig(r, digits)
        if limit is None or not math.isfinite(limit) or (float(text) > limit) == (value > limit):
            return text
    return repr(value)


def fmt_ratio(ratio, budget=None) -> str:
    """A budget ratio as every report prints it: '0.136x', '413x', '2.10e+07x', and against its
    budget never rounded onto or across it ('3.005x' for 3.0047 against a budget of 3)."""
    text = fmt_number(ratio, budget)
    return text if text in ("-", "inf", "-inf") else text + "x"


def max_guard(result: LayerwiseResult) -> float:
    """The max-error guard the taps were judged by (equiv/compare.py: it moves with the budget)."""
    for t in result.taps:
        if math.isfinite(t.max_budget):
            return t.max_budget
    return max_error_guard(result.dtype, result.budget, result.mode)


# ---------------------------------------------------------------------------------------------
# shared formatting


def tap_kind(name: str) -> tuple[str, int | None]:
    """'layers.3.mixer.ssm' -> ('mixer.ssm', 3); 'layers.3' -> ('(block output)', 3);
    'logits' -> ('logits', None). The layer index is the first all-digit dotted component."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            rest = ".".join(parts[i + 1:])
            return (rest or "(block output)"), int(part)
    return name, None


def fmt_err(e) -> str:
    return "-" if e is None or not math.isfinite(e) else f"{e:.2e}"


def verdict_label(result: LayerwiseResult, name: str, verdict: str) -> str:
    if name in result.port_only:
        return "p-only"
    if name in result.reference_only:
        return "r-only"
    return {"pass": "ok", "fail": "FAIL", "unavailable": "n/a"}.get(verdict, verdict)


def by_severity(result: LayerwiseResult) -> list:
    """Taps worst first: failures by ratio, then passes by ratio, then the rest (ratio unknown)."""
    def key(t):
        r = t.ratio if math.isfinite(t.ratio) else -1.0
        return (t.verdict != "fail", -r, t.name)
    return sorted(result.taps, key=key)


def fail_cause(t) -> str | None:
    """Which criterion failed the tap, in equiv/compare.py's order: 'nonfinite', 'other' (shape
    mismatch, nothing finite), 'reference' (the reference itself implausible), 'rms' (ratio over
    budget), 'max' (max-error ratio over the guard); None for a tap that did not fail."""
    if t.verdict != "fail":
        return None
    if t.nonfinite.get("port_mismatch_count"):
        return "nonfinite"
    if not math.isfinite(t.ratio):
        return "other"
    if reference_implausible(t.ref_rel_error, t.judged_precision):
        return "reference"
    if t.ratio > t.budget:
        return "rms"
    if math.isfinite(t.ratio_max) and t.ratio_max > t.max_budget:
        return "max"
    return "other"


def failure_brief(t) -> str:
    """Why a tap failed, in a few words: '3.005x > budget 3', 'max-error ratio 12.04x > guard 12',
    'NaN/Inf at 3 positions', 'shape mismatch', 'the reference itself is 0.011 from the oracle'."""
    cause = fail_cause(t)
    if cause == "rms":
        return f"{fmt_ratio(t.ratio, t.budget)} > budget {fmt_budget(t.budget)}"
    if cause == "max":
        return f"max-error ratio {fmt_ratio(t.ratio_max, t.max_budget)} > guard {fmt_budget(t.max_budget)}"
    if cause == "nonfinite":
        n = t.nonfinite["port_mismatch_count"]
        return f"{'overflow to inf' if t.overflow else 'NaN/Inf'} at {n} position{'s' if n != 1 else ''}"
    if cause == "reference":
        limit = tolerance(t.dtype, "reference_rel_error_max").budget
        return (f"the reference itself is {fmt_number(t.ref_rel_error, limit)} from the oracle "
                f"> limit {fmt_budget(limit)}")
    return t.reason.split(":", 1)[0]


def tap_reason(t) -> str:
    """equiv/compare.py's reason for a tap, with every ratio printed by `fmt_ratio` against the
    threshold it was judged by; reasons without a ratio (missing, NaN/Inf, shape) unchanged."""
    cause = fail_cause(t)
    b, mb = fmt_budget(t.budget), fmt_budget(t.max_budget)
    if t.verdict == "pass" and math.isfinite(t.ratio):
        text = f"{fmt_ratio(t.ratio, t.budget)} the reference's own float error (budget {b}x)"
        if math.isfinite(t.ratio_max):
            text += f"; max-error ratio {fmt_ratio(t.ratio_max, t.max_budget)} (guard {mb}x)"
        return text
    if cause == "rms":
        return (f"{fmt_ratio(t.ratio, t.budget)} the reference's own float error (RMS; budget {b}x): "
                f"RMS |port - oracle| {t.err_port:.3g}, reference {t.err_ref:.3g}; worst element "
                f"{t.max_err_port:.3g} at {list(t.worst_index)}")
    if cause == "max":
        return (f"localised error: max |port - oracle| {t.max_err_port:.3g} at {list(t.worst_index)} is "
                f"{fmt_ratio(t.ratio_max, t.max_budget)} the reference's worst element {t.max_err_ref:.3g} "
                f"(guard {mb}x) while the RMS ratio is {fmt_ratio(t.ratio, t.budget)} (budget {b}x)")
    if cause == "reference":
        limit = tolerance(t.dtype, "reference_rel_error_max").budget
        rms_oracle = t.err_ref / t.ref_rel_error if t.ref_rel_error > 0 else math.nan
        port_rel = t.err_port / rms_oracle if rms_oracle > 0 else math.nan
        return (f"the reference itself is {fmt_number(t.ref_rel_error, limit)} (relative RMS) from the "
                f"float64 oracle, beyond any {t.dtype} rounding (limit {fmt_budget(limit)}): reference "
                f"and oracle compute different math, so the budget cannot judge this tap; the port is "
                f"{fmt_number(port_rel)} from the oracle")
    return t.reason


def _explanation_head(t) -> str:
    """What an explanation says first about a failing tap, its ratio against the threshold that
    failed it (the engine rounds the ratio, and names the RMS ratio even when the guard failed it)."""
    cause = fail_cause(t)
    if cause == "rms":
        return (f"{fmt_ratio(t.ratio, t.budget)} the reference's {t.dtype} error "
                f"> budget {fmt_budget(t.budget)}")
    if cause == "max":
        return (f"max-error ratio {fmt_ratio(t.ratio_max, t.max_budget)} > guard {fmt_budget(t.max_budget)} "
                f"(RMS ratio {fmt_ratio(t.ratio, t.budget)}, within budget {fmt_budget(t.budget)})")
    return tap_reason(t)


def _split_explanation(result: LayerwiseResult, name: str) -> tuple[str, str] | None:
    """(head, placement) of the engine's explanation 'name: head; placement', the head being one of
    the two it writes (equiv/layerwise.py: `_ratio_text`); None when it has no explanation."""
    text = result.explanations.get(name)
    if text is None:
        return None
    t = result.tap(name)
    body = text.removeprefix(f"{name}: ")
    for head in (f"{_layerwise_ratio(t.ratio)} the reference's {t.dtype} error", t.reason):
        if head and body.startswith(head + "; "):
            return head, body[len(head) + 2:]
    return body, ""


def explanation_text(result: LayerwiseResult, name: str) -> str | None:
    """The layer-wise engine's one-line explanation of a failing tap with its ratio restated against
    the threshold that failed it; where the failure is placed is kept word for word."""
    parts = _split_explanation(result, name)
    if parts is None:
        return None
    head, placement = parts
    if placement or head in (f"{_layerwise_ratio(result.tap(name).ratio)} the reference's "
                             f"{result.tap(name).dtype} error", result.tap(name).reason):
        head = _explanation_head(result.tap(name))
    return f"{name}: {head}" + (f"; {placement}" if placement else "")


def tap_note(result: LayerwiseResult, t) -> str:
    """What a table row says beside its numbers: for a failing tap, where its explanation places
    the defect (the ratio has its own column; a tap failed by the max-error guard says so too);
    otherwise the comparison's reason."""
    if t.verdict != "fail":
        return tap_reason(t)
    parts = _split_explanation(result, t.name)
    placement = parts[1] if parts else ""
    if fail_cause(t) in ("rms",) and placement:
        return placement
    head = _explanation_head(t)
    return f"{head}; {placement}" if placement else head


def reference_label(provenance: dict) -> tuple[str, str]:
    """(runner, code path) from a runner's provenance: `runner`/`code_path`, or the transformers
    runner's `reference`/`path`; the keys belong to the runner, so absent ones say so."""
    runner = provenance.get("runner") or provenance.get("reference") or provenance.get("name") or "?"
    code_path = provenance.get("code_path") or provenance.get("path") or "code path not reported"
    return str(runner), str(code_path)


# ---------------------------------------------------------------------------------------------
# coverage: how many taps were compared, and why the others were not


def coverage(result: LayerwiseResult) -> dict:
    """Counts over `result.taps`: `total`; `compared` (verdict pass or fail) with its `pass` and
    `fail`; and the taps not compared, by why: `reference_only` (the port does not produce them),
    `port_only` (the reference does not), `all_zero` (every value exactly zero on every side: a
    zero port would 'pass' untested), `not_comparable` (every element non-finite identically on
    the port and the reference), `other` (both sides list them but one could not give it, e.g. a
    port without isolated mode). `compared_names` in execution order; `all_zero_names`,
    `not_comparable_names`; `partial_names`: compared taps with some elements not comparable, and
    `partial_elements` their count."""
    port_only, ref_only = set(result.port_only), set(result.reference_only)
    compared = [t.name for t in result.taps if t.verdict in ("pass", "fail")]
    fails = sum(t.verdict == "fail" for t in result.taps)
    kinds = {t.name: not_compared_kind(t) for t in result.taps}
    zero = [n for n, k in kinds.items() if k == "all zero"]
    nonfinite = [n for n, k in kinds.items() if k == "non-finite on both"]
    partial = [t for t in result.taps if t.verdict in ("pass", "fail") and t.nonfinite.get("shared_count")]
    return {"total": len(result.taps), "compared": len(compared), "pass": len(compared) - fails,
            "fail": fails, "compared_names": compared,
            "reference_only": sum(t.name in ref_only for t in result.taps if t.verdict == "unavailable"),
            "port_only": sum(t.name in port_only for t in result.taps if t.verdict == "unavailable"),
            "all_zero": len(zero), "all_zero_names": zero,
            "not_comparable": len(nonfinite), "not_comparable_names": nonfinite,
            "partial_names": [t.name for t in partial],
            "partial_elements": sum(t.nonfinite["shared_count"] for t in partial),
            "other": sum(t.verdict == "unavailable" and t.name not in port_only | ref_only
                         and not kinds[t.name] for t in result.taps)}


def _names(names: list[str], k: int = 3) -> str:
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def coverage_phrase(result: LayerwiseResult) -> str:
    """'all 12 taps compared', '1 of 17 taps compared (logits only; 16 not produced by the port)',
    '0 of 17 taps compared (17 all zero on every side, nothing to compare: embed, ...)'; taps
    compared only in part (elements non-finite identically on both sides) are said too."""
    c = coverage(result)
    why = []
    if c["compared"] < c["total"] and 0 < c["compared"] <= 3:
        names = c["compared_names"]
        why.append((", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]) + " only")
    for key, words in (("reference_only", "not produced by the port"),
                       ("port_only", "not produced by the reference")):
        if c[key]:
            why.append(f"{c[key]} {words}")
    if c["all_zero"]:
        why.append(f"{c['all_zero']} all zero on every side, nothing to compare: "
                   f"{_names(c['all_zero_names'])}")
    if c["not_comparable"]:
        why.append(f"{c['not_comparable']} not comparable, non-finite identically on the port and the "
                   f"reference: {_names(c['not_comparable_names'])}")
    if c["other"]:
        why.append(f"{c['other']} unavailable on a side")
    if c["partial_names"]:
        n = len(c["partial_names"])
        k = c["partial_elements"]
        why.append(f"{n} compared only in part, {k} element{'s' if k != 1 else ''} non-finite identically "
                   f"on the port and the reference: {_names(c['partial_names'])}")
    if c["compared"] == c["total"]:
        head = f"all {c['total']} tap{'s' if c['total'] != 1 else ''} compared"
    else:
        head = f"{c['compared']} of {c['total']} taps compared"
    return head + (f" ({'; '.join(why)})" if why else "")


def summary_line(result: LayerwiseResult) -> str:
    """'DIVERGENT: all 12 taps compared, 3 fail, first at layers.1.mix (3.005x > budget 3)';
    'EQUIVALENT: 1 of 17 taps compared (logits only; 16 not produced by the port), 0 fail'. Fail
    counts are out of the compared taps."""
    c = coverage(result)
    head = f"{result.verdict.upper()}: {coverage_phrase(result)}, {c['fail']} fail"
    if result.first_divergence:
        fd = result.first_divergence
        head += f", first at {fd.tap} ({failure_brief(result.tap(fd.tap))})"
    return head


def headline(result: LayerwiseResult) -> str:
    """The title of the Markdown and HTML reports: verdict and coverage."""
    c = coverage(result)
    return (f"{result.verdict.upper()} ({c['compared']} of {c['total']} taps compared, "
            f"{c['fail']} fail)")


# ---------------------------------------------------------------------------------------------
# golden mode: the reference side was replayed from recordings


def golden_replay(result: LayerwiseResult) -> dict | None:
    """When the reference (or oracle) was replayed from a recording, what the recording says about
    itself; None for a live run. Detected from the `replayed_from` key that
    `equiv.golden.GoldenRunner.provenance()` adds to the recorded provenance (it sets no other flag).
    """
    recordings = []
    for side, prov in (("reference", result.reference), ("oracle", result.oracle)):
        if not isinstance(prov, dict) or "replayed_from" not in prov:
            continue
        runner, code_path = reference_label(prov)
        env = prov.get("environment") if isinstance(prov.get("environment"), dict) else {}
        env_keys = ("device", "torch_float32_matmul_precision", "cuda_matmul_allow_tf32", "torch_num_threads")
        recordings.append({
            "side": side, "replayed_from": str(prov["replayed_from"]), "runner": runner,
            "code_path": code_path, "dtype": prov.get("dtype"), "checkpoint": prov.get("checkpoint"),
            "versions": dict(prov.get("versions") or {}),
            "environment": {k: v for k, v in env.items() if k in env_keys},
            "recorded_at": prov.get("recorded_at") or prov.get("timestamp") or prov.get("date"),
            "regenerate": prov.get("regenerate"), "judged_precision": prov.get("judged_precision")})
    if not recordings:
        return None
    return {"statement": _golden_statement(recordings), "recordings": recordings}


def _golden_statement(recordings: list[dict]) -> str:
    """'GOLDEN MODE: ... reference: transformers Mamba2ForCausalLM (torch fallback, float32) on
    tiny-g2, replayed from ...; oracle: ...; recorded with transformers 5.25.0, torch ... (device
    cpu, ...); the recordings carry no date'. One 'recorded with' when every side's is the same."""

    def made_with(rec):
        versions = ", ".join(f"{k} {v}" for k, v in rec["versions"].items() if v) or "no versions recorded"
        env = ", ".join(f"{k} {v}" for k, v in rec["environment"].items())
        return f"recorded with {versions}" + (f" ({env})" if env else "")

    def when(rec, plural=False):
        if rec["recorded_at"]:
            return f"recorded {rec['recorded_at']}"
        if rec.get("regenerate"):  # not a fixture script's output (a GPU recording)
            return f"the recording carries no date; {rec['regenerate']} records it again"
        return ("the recordings carry no date: they are deterministic, and `nox -s fixtures` regenerates "
                "them bit for bit with these versions") if plural else (
                "the recording carries no date: it is deterministic, and `nox -s fixtures` regenerates it "
                "bit for bit with these versions")

    shared = len({(made_with(rec), when(rec)) for rec in recordings}) == 1
    parts = []
    for rec in recordings:
        what = f"{rec['runner']} ({rec['code_path']}" + (f", {rec['dtype']}" if rec["dtype"] else "") + ")"
        if rec["checkpoint"]:
            what += f" on {rec['checkpoint']}"
        parts.append(f"{rec['side']}: {what}, replayed from {rec['replayed_from']}"
                     + ("" if shared else f", {made_with(rec)}; {when(rec)}"))
    many = len(recordings) > 1
    tail = (f"; {'both ' if many else ''}{made_with(recordings[0])}; {when(recordings[0], many)}"
            if shared else "")
    judged = [f"the {rec['side']} is judged plausible at {rec['judged_precision']} rounding, the rounding "
              "it declares it computes at" for rec in recordings if rec.get("judged_precision")]
    return ("GOLDEN MODE: the reference was not run here; its recorded outputs were replayed. "
            + "; ".join(parts + judged) + tail)


def ratio_cell(t) -> str:
    """The ratio column: the RMS ratio; for a tap failed by the max-error guard, that ratio, marked."""
    if fail_cause(t) == "max":
        return fmt_ratio(t.ratio_max, t.max_budget) + " max"
    return fmt_ratio(t.ratio, t.budget)


def jsonable(x):
    """NaN / inf -> None, numpy scalars and arrays -> Python, tuples -> lists, recursively."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, np.generic):
        return jsonable(x.item())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if x is None or isinstance(x, bool | int | float | str):
        return x
    return str(x)


