"""Reports of a layer-wise diff: the 80-column terminal table, the versioned JSON (schema in
docs/report-schema.md), the Markdown PR comment, and `write_reports` for a whole directory (the HTML
page and its plot live in equiv/report_html.py).

Everything here reads a `LayerwiseResult`; nothing knows the model: tap kinds and layer indices are
parsed from the tap names (the first all-digit component is the layer index).
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import numpy as np

from equiv.errors import EquivError, ReportWriteError
from equiv.layerwise import LayerwiseResult
from equiv.layerwise import format_ratio as fmt_ratio

SCHEMA = "ssm-equiv/layerwise"
SCHEMA_VERSION = 1
WIDTH = 80


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


def tap_note(result: LayerwiseResult, t) -> str:
    """What a table row says beside its numbers: for a failing tap, where its explanation places
    the defect (the ratio is already in its own column); otherwise the comparison's reason."""
    if t.verdict != "fail":
        return t.reason
    explanation = result.explanations.get(t.name, t.reason).removeprefix(f"{t.name}: ")
    _, sep, placement = explanation.partition("; ")
    return placement if sep else explanation


def reference_label(provenance: dict) -> tuple[str, str]:
    """(runner, code path) from a runner's provenance: `runner`/`code_path`, or the transformers
    runner's `reference`/`path`; the keys belong to the runner, so absent ones say so."""
    runner = provenance.get("runner") or provenance.get("reference") or provenance.get("name") or "?"
    code_path = provenance.get("code_path") or provenance.get("path") or "code path not reported"
    return str(runner), str(code_path)


def summary_line(result: LayerwiseResult) -> str:
    c = result.counts
    head = f"{result.verdict.upper()}: {c['fail']}/{c['total']} taps fail"
    if result.first_divergence:
        fd = result.first_divergence
        head += f", first at {fd.tap} ({fmt_ratio(fd.ratio)})"
    if c["unavailable"]:
        labels = (("port_only", "port-only"), ("reference_only", "ref-only"))
        sides = [f"{c[k]} {label}" for k, label in labels if c[k]]
        head += f"; {c['unavailable']} n/a" + (f" ({', '.join(sides)})" if sides else "")
    return head


def _wrap(text: str, indent: str = "") -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=indent, subsequent_indent=indent or "  ",
                         break_long_words=True, break_on_hyphens=False)


# ---------------------------------------------------------------------------------------------
# (a) terminal


def _cut(name: str, width: int) -> str:
    return name if len(name) <= width else ".." + name[-(width - 2):]


def terminal_table(result: LayerwiseResult, limit: int = 20) -> str:
    """Worst taps first, first divergence marked '>', one summary line; no line over 80 columns."""
    port, ref, inputs = result.port, result.reference, result.inputs
    runner, code_path = reference_label(ref)
    lines = _wrap(f"equiv diff: port {port.get('name')} {port.get('version')} vs reference "
                  f"{runner} ({code_path})")
    shape = "x".join(map(str, inputs.get("shape", [])))
    lines += _wrap(f"{result.dtype}, {result.mode} mode, budget {result.budget:g}x the reference's error, "
                   f"inputs {shape} seed {inputs.get('seed')}")
    lines.append("")
    fmt = "{:2}{:<30} {:<6} {:>9} {:>9} {:>9} {:>9}"
    lines.append(fmt.format("", "tap", "", "ratio", "rms p-o", "rms r-o", "max p-r"))
    rows = by_severity(result)
    fd = result.first_divergence.tap if result.first_divergence else None
    shown = rows[:limit]
    if fd and all(t.name != fd for t in shown):
        shown = shown[:-1] + [result.tap(fd)]
    for t in shown:
        lines.append(fmt.format(">" if t.name == fd else "", _cut(t.name, 30),
                                verdict_label(result, t.name, t.verdict), fmt_ratio(t.ratio),
                                fmt_err(t.err_port), fmt_err(t.err_ref), fmt_err(t.raw_diff)))
    if len(rows) > len(shown):
        lines.append(f"  ... {len(rows) - len(shown)} more taps (all of them in report.json)")
    lines.append("")
    if result.first_divergence:
        lines += _wrap("> " + result.first_divergence.explanation)
    for note in result.notes:
        lines += _wrap("note: " + note)
    lines += _wrap(summary_line(result))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# (b) JSON


