"""The HTML page of a layer-wise diff: provenance header, the per-layer budget-ratio plot (embedded
as base64, also written beside it as ratio.png by `equiv.report.write_reports`), the full table.

The plot has one line per tap kind (the tap name with its layer index stripped, e.g. "mixer.ssm"),
x = layer index, log y, the budget drawn as a horizontal line. Taps without a layer index (embed,
norm_f, logits) are in the table only.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math

from equiv.layerwise import LayerwiseResult
from equiv.report import (
    _jsonable,
    fmt_err,
    fmt_ratio,
    reference_label,
    summary_line,
    tap_kind,
    verdict_label,
)

PLOT_FLOOR = 1e-3  # ratios of exactly 0 (port exact where the reference is not) drawn here on log y


def ratio_plot_png(result: LayerwiseResult) -> bytes | None:
    """The per-layer ratio plot as PNG bytes; None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # no display; must precede pyplot's import
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {}
    for t in result.taps:
        kind, layer = tap_kind(t.name)
        if layer is not None and math.isfinite(t.ratio):
            series.setdefault(kind, []).append((layer, max(t.ratio, PLOT_FLOOR)))
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=100)
    try:
        for kind, points in series.items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=4, label=kind)
        ax.axhline(result.budget, color="red", linestyle="--", linewidth=1.2,
                   label=f"budget {result.budget:g}x")
        fd = result.first_divergence
        if fd is not None:
            kind, layer = tap_kind(fd.tap)
            if layer is not None and math.isfinite(fd.ratio):
                ax.annotate(f"first divergence\n{fd.tap}", (layer, max(fd.ratio, PLOT_FLOOR)),
                            xytext=(10, -28), textcoords="offset points", fontsize=8, color="darkred",
                            arrowprops={"arrowstyle": "->", "color": "darkred"})
        if not series:
            ax.text(0.5, 0.5, "no per-layer taps with a measured ratio", ha="center", va="center",
                    transform=ax.transAxes)
        ax.set_yscale("log")
        ax.set_xlabel("layer index")
        ax.set_ylabel("|port - oracle| / reference's error")
        ax.set_title(f"error-budget ratio per layer ({result.dtype}, {result.mode})")
        ax.xaxis.get_major_locator().set_params(integer=True)
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
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-family: monospace; white-space: nowrap; } td.tap { font-family: monospace; }
tr.fail { background: #fde7e9; } tr.first { background: #f8c4c9; font-weight: bold; }
tr.unavailable { color: #777; }
.prov td:first-child { font-weight: bold; white-space: nowrap; }
.prov code { white-space: pre-wrap; word-break: break-all; }
.note { background: #fff8e1; padding: 0.4em 0.8em; border-left: 3px solid #f0b400; }
"""


def _e(x) -> str:
    return html.escape(str(x))


def _provenance_rows(result: LayerwiseResult) -> str:
    def value(v):
        v = _jsonable(v)
        return _e(v) if isinstance(v, str | int | float) or v is None else f"<code>{_e(json.dumps(v))}</code>"

    rows = []
    for side in ("reference", "oracle"):
        block = getattr(result, side)
        rows += [(f"{side}: {k}", v) for k, v in block.items()]
    rows += [(f"port: {k}", v) for k, v in result.port.items() if k != "details"]
    rows += [(f"port: {k}", v) for k, v in result.port.get("details", {}).items()]
    rows += [(f"settings: {k}", v) for k, v in result.settings.items()]
    rows += [(f"inputs: {k}", v) for k, v in result.inputs.items()]
    return "\n".join(f"<tr><td>{_e(k)}</td><td>{value(v)}</td></tr>" for k, v in rows)


def _tap_rows(result: LayerwiseResult) -> str:
    fd = result.first_divergence.tap if result.first_divergence else None
    rows = []
    for t in result.taps:
        cls = "first" if t.name == fd else t.verdict
        label = verdict_label(result, t.name, t.verdict)
        cells = [f'<td class="tap">{_e(t.name)}</td>', f"<td>{_e(label)}</td>"]
        cells += [f'<td class="num">{_e(v)}</td>' for v in (
            fmt_ratio(t.ratio), fmt_err(t.err_port), fmt_err(t.err_ref), fmt_err(t.raw_diff),
            fmt_err(t.floor),
            "-" if not math.isfinite(t.cosine) else f"{1 - t.cosine:.1e}",
            "-" if not math.isfinite(t.ulp_p99) else f"{t.ulp_p99:.4g}")]
        note = result.explanations.get(t.name, t.reason).removeprefix(f"{t.name}: ")
        cells.append(f"<td>{_e(note)}</td>")
        rows.append(f'<tr class="{cls}">{"".join(cells)}</tr>')
    return "\n".join(rows)


def to_html(result: LayerwiseResult, png: bytes | None) -> str:
    """A self-contained page: the plot is embedded, nothing is fetched."""
    fd = result.first_divergence
    if png:
        data = base64.b64encode(png).decode()
        plot = f'<img alt="budget ratio per layer" src="data:image/png;base64,{data}">'
    else:
        plot = "<p>(plot unavailable: matplotlib is not installed; pip install 'ssm-equiv[report]')</p>"
    notes = "".join(f'<p class="note">{_e(n)}</p>' for n in result.notes)
    first = f"<p><b>First divergence:</b> {_e(fd.explanation)}</p>" if fd else ""
    ref, verdict, settings = result.reference, _e(result.verdict), result.settings
    runner, code_path = reference_label(ref)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>ssm-equiv layer-wise diff: {_e(result.verdict)}</title>
<style>{_CSS}</style></head><body>
<h1>ssm-equiv layer-wise diff: <span class="verdict-{verdict}">{verdict.upper()}</span></h1>
<p>{_e(summary_line(result))}</p>
{first}
<p>Port <b>{_e(result.port.get("name"))}</b> {_e(result.port.get("version"))} against reference
<b>{_e(runner)}</b> (code path: <b>{_e(code_path)}</b>), {_e(result.dtype)}, {_e(result.mode)} mode.
A tap passes when |port &minus; oracle| &le; {result.budget:g} &times; max(|reference &minus; oracle|,
{_e(settings.get("floor_ulps"))} ULP); the oracle is the reference run in float64.
Matmul precision: <b>{_e(settings.get("matmul_precision"))}</b>.</p>
{notes}
<h2>Budget ratio per layer</h2>
{plot}
<h2>Provenance</h2>
<table class="prov">
{_provenance_rows(result)}
</table>
<h2>All taps (execution order)</h2>
<table>
<tr><th>tap</th><th>verdict</th><th>ratio</th><th>|port&minus;oracle|</th><th>|ref&minus;oracle|</th>
<th>|port&minus;ref|</th><th>floor</th><th>1&minus;cosine</th><th>ULP p99 (vs ref)</th><th>reason</th></tr>
{_tap_rows(result)}
</table>
</body></html>
"""
