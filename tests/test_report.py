"""Reports of a layer-wise diff: the JSON matches docs/report-schema.md and round-trips, the terminal
table fits 80 columns, Markdown / HTML / PNG are produced, an unwritable directory is one clear error."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from equiv.errors import EquivError, ReportWriteError
from equiv.layerwise import run_layerwise
from equiv.report import (
    SCHEMA,
    read_report,
    tap_kind,
    terminal_table,
    to_json,
    to_json_dict,
    to_markdown,
    write_reports,
)
from equiv.report_html import to_html
from tests.fake_port import Defect, FakeConfig, FakeModel, FakeRunner

SCHEMA_DOC = Path(__file__).resolve().parents[1] / "docs" / "report-schema.md"


def _run(cfg, defects=(), mode="accumulated", port_extra=(), ref_extra=()):
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 16))
    return run_layerwise(FakeModel(cfg, "float32", defects, extra_taps=port_extra),
                         FakeRunner(cfg, "float32", ref_extra), FakeRunner(cfg, "float64", ref_extra),
                         ids, None, mode=mode, seed=1)


@pytest.fixture(scope="module")
def divergent():
    """12 layers, a defect in layer 5, one-sided taps with long names: every report feature."""
    return _run(FakeConfig(n_layers=12), [Defect("layers.5.mix", 1e-4)],
                port_extra=("a_port_only_tap_with_a_very_long_name",), ref_extra=("ref_only",))


@pytest.fixture(scope="module")
def written(divergent, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "nested" / "dir"
    return out, write_reports(divergent, out)


def documented_fields(section: str) -> set[str]:
    """The backticked first-column names of the table under heading `section` in the schema doc."""
    text = SCHEMA_DOC.read_text()
    body = text.split(f"\n{section}\n", 1)[1].split("\n#", 1)[0]
    names = set()
    for line in body.splitlines():
        if line.startswith("| `"):
            names |= set(re.findall(r"`([a-z_0-9]+)`", line.split("|")[1]))
    return names


def test_json_keys_are_exactly_the_documented_schema(divergent):
    d = to_json_dict(divergent)
    assert (d["schema"], d["schema_version"]) == (SCHEMA, 1)
    assert set(d) == documented_fields("## Top level")
    assert set(d["counts"]) == documented_fields("### `counts`")
    assert set(d["first_divergence"]) == documented_fields("### `first_divergence`")
    assert set(d["inputs"]) == documented_fields("### `inputs`")
    assert set(d["port"]) == documented_fields("### `port`")
    assert set(d["settings"]) == documented_fields("### `settings`")
    for tap in d["taps"]:
        assert set(tap) == documented_fields("## `taps[]`"), tap["name"]


def test_json_round_trips_with_nan_as_null(divergent, written):
    out, paths = written
    text = paths["report.json"].read_text()
    assert "NaN" not in text and "Infinity" not in text
    loaded = read_report(paths["report.json"])
    assert loaded == json.loads(to_json(divergent))  # deterministic: no timestamp
    one_sided = next(t for t in loaded["taps"] if t["side"] == "reference")
    assert one_sided["verdict"] == "unavailable"
    assert one_sided["ratio"] is None and one_sided["err_port"] is None
    fd = loaded["first_divergence"]
    assert fd["tap"] == "layers.5.mix" and loaded["taps"][fd["index"]]["name"] == "layers.5.mix"
    assert math.isclose(fd["ratio"], divergent.first_divergence.ratio)
    assert loaded["counts"]["port_only"] == 12 and loaded["counts"]["reference_only"] == 12
    assert loaded["taps"][fd["index"]]["kind"] == "mix" and loaded["taps"][fd["index"]]["layer"] == 5


def test_read_report_rejects_other_schemas(tmp_path):
    bad = tmp_path / "r.json"
    bad.write_text(json.dumps({"schema": SCHEMA, "schema_version": 99}))
    with pytest.raises(EquivError, match="version 1, got"):
        read_report(bad)
    bad.write_text("[1, 2")
    with pytest.raises(EquivError, match="readable JSON"):
        read_report(bad)


def test_terminal_table_fits_80_columns_worst_first(divergent):
    text = terminal_table(divergent, limit=10)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 80, max(lines, key=len)
    rows = [ln for ln in lines if re.match(r"^[> ] \S", ln) and (" FAIL " in ln or " ok " in ln)]
    ratios = [float(re.search(r" ([0-9.e+]+)x ", ln).group(1)) for ln in rows]
    assert len(rows) == 10
    # worst first (the marked first divergence may be appended at the end when beyond the limit)
    body = [r for r, ln in zip(ratios, rows) if not ln.startswith(">")]
    assert body == sorted(body, reverse=True)
    marked = [ln for ln in lines if ln.startswith("> ")]
    assert marked[0].startswith("> layers.5.mix") and "FAIL" in marked[0]
    assert lines[-1].startswith("DIVERGENT:") or lines[-2].startswith("DIVERGENT:")
    assert "more taps" in text


def test_terminal_table_of_an_equivalent_run():
    r = _run(FakeConfig(n_layers=2))
    text = terminal_table(r)
    assert max(map(len, text.splitlines())) <= 80
    assert "FAIL" not in text and ">" not in text and text.rstrip().endswith("EQUIVALENT: 0/9 taps fail")


def test_markdown_summary_failing_table_and_provenance(divergent, written):
    md = written[1]["report.md"].read_text()
    assert md == to_markdown(divergent)
    assert md.startswith("### ssm-equiv layer-wise diff: DIVERGENT")
    assert "**First divergence:** layers.5.mix:" in md
    failing = [t.name for t in divergent.taps if t.verdict == "fail"]
    for name in failing:
        assert f"| `{name}` | FAIL |" in md
    assert "| every upstream tap is within budget, so the defect is in this op |" in md
    assert "| upstream tap layers.5.mix already diverged, so this may only be its consequence" in md
    assert "**Worst passing taps**" in md and "<details><summary>Provenance</summary>" in md
    assert '\\"code_path\\"' not in md and '"code_path": "numpy triangular-matmul mean"' in md
    table_rows = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert all(ln.count(" | ") == table_rows[0].count(" | ") for ln in table_rows)  # no stray pipes


def test_html_is_self_contained_with_plot_provenance_and_every_tap(divergent, written):
    paths = written[1]
    page = paths["report.html"].read_text()
    png = paths["ratio.png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "data:image/png;base64," in page and "<script" not in page and "http" not in page
    assert "numpy triangular-matmul mean" in page and "n/a (numpy)" in page  # code path, precision
    for t in divergent.taps:
        assert f'<td class="tap">{t.name}</td>' in page
    assert page.count('class="first"') == 1


def test_html_header_names_code_path_versions_and_precision_flags_of_any_runner(divergent):
    """The runner's provenance keys are its own; the header finds precision settings at any depth."""
    prov = {"reference": "transformers Mamba2ForCausalLM", "path": "torch fallback",
            "versions": {"torch": "2.13.0+cpu"},
            "environment": {"torch_float32_matmul_precision": "highest", "cuda_matmul_allow_tf32": False}}
    page = to_html(dataclasses.replace(divergent, reference=prov), None)
    header = page.split('<table class="prov">', 1)[1].split("</table>", 1)[0]
    assert "transformers Mamba2ForCausalLM, code path: torch fallback" in header
    assert "<td>reference environment.torch_float32_matmul_precision</td><td>highest</td>" in header
    assert "<td>reference environment.cuda_matmul_allow_tf32</td><td>False</td>" in header
    assert "torch 2.13.0+cpu" in header and f"numpy {np.__version__}" in header
    assert "plot unavailable" in page  # no PNG given: said so, not a broken image


def test_isolated_report_states_the_approximation(tmp_path):
    r = _run(FakeConfig(n_layers=2), [Defect("layers.1.a", 1e-4)], mode="isolated")
    paths = write_reports(r, tmp_path)
    for name in ("report.md", "report.html", "report.json"):
        assert "accumulated* error" in paths[name].read_text()
    assert "accumulated* error" in terminal_table(r).replace("\n", " ")


@pytest.mark.parametrize("case", ["parent is a file", "out dir is a file"])
def test_unwritable_out_dir_is_one_line_report_write_error(tmp_path, case):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    out = blocker / "sub" if case == "parent is a file" else blocker
    r = _run(FakeConfig(n_layers=1))
    with pytest.raises(ReportWriteError) as e:
        write_reports(r, out)
    assert "\n" not in str(e.value) and str(out) in str(e.value)


@pytest.mark.parametrize("name, expected", [
    ("layers.3.mixer.ssm", ("mixer.ssm", 3)), ("layers.12", ("(block output)", 12)),
    ("logits", ("logits", None)), ("blocks.0.attn.q", ("attn.q", 0)), ("h10.x", ("h10.x", None))])
def test_tap_kind(name, expected):
    assert tap_kind(name) == expected