def _jsonable(x):
    """NaN / inf -> None, numpy scalars and arrays -> Python, tuples -> lists, recursively."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if x is None or isinstance(x, bool | int | float | str):
        return x
    return str(x)


def to_json_dict(result: LayerwiseResult) -> dict:
    """The report as plain JSON data, field by field as docs/report-schema.md documents it."""
    taps = []
    for t in result.taps:
        kind, layer = tap_kind(t.name)
        side = ("port" if t.name in result.port_only else
                "reference" if t.name in result.reference_only else "both")
        taps.append({**t.to_dict(), "side": side, "kind": kind, "layer": layer,
                     "explanation": result.explanations.get(t.name)})
    fd = result.first_divergence
    return _jsonable({
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "verdict": result.verdict, "summary": summary_line(result),
        "mode": result.mode, "dtype": result.dtype, "budget": result.budget, "counts": result.counts,
        "first_divergence": None if fd is None else {"tap": fd.tap, "index": fd.index, "ratio": fd.ratio,
                                                     "explanation": fd.explanation},
        "inputs": result.inputs, "port": result.port, "reference": result.reference, "oracle": result.oracle,
        "settings": result.settings, "notes": result.notes,
        "port_only": result.port_only, "reference_only": result.reference_only, "taps": taps,
    })


def to_json(result: LayerwiseResult) -> str:
    return json.dumps(to_json_dict(result), indent=2, allow_nan=False) + "\n"


def read_report(path) -> dict:
    """Load a report.json, checking it is this schema and a version this code reads."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise EquivError(f"report {path}: expected a readable JSON file, got {e}") from None
    got = (data.get("schema"), data.get("schema_version")) if isinstance(data, dict) else type(data).__name__
    if got != (SCHEMA, SCHEMA_VERSION):
        raise EquivError(f"report {path}: expected schema {SCHEMA!r} version {SCHEMA_VERSION}, got {got}")
    return data


# ---------------------------------------------------------------------------------------------
# (c) Markdown


def _md(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_row(result: LayerwiseResult, t) -> str:
    mark = "**>**" if result.first_divergence and t.name == result.first_divergence.tap else ""
    note = tap_note(result, t) if t.verdict == "fail" else ""
    return (f"| {mark} | `{t.name}` | {verdict_label(result, t.name, t.verdict)} | {fmt_ratio(t.ratio)} | "
            f"{fmt_err(t.err_port)} | {fmt_err(t.err_ref)} | {fmt_err(t.raw_diff)} | {_md(note)} |")


def to_markdown(result: LayerwiseResult, worst: int = 10, max_failing: int = 30) -> str:
    """A PR comment: summary, failing taps and the worst passing ones, provenance folded away."""
    out = [f"### ssm-equiv layer-wise diff: {result.verdict.upper()}", "", summary_line(result), ""]
    if result.first_divergence:
        out += [f"**First divergence:** {_md(result.first_divergence.explanation)}", ""]
    inputs = result.inputs
    out += [f"_{result.dtype}, {result.mode} mode, budget {result.budget:g}x the reference's own error "
            f"against the float64 oracle; inputs {inputs.get('shape')} seed {inputs.get('seed')}_", ""]
    failing = [t for t in result.taps if t.verdict == "fail"]
    passing = [t for t in by_severity(result) if t.verdict == "pass"][:worst]
    header = ["|  | tap | verdict | ratio | RMS port-oracle | RMS ref-oracle | max \\|port-ref\\| | note |",
              "|---|---|---|---:|---:|---:|---:|---|"]
    if failing:
        out += [f"**Failing taps** ({len(failing)}, execution order)", ""] + header
        out += [_md_row(result, t) for t in failing[:max_failing]]
        if len(failing) > max_failing:
            out.append(f"| | ... {len(failing) - max_failing} more | | | | | | |")
        out.append("")
    if passing:
        out += [f"**Worst passing taps** (top {len(passing)} by ratio)", ""] + header
        out += [_md_row(result, t) for t in passing] + [""]
    one_sided = [f"`{n}` (port only)" for n in result.port_only] + [f"`{n}` (reference only)"
                                                                     for n in result.reference_only]
    if one_sided:
        out += ["**Not compared, one side only:** " + ", ".join(one_sided), ""]
    out += ["<details><summary>Provenance</summary>", ""]
    for title, block in (("port", result.port), ("reference", result.reference), ("oracle", result.oracle),
                         ("settings", result.settings), ("inputs", result.inputs)):
        out.append(f"- **{title}**: `{_md(json.dumps(_jsonable(block), sort_keys=True))}`")
    out += [f"- note: {_md(n)}" for n in result.notes]
    out += ["", "</details>", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# the directory


def _write(path: Path, data: str | bytes) -> None:
    try:
        path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data, encoding="utf-8")
    except OSError as e:
        raise ReportWriteError(f"report file {path}: cannot write ({e.strerror or e})") from None


def prepare_out_dir(out_dir) -> Path:
    """Create `out_dir` (and parents) or raise ReportWriteError; callers run it before long work
    too, so a typo in --out fails in a second, not after the forwards."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ReportWriteError(f"report directory {out}: expected a directory, got a file")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportWriteError(f"report directory {out}: cannot create ({e.strerror or e})") from None
    return out


def write_reports(result: LayerwiseResult, out_dir) -> dict[str, Path]:
    """report.json, report.md, report.html and ratio.png in `out_dir` (created if missing).
    Raises ReportWriteError naming the path and the reason when it cannot be written."""
    from equiv.report_html import ratio_plot_png, to_html

    out = prepare_out_dir(out_dir)
    paths = {name: out / name for name in ("report.json", "report.md", "report.html", "ratio.png")}
    _write(paths["report.json"], to_json(result))
    _write(paths["report.md"], to_markdown(result))
    png = ratio_plot_png(result)
    if png is None:
        del paths["ratio.png"]
    else:
        _write(paths["ratio.png"], png)
    _write(paths["report.html"], to_html(result, png))
    return paths
