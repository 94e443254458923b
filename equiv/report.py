"""Reports of a layer-wise diff: the 80-column terminal table, the versioned JSON (schema in
docs/report-schema.md), the Markdown PR comment, and `write_reports` for a whole directory (the HTML
page and its plot live in equiv/report_html.py). What they say is equiv/report_wording.py's."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from equiv.errors import EquivError, ReportWriteError, clip, quote_path
from equiv.io.bounded import json_type, read_json
from equiv.layerwise import LayerwiseResult
from equiv.report_wording import (
    by_severity,
    coverage,
    explanation_text,
    fail_cause,
    fmt_budget,
    fmt_err,
    golden_replay,
    headline,
    jsonable,
    max_guard,
    ratio_cell,
    reference_label,
    summary_line,
    tap_kind,
    tap_note,
    verdict_label,
)

SCHEMA = "ssm-equiv/layerwise"
SCHEMA_VERSION = 1
WIDTH = 80


def _wrap(text: str, indent: str = "") -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=indent, subsequent_indent=indent or "  ",
                         break_long_words=True, break_on_hyphens=False)


# ---------------------------------------------------------------------------------------------
# (a) terminal

_ROW = "{:2}{:<28} {:<6} {:>11} {:>9} {:>9} {:>9}"


def _table_rows(result: LayerwiseResult, t, mark: str) -> list[str]:
    """One row, or two when the tap name is longer than its column: the name whole on its own line,
    the numbers under it (names are never cut)."""
    cells = (verdict_label(result, t.name, t.verdict), ratio_cell(t), fmt_err(t.err_port),
             fmt_err(t.err_ref), fmt_err(t.raw_diff))
    if len(t.name) <= 28:
        return [_ROW.format(mark, t.name, *cells)]
    return [f"{mark:2}{t.name}", _ROW.format("", "", *cells)]


def terminal_table(result: LayerwiseResult, limit: int = 20) -> str:
    """Worst taps first, first divergence marked '>', one summary line; no line over 80 columns
    (a tap name longer than its column gets a line of its own)."""
    port, ref, inputs = result.port, result.reference, result.inputs
    runner, code_path = reference_label(ref)
    golden = golden_replay(result)
    lines = _wrap(f"equiv diff: port {port.get('name')} {port.get('version')} vs reference "
                  f"{runner} ({code_path})" + (" REPLAYED FROM A GOLDEN RECORDING" if golden else ""))
    shape = "x".join(map(str, inputs.get("shape", [])))
    lines += _wrap(f"{result.dtype}, {result.mode} mode, budget {fmt_budget(result.budget)}x the reference's "
                   f"error (max-error guard {fmt_budget(max_guard(result))}x), inputs {shape} seed "
                   f"{inputs.get('seed')}")
    lines.append("")
    lines.append(_ROW.format("", "tap", "", "ratio", "rms p-o", "rms r-o", "max p-r"))
    rows = by_severity(result)
    fd = result.first_divergence.tap if result.first_divergence else None
    shown = rows[:limit]
    if fd and all(t.name != fd for t in shown):
        shown = shown[:-1] + [result.tap(fd)]
    for t in shown:
        lines += _table_rows(result, t, ">" if t.name == fd else "")
    if len(rows) > len(shown):
        lines.append(f"  ... {len(rows) - len(shown)} more taps (all of them in report.json)")
    if any(fail_cause(t) == "max" for t in shown):
        lines += _wrap(f"  'max': failed the max-error guard ({fmt_budget(max_guard(result))}x) on the "
                       "largest element; its RMS ratio is within budget")
    lines.append("")
    if result.first_divergence:
        lines += _wrap("> " + explanation_text(result, fd))
    if golden:
        lines += _wrap(golden["statement"])
    for note in result.notes:
        lines += _wrap("note: " + note)
    lines += _wrap(summary_line(result))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# (b) JSON


def to_json_dict(result: LayerwiseResult) -> dict:
    """The report as plain JSON data, field by field as docs/report-schema.md documents it."""
    taps = []
    for t in result.taps:
        kind, layer = tap_kind(t.name)
        side = ("port" if t.name in result.port_only else
                "reference" if t.name in result.reference_only else "both")
        taps.append({**t.to_dict(), "side": side, "kind": kind, "layer": layer,
                     "explanation": explanation_text(result, t.name)})
    fd = result.first_divergence
    counts = {**result.counts, "compared": coverage(result)["compared"]}
    return jsonable({
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "verdict": result.verdict, "summary": summary_line(result),
        "mode": result.mode, "dtype": result.dtype, "budget": result.budget, "counts": counts,
        "first_divergence": None if fd is None else {"tap": fd.tap, "index": fd.index, "ratio": fd.ratio,
                                                     "explanation": explanation_text(result, fd.tap)},
        "inputs": result.inputs, "port": result.port, "reference": result.reference, "oracle": result.oracle,
        "golden": golden_replay(result), "settings": result.settings, "notes": result.notes,
        "port_only": result.port_only, "reference_only": result.reference_only, "taps": taps,
    })


def to_json(result: LayerwiseResult) -> str:
    return json.dumps(to_json_dict(result), indent=2, allow_nan=False) + "\n"


def read_report(path) -> dict:
    """Load a report.json, checking it is this schema and a version this code reads."""
    data = read_json(path, "a report.json (readable JSON)", 256 * 2**20)  # bounded, one-line errors
    got = (data.get("schema"), data.get("schema_version")) if isinstance(data, dict) else json_type(data)
    if got != (SCHEMA, SCHEMA_VERSION):
        raise EquivError(f"report {quote_path(path)}: expected schema {SCHEMA!r} version {SCHEMA_VERSION}, "
                         f"got {clip(repr(got), 60)}")
    return data


# ---------------------------------------------------------------------------------------------
# (c) Markdown


def _md(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_row(result: LayerwiseResult, t) -> str:
    mark = "**>**" if result.first_divergence and t.name == result.first_divergence.tap else ""
    note = tap_note(result, t) if t.verdict == "fail" else ""
    return (f"| {mark} | `{t.name}` | {verdict_label(result, t.name, t.verdict)} | {ratio_cell(t)} | "
            f"{fmt_err(t.err_port)} | {fmt_err(t.err_ref)} | {fmt_err(t.raw_diff)} | {_md(note)} |")


def to_markdown(result: LayerwiseResult, worst: int = 10, max_failing: int = 30) -> str:
    """A PR comment: summary, failing taps and the worst passing ones, provenance folded away."""
    out = [f"### ssm-equiv layer-wise diff: {headline(result)}", "", summary_line(result), ""]
    golden = golden_replay(result)
    if golden:
        out += [f"**GOLDEN MODE:** {_md(golden['statement'].removeprefix('GOLDEN MODE: '))}", ""]
    if result.first_divergence:
        out += [f"**First divergence:** {_md(explanation_text(result, result.first_divergence.tap))}", ""]
    inputs = result.inputs
    out += [f"_{result.dtype}, {result.mode} mode, budget {fmt_budget(result.budget)}x the reference's own "
            f"error against the float64 oracle (max-error guard {fmt_budget(max_guard(result))}x); inputs "
            f"{inputs.get('shape')} seed {inputs.get('seed')}_", ""]
    out += [f"> note: {_md(n)}" for n in result.notes] + ([""] if result.notes else [])
    failing = [t for t in result.taps if t.verdict == "fail"]
    passing = [t for t in by_severity(result) if t.verdict == "pass"][:worst]
    header = ["|  | tap | verdict | ratio | RMS port-oracle | RMS ref-oracle | max \\|port-ref\\| | note |",
              "|---|---|---|---:|---:|---:|---:|---|"]
    if failing:
        compared = coverage(result)["compared"]
        out += [f"**Failing taps** ({len(failing)} of {compared} compared, execution order)", ""] + header
        out += [_md_row(result, t) for t in failing[:max_failing]]
        if len(failing) > max_failing:
            more = len(failing) - max_failing
            out.append(f"| | ... {more} more (all of them in report.json) | | | | | | |")
        out.append("")
    if passing:
        out += [f"**Worst passing taps** (top {len(passing)} by ratio)", ""] + header
        out += [_md_row(result, t) for t in passing] + [""]
    one_sided = [f"`{n}` (port only)" for n in result.port_only] + [f"`{n}` (reference only)"
                                                                     for n in result.reference_only]
    if one_sided:
        out += ["**Not compared, one side only:** " + ", ".join(one_sided), ""]
    one_sided_names = set(result.port_only) | set(result.reference_only)
    other = [t for t in result.taps if t.verdict == "unavailable" and t.name not in one_sided_names]
    if other:
        out += ["**Not compared:** " + ", ".join(f"`{t.name}` ({_md(t.reason)})" for t in other), ""]
    out += ["<details><summary>Provenance</summary>", ""]
    for title, block in (("port", result.port), ("reference", result.reference), ("oracle", result.oracle),
                         ("settings", result.settings), ("inputs", result.inputs)):
        out.append(f"- **{title}**: `{_md(json.dumps(jsonable(block), sort_keys=True))}`")
    out += ["", "</details>", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# the directory


def _write(path: Path, data: str | bytes) -> None:
    try:
        path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data, encoding="utf-8")
    except OSError as e:
        raise ReportWriteError(f"report file {quote_path(path)}: cannot write ({e.strerror or e})") from None


def prepare_out_dir(out_dir) -> Path:
    """Create `out_dir` (and parents) or raise ReportWriteError; callers run it before long work
    too, so a typo in --out fails in a second, not after the forwards."""
    out = Path(out_dir)
    try:
        if out.exists() and not out.is_dir():
            raise ReportWriteError(f"report directory {quote_path(out)}: expected a directory, got a file")
        out.mkdir(parents=True, exist_ok=True)
    except ValueError:  # a NUL byte
        raise ReportWriteError(f"report directory {quote_path(out)}: expected a directory path, got one "
                               "with a NUL byte") from None
    except OSError as e:
        raise ReportWriteError(f"report directory {quote_path(out)}: cannot create "
                               f"({e.strerror or e})") from None
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
