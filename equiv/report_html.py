"""The HTML page of a layer-wise diff: provenance header, the budget-ratio plot (embedded as base64,
also written beside it as ratio.png by `equiv.report.write_reports`), the full table.

The plot shows every tap: x = layer index, one line per tap kind (the tap name with its layer index
stripped, e.g. "mixer.ssm"); taps without a layer index (embed, norm_f, logits) are points of their
own, labelled on the x axis before layer 0 or after the last layer, where they run. Log y, the
budget as a dashed red line; failing taps are crossed in red, the first divergence circled and
annotated, taps that were not compared drawn as grey ticks along the bottom.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math

from equiv.layerwise import LayerwiseResult
from equiv.report_wording import (
    coverage,
    explanation_text,
    failure_brief,
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

PLOT_FLOOR = 1e-3  # ratios of exactly 0 (port exact where the reference is not) drawn here on log y
MARKERS_UP_TO = 16  # layers; beyond this the per-kind lines are drawn without markers


def plot_positions(result: LayerwiseResult) -> tuple[dict[str, float], list[tuple[float, str]], int]:
    """x of every tap, the x ticks (position, label), and the number of layers. Layer taps sit at
    their layer index; the others (embed, norm_f, logits ...) before layer 0 when they run before
    every layer tap, else after the last layer, spaced so their labels stay apart at any depth."""
    kinds = [tap_kind(t.name) for t in result.taps]
    layered = [i for i, (_, layer) in enumerate(kinds) if layer is not None]
    n_layers = 1 + max((kinds[i][1] for i in layered), default=-1)
    if not layered:
        xs = {t.name: float(i) for i, t in enumerate(result.taps)}
        return xs, [(x, n) for n, x in xs.items()], 0
    gap = max(1.0, n_layers / 16)
    before = [t.name for i, t in enumerate(result.taps) if kinds[i][1] is None and i < layered[0]]
    after = [t.name for i, t in enumerate(result.taps) if kinds[i][1] is None and i > layered[0]]
    xs = {t.name: float(kinds[i][1]) for i, t in enumerate(result.taps) if kinds[i][1] is not None}
    xs |= {name: -gap * (len(before) - j) for j, name in enumerate(before)}
    xs |= {name: n_layers - 1 + gap * (j + 1) for j, name in enumerate(after)}
    step = max(1, math.ceil(n_layers / 16))
    layer_ticks = list(range(0, n_layers, step))
    if layer_ticks[-1] != n_layers - 1 and n_layers - 1 - layer_ticks[-1] >= step / 2:
        layer_ticks.append(n_layers - 1)
    ticks = [(xs[n], n) for n in before] + [(float(i), str(i)) for i in layer_ticks]
    return xs, ticks + [(xs[n], n) for n in after], n_layers


def ratio_plot_png(result: LayerwiseResult) -> bytes | None:
    """The budget-ratio plot of every tap as PNG bytes; None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # no display; must precede pyplot's import
    import matplotlib.pyplot as plt
    from matplotlib.transforms import blended_transform_factory

    xs, ticks, n_layers = plot_positions(result)
    small = n_layers <= MARKERS_UP_TO
    series: dict[str, list[tuple[float, float]]] = {}
    outside: list[tuple[float, float]] = []
    for t in result.taps:
        kind, layer = tap_kind(t.name)
        if not math.isfinite(t.ratio):
            continue
        point = (xs[t.name], max(t.ratio, PLOT_FLOOR))
        (series.setdefault(kind, []) if layer is not None else outside).append(point)
    fails = [t for t in result.taps if t.verdict == "fail"]
    fails_measured = [(xs[t.name], max(t.ratio, PLOT_FLOOR)) for t in fails if math.isfinite(t.ratio)]
    fails_unmeasured = [xs[t.name] for t in fails if not math.isfinite(t.ratio)]
    not_compared = [xs[t.name] for t in result.taps if t.verdict == "unavailable"]
    c = coverage(result)
    fig, ax = plt.subplots(figsize=(10, 4.8) if small else (12, 5.2), dpi=100)
    try:
        # tab10 without its red, which marks failures and the budget; past 9 kinds the line style changes
        colours = [c for i, c in enumerate(matplotlib.colormaps["tab10"].colors) if i != 3]
        for k, (kind, points) in enumerate(series.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if small else None,
                    markersize=4, linewidth=1.3 if small else 1.0, label=kind, color=colours[k % 9],
                    linestyle=("-", "--", ":")[k // 9 % 3])
        if outside:
            ax.plot([p[0] for p in outside], [p[1] for p in outside], linestyle="none", marker="D",
                    markersize=7, color="0.25", label="taps outside the layers (named on the x axis)")
        ax.axhline(result.budget, color="red", linestyle="--", linewidth=1.2,
                   label=f"budget {fmt_budget(result.budget)}x")
        if fails_measured:
            ax.plot([p[0] for p in fails_measured], [p[1] for p in fails_measured], linestyle="none",
                    marker="X", markersize=9 if small else 6, color="red", markeredgecolor="darkred",
                    label=f"fail ({c['fail']} of {c['compared']} compared)")
        top = blended_transform_factory(ax.transData, ax.transAxes)
        if fails_unmeasured:
            ax.plot(fails_unmeasured, [0.96] * len(fails_unmeasured), transform=top, linestyle="none",
                    marker="^", markersize=9, color="red", label="fail, no ratio (NaN/Inf, shape)")
        if not_compared:
            ax.plot(not_compared, [0.03] * len(not_compared), transform=top, linestyle="none", marker="|",
                    markersize=10, color="0.6", label=f"not compared ({len(not_compared)})")
        ax.set_yscale("log")
        bottom, top_y = ax.get_ylim() if series or outside else (result.budget / 10, result.budget * 3)
        # keep the budget line off the plot edge
        ax.set_ylim(min(bottom, result.budget / 10), max(top_y, result.budget * 3))
        fd = result.first_divergence
        if fd is not None:  # circled, a dotted vertical line, and said in full in the legend
            x = xs[fd.tap]
            ax.axvline(x, color="darkred", linestyle=":", linewidth=1.0)
            y, transform = ((max(fd.ratio, PLOT_FLOOR), ax.transData) if math.isfinite(fd.ratio)
                            else (0.96, top))
            ax.plot([x], [y], transform=transform, linestyle="none", marker="o", markersize=16,
                    markerfacecolor="none", markeredgecolor="darkred", markeredgewidth=2,
                    label=f"first divergence:\n{fd.tap}\n{failure_brief(result.tap(fd.tap))}")
        if any(0 <= t.ratio < PLOT_FLOOR for t in result.taps):
            ax.axhline(PLOT_FLOOR, color="0.7", linewidth=0.8, linestyle="-.",
                       label=f"ratios below {PLOT_FLOOR:g} (0: exact) drawn at {PLOT_FLOOR:g}")
        if not (series or outside):
            ax.text(0.5, 0.5, "no tap has a measured ratio", ha="center", va="center", transform=ax.transAxes)
        if n_layers:
            for edge in (-0.5, n_layers - 0.5):
                ax.axvline(edge, color="0.8", linewidth=0.8, zorder=0)
        ax.set_xticks([x for x, _ in ticks])
        ax.set_xticklabels([label for _, label in ticks], fontsize=8)
        for label in ax.get_xticklabels():
            if not label.get_text().isdigit():
                label.set_rotation(40)
                label.set_horizontalalignment("right")
        lo, hi = min(xs.values(), default=0.0), max(xs.values(), default=1.0)
        pad = max(0.6, (hi - lo) * 0.02)
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_xlabel(f"layer index ({n_layers} layers; other taps named where they run)" if n_layers
                      else "tap")
        ax.set_ylabel("|port - oracle| / reference's error")
        ax.set_title(f"{result.verdict.upper()}: budget ratio of every tap ({result.dtype}, {result.mode}); "
                     f"{c['fail']} of {c['compared']} compared taps fail", fontsize=10, loc="left")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    return buf.getvalue()


_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.5em; }
.verdict-divergent { color: #b00020; } .verdict-equivalent { color: #1b5e20; }
.verdict-inconclusive { color: #8a6d00; }
.summary { font-size: 1.05em; font-weight: bold; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: left; vertical-align: top; }
td { overflow-wrap: anywhere; }
td.num { text-align: right; font-family: monospace; white-space: nowrap; } td.tap { font-family: monospace; }
tr.fail { background: #fde7e9; } tr.first { background: #f8c4c9; font-weight: bold; }
tr.unavailable { color: #777; }
.prov td:first-child { font-weight: bold; white-space: nowrap; }
pre { white-space: pre-wrap; word-break: break-all; font-size: 0.8em; background: #f6f6f6; padding: 0.5em; }
.note, .golden { padding: 0.4em 0.8em; overflow-wrap: anywhere; }
.note { background: #fff8e1; border-left: 3px solid #f0b400; }
.golden { background: #e3f2fd; border-left: 3px solid #1565c0; }
img.plot { max-width: 100%; height: auto; }
"""


def _e(x) -> str:
    return html.escape(str(x))


PRECISION_WORDS = ("precision", "tf32", "deterministic")


def _find_flags(block, prefix: str = "") -> list[tuple[str, object]]:
    """Every leaf whose key names a precision setting, at any depth of a provenance dict: the
    runners' keys differ, the words they use for these settings do not."""
    found = []
    for k, v in (block or {}).items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            found += _find_flags(v, path + ".")
        elif any(w in str(k).lower() for w in PRECISION_WORDS):
            found.append((path, v))
    return found


def _join_versions(versions: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in versions.items() if v is not None)


def _version_rows(result: LayerwiseResult, golden: dict | None) -> list[tuple[str, object]]:
    """One merged versions row for a live run (the reference ran here, with what is installed); in
    golden mode what is installed here and what each recording was made with, apart."""
    installed = result.settings.get("versions", {})
    if not golden:
        return [("versions", _join_versions({**(result.reference.get("versions") or {}), **installed}))]
    rows = [("versions installed here", _join_versions(installed))]
    for rec in golden["recordings"]:
        rows.append((f"{rec['side']} recorded with", _join_versions(rec["versions"]) or "not recorded"))
        rows.append((f"{rec['side']} replayed from", rec["replayed_from"]))
    return rows


def _header_rows(result: LayerwiseResult) -> str:
    """The provenance a reader needs first: what ran on each side, versions, precision settings."""
    runner, code_path = reference_label(result.reference)
    golden = golden_replay(result)
    details = result.port.get("details", {})
    replayed = " (GOLDEN MODE: replayed from a recording, not run here)" if golden else ""
    rows = [("port", f"{result.port.get('name')} {result.port.get('version')}"
                     + "".join(f", {k} {details[k]}" for k in ("implementation", "backend") if k in details)),
            ("reference", f"{runner}, code path: {code_path}{replayed}"),
            ("oracle", "{}, code path: {} (float64)".format(*reference_label(result.oracle))),
            ("compared", f"{result.dtype}, {result.mode} mode, budget {fmt_budget(result.budget)}x, "
                         f"max-error guard {fmt_budget(max_guard(result))}x"),
            ("port matmul precision", result.settings.get("matmul_precision")),
            *[(f"reference {k}", v) for k, v in _find_flags(result.reference)],
            *_version_rows(result, golden),
            ("inputs", "{} seed {}, ids sha256 {}".format(
                "x".join(map(str, result.inputs.get("shape", []))), result.inputs.get("seed"),
                result.inputs.get("ids_sha256")))]
    return "\n".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows)


def _full_provenance(result: LayerwiseResult) -> str:
    blocks = {"port": result.port, "reference": result.reference, "oracle": result.oracle,
              "settings": result.settings, "inputs": result.inputs}
    return "\n".join(f"<h3>{_e(name)}</h3><pre>{_e(json.dumps(jsonable(b), indent=1))}</pre>"
                     for name, b in blocks.items())


def _tap_rows(result: LayerwiseResult) -> str:
    fd = result.first_divergence.tap if result.first_divergence else None
    rows = []
    for t in result.taps:
        cls = "first" if t.name == fd else t.verdict
        label = verdict_label(result, t.name, t.verdict)
        cells = [f'<td class="tap">{_e(t.name)}</td>', f"<td>{_e(label)}</td>"]
        cells += [f'<td class="num">{_e(v)}</td>' for v in (
            ratio_cell(t), fmt_err(t.err_port), fmt_err(t.err_ref), fmt_err(t.raw_diff),
            fmt_err(t.floor),
            "-" if not math.isfinite(t.cosine) else f"{max(0.0, 1 - t.cosine):.1e}",
            "-" if not math.isfinite(t.ulp_p99) else f"{t.ulp_p99:.4g}")]
        cells.append(f"<td>{_e(tap_note(result, t))}</td>")
        rows.append(f'<tr class="{cls}">{"".join(cells)}</tr>')
    return "\n".join(rows)


def to_html(result: LayerwiseResult, png: bytes | None) -> str:
    """A self-contained page: the plot is embedded, nothing is fetched."""
    fd = result.first_divergence
    if png:
        data = base64.b64encode(png).decode()
        plot = f'<img class="plot" alt="budget ratio of every tap" src="data:image/png;base64,{data}">'
    else:
        plot = "<p>(plot unavailable: matplotlib is not installed; pip install 'ssm-equiv[report]')</p>"
    golden = golden_replay(result)
    golden_html = f'<p class="golden"><b>{_e(golden["statement"])}</b></p>' if golden else ""
    notes = "".join(f'<p class="note">{_e(n)}</p>' for n in result.notes)
    first = f"<p><b>First divergence:</b> {_e(explanation_text(result, fd.tap))}</p>" if fd else ""
    verdict = _e(result.verdict)
    rest = _e(headline(result).removeprefix(result.verdict.upper()))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>ssm-equiv layer-wise diff: {_e(headline(result))}</title>
<style>{_CSS}</style></head><body>
<h1>ssm-equiv layer-wise diff: <span class="verdict-{verdict}">{verdict.upper()}</span>{rest}</h1>
<p class="summary" id="summary">{_e(summary_line(result))}</p>
{golden_html}
{first}
<p>A tap passes when RMS |port &minus; oracle| &le; {fmt_budget(result.budget)} &times;
max(RMS |reference &minus; oracle|, {_e(result.settings.get("floor_ulps"))} ULP) and its largest error is
within {fmt_budget(max_guard(result))} &times; the reference's largest, the oracle being the reference run
in float64.</p>
{notes}
<table class="prov">
{_header_rows(result)}
</table>
<h2>Budget ratio of every tap</h2>
{plot}
<h2>All taps (execution order)</h2>
<table>
<tr><th>tap</th><th>verdict</th><th>ratio</th><th>RMS port&minus;oracle</th><th>RMS ref&minus;oracle</th>
<th>max |port&minus;ref|</th><th>floor</th><th>1&minus;cosine</th><th>ULP p99 (vs ref)</th>
<th>reason</th></tr>
{_tap_rows(result)}
</table>
<h2>Provenance</h2>
<details><summary>everything each side reported (JSON)</summary>
{_full_provenance(result)}
</details>
</body></html>
"""
