"""What the main job (equiv/check.py) says about a run: the one summary table, the overall verdict,
the versions line, and the report directory (summary.json, summary.md, a report per checkpoint and
mode). It reads finished outcomes and runs nothing."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from equiv.errors import ReportWriteError
from equiv.report import write_reports
from equiv.report_wording import coverage, coverage_phrase, summary_line

if TYPE_CHECKING:  # check.py imports this module: the outcome type is for annotations only
    from equiv.check import FixtureOutcome

SCHEMA = {"schema": "ssm-equiv/equivalence", "schema_version": 3}


def _wrapped(text: str) -> list[str]:
    """A note under a summary row: indented, wrapped, never cut."""
    return textwrap.wrap(text, 100, initial_indent="  ", subsequent_indent="    ", break_on_hyphens=False)


def summary_table(outcomes: list[FixtureOutcome], suites: dict[str, dict]) -> str:
    """The one table: a row per checkpoint, then a row per property suite (keyed by its title)."""
    w = max([20] + [len(o.name) for o in outcomes])  # "<fixture>@<reference>" rows are long
    lines = [f"{'checkpoint':<{w}} {'pass / compared (acc, iso)':<27} {'decode matched':<13} verdict",
             "-" * (w + 52)]
    for o in outcomes:
        if o.error:
            lines.append(f"{o.name:<{w}} {'(not checked)':<41} ERROR")
            lines += _wrapped(o.error)
            continue
        cov = {mode: coverage(r) for mode, r in o.layerwise.items()}
        lw = ", ".join([f"{c['pass']}/{c['compared']}" for c in cov.values()] + ["-"] * len(o.not_run))
        matched = sum(sum(d.matched_steps) for d in o.decode)
        total = sum(sum(d.total_steps) for d in o.decode)
        lines.append(f"{o.name:<{w}} {lw:<27} {f'{matched}/{total}':<13} {o.verdict.upper()}")
        for mode, r in o.layerwise.items():  # taps not compared are said, never counted as passes
            if cov[mode]["compared"] < cov[mode]["total"]:
                lines += _wrapped(f"{mode}: {coverage_phrase(r)}")
        for mode, r in o.layerwise.items():
            if r.first_divergence:
                lines += _wrapped(f"{mode}: {r.first_divergence.explanation}")
        lines += [x for why in o.not_run.values() for x in _wrapped(why)]
        for d in o.decode:
            if d.verdict != "pass" or d.mismatches or d.reference_consistency.verdict != "pass":
                lines += _wrapped(f"decode {d.prompt_lengths}: {d.reason}")
    for title, suite in suites.items():
        lines.append(f"{title:<{w + 42}} {suite['verdict'].upper()}")
        lines += _wrapped(suite["detail"])
        for p in suite.get("properties", []):
            if p.get("verdict") != "pass":
                lines += _wrapped(f"{p['name']}: {p.get('detail', '')}")
    return "\n".join(lines)


def write_check_reports(outcomes: list[FixtureOutcome], suites: dict[str, dict], provenance: dict,
                        out_dir: Path,
                        timings: dict, verdict: str) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        summary = SCHEMA | {"verdict": verdict, "property_suites": suites,
                            "provenance": provenance, "fixtures": [o.to_dict() for o in outcomes]}
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True,
                                                         default=_json_default))
        (out_dir / "timing.json").write_text(json.dumps(timings, indent=1))
        md = ["# ssm-equiv: equivalence", "", f"**Verdict: {summary['verdict'].upper()}**", "", "```",
              summary_table(outcomes, suites), "```", "", versions_line(provenance), ""]
        for o in outcomes:
            for mode, r in o.layerwise.items():
                sub = out_dir / o.name / mode
                write_reports(r, sub)
                md.append(f"- `{o.name}` {mode}: {summary_line(r)} ([report]({o.name}/{mode}/report.html))")
        (out_dir / "summary.md").write_text("\n".join(md) + "\n")
    except OSError as e:
        raise ReportWriteError(f"report directory {out_dir}: cannot write ({e.strerror or e})") from None


def _json_default(x):
    if isinstance(x, (np.floating, float)):
        return None if math.isnan(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def overall_verdict(outcomes: list[FixtureOutcome], suites: dict[str, dict],
                    allow_not_run: bool = False) -> str:
    """'divergent' if anything failed; 'incomplete' if all that ran passed but a check did not run
    (unless allowed); else 'equivalent'. A check that did not run never counts as a pass."""
    if any(o.verdict in ("fail", "error") for o in outcomes) or any(s["verdict"] == "fail"
                                                                     for s in suites.values()):
        return "divergent"
    not_run = (any(o.verdict == "not run" for o in outcomes)
               or any(s["verdict"] != "pass" for s in suites.values()))
    if not_run and not allow_not_run:
        return "incomplete"
    return "equivalent"


def versions_line(provenance: dict) -> str:
    """'installed: jax 0.10.2, ...; all within the tested set' (or what is outside it), and in
    golden mode the versions the replayed reference was recorded with."""
    v = provenance.get("versions", {})
    line = "installed: " + ", ".join(f"{k} {val}" for k, val in v.items() if val)
    off = provenance.get("untested_versions") or []
    line += ("; OUTSIDE THE TESTED SET: " + ", ".join(off) if off else "; all within the tested set")
    if provenance.get("golden"):
        rec = (provenance.get("reference") or {}).get("versions") or {}
        line += ("\nreference: golden recording made with " +
                 ", ".join(f"{k} {rec[k]}" for k in ("transformers", "torch") if rec.get(k)))
    return line
