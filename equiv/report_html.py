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
    tap_note,
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
        bottom, top = ax.get_ylim()
        # keep the budget line off the plot edge
        ax.set_ylim(min(bottom, result.budget / 10), max(top, result.budget * 3))
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
pre { white-space: pre-wrap; word-break: break-all; font-size: 0.8em; background: #f6f6f6; padding: 0.5em; }
.note { background: #fff8e1; padding: 0.4em 0.8em; border-left: 3px solid #f0b400; }
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


def _versions(result: LayerwiseResult) -> str:
    merged = {**(result.reference.get("versions") or {}), **result.settings.get("versions", {})}
    return ", ".join(f"{k} {v}" for k, v in merged.items() if v is not None)


def _header_rows(result: LayerwiseResult) -> str:
    """The provenance a reader needs first: what ran on each side, versions, precision settings."""
    runner, code_path = reference_label(result.reference)
    details = result.port.get("details", {})
    rows = [("port", f"{result.port.get('name')} {result.port.get('version')}"
                     + "".join(f", {k} {details[k]}" for k in ("implementation", "backend") if k in details)),
            ("reference", f"{runner}, code path: {code_path}"),
            ("oracle", "{}, code path: {} (float64)".format(*reference_label(result.oracle))),
            ("compared", f"{result.dtype}, {result.mode} mode, budget {result.budget:g}x"),
            ("port matmul precision", result.settings.get("matmul_precision")),
            *[(f"reference {k}", v) for k, v in _find_flags(result.reference)],
            ("versions", _versions(result)),
            ("inputs", "{} seed {}, ids sha256 {}".format(
                "x".join(map(str, result.inputs.get("shape", []))), result.inputs.get("seed"),
                str(result.inputs.get("ids_sha256"))[:16]))]
    return "\n".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows)


def _full_provenance(result: LayerwiseResult) -> str:
    blocks = {"port": result.port, "reference": result.reference, "oracle": result.oracle,
              "settings": result.settings, "inputs": result.inputs}
    return "\n".join(f"<h3>{_e(name)}</h3><pre>{_e(json.dumps(_jsonable(b), indent=1))}</pre>"
                     for name, b in blocks.items())


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
        plot = f'<img alt="budget ratio per layer" src="data:image/png;base64,{data}">'
    else:
        plot = "<p>(plot unavailable: matplotlib is not installed; pip install 'ssm-equiv[report]')</p>"
    notes = "".join(f'<p class="note">{_e(n)}</p>' for n in result.notes)
    first = f"<p><b>First divergence:</b> {_e(fd.explanation)}</p>" if fd else ""
    verdict = _e(result.verdict)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>ssm-equiv layer-wise diff: {_e(result.verdict)}</title>
<style>{_CSS}</style></head><body>
<h1>ssm-equiv layer-wise diff: <span class="verdict-{verdict}">{verdict.upper()}</span></h1>
<p>{_e(summary_line(result))}</p>
{first}
<p>A tap passes when |port &minus; oracle| &le; {result.budget:g} &times; max(|reference &minus; oracle|,
{_e(result.settings.get("floor_ulps"))} ULP), the oracle being the reference run in float64.</p>
{notes}
<table class="prov">
{_header_rows(result)}
</table>
<h2>Budget ratio per layer</h2>
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
