"""Reports of a layer-wise diff: the JSON matches docs/report-schema.md and round-trips, the terminal
table fits 80 columns, Markdown / HTML / PNG are produced, an unwritable directory is one clear error.
Every report agrees with the verdict: a ratio over its budget prints over it, every verdict line
says how many taps were compared, the plot shows every tap, golden replays say so, nothing is cut.
(tests/test_report_browser.py renders the HTML in a real browser.)"""

from __future__ import annotations

import dataclasses
import html
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from equiv.compare import compare_tap
from equiv.errors import EquivError, ReportWriteError
from equiv.golden import GoldenRunner, RecordingRunner, save_recording
from equiv.layerwise import run_layerwise
from equiv.report import (
    SCHEMA,
    read_report,
    terminal_table,
    to_json,
    to_json_dict,
    to_markdown,
    write_reports,
)
from equiv.report_html import plot_positions, ratio_plot_png, to_html
from equiv.report_wording import failure_brief, fmt_budget, fmt_ratio, summary_line, tap_kind, tap_reason
from tests.fake_port import Defect, FakeConfig, FakeModel, FakeRunner

SCHEMA_DOC = Path(__file__).resolve().parents[1] / "docs" / "report-schema.md"


def _run(cfg, defects=(), mode="accumulated", port_extra=(), ref_extra=(), model=None, reference=None,
         oracle=None, budget=None):
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 16))
    return run_layerwise(model or FakeModel(cfg, "float32", defects, extra_taps=port_extra),
                         reference or FakeRunner(cfg, "float32", ref_extra),
                         oracle or FakeRunner(cfg, "float64", ref_extra), ids, None, mode=mode, seed=1,
                         budget=budget)


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
    assert "FAIL" not in text and ">" not in text
    assert text.rstrip().endswith("EQUIVALENT: all 9 taps compared, 0 fail")


def test_markdown_summary_failing_table_and_provenance(divergent, written):
    md = written[1]["report.md"].read_text()
    assert md == to_markdown(divergent)
    assert md.startswith("### ssm-equiv layer-wise diff: DIVERGENT")
    assert "**First divergence:** layers.5.mix:" in md
    failing = [t.name for t in divergent.taps if t.verdict == "fail"]
    for name in failing:
        assert f"| `{name}` | FAIL |" in md
    assert "| the tap before it, layers.5.a, is within budget, so the defect is in this op |" in md
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


# ---------------------------------------------------------------------------------------------
# numbers that agree with the verdict


@pytest.mark.parametrize("ratio, budget, expected", [
    (3.0047, 3.0, "3.005x"), (3.0004, 3.0, "3.0004x"), (2.0000001, 2.0, "2.0000001x"), (2.04, 2.0, "2.04x"),
    (2.0, 2.0, "2.00x"), (2.9996, 3.0, "3.00x"), (0.136, 3.0, "0.136x"), (413.21, 3.0, "413x"),
    (4163.2, 3.0, "4163x"), (2.1e7, 3.0, "2.10e+07x"), (0.0, 3.0, "0x"), (1e-5, 3.0, "1.00e-05x"),
    (12.004, 12.0, "12.004x"), (math.nan, 3.0, "-"), (None, 3.0, "-"), (math.inf, 3.0, "inf")])
def test_fmt_ratio(ratio, budget, expected):
    assert fmt_ratio(ratio, budget) == expected


@pytest.mark.parametrize("budget, expected", [(3.0, "3"), (12.0, "12"), (2.5, "2.5"), (1e9, "1e+09"),
                                              (2.123456789, "2.123456789")])
def test_fmt_budget_prints_the_budget_exactly(budget, expected):
    assert fmt_budget(budget) == expected and float(expected) == budget


@given(budget=st.sampled_from([2.0, 3.0, 4.0, 6.0, 12.0, 16.0, 2.5, 1e9, 0.7]),
       rel=st.one_of(st.floats(-1e-9, 1e-9), st.floats(-1e-3, 1e-3), st.floats(-0.999, 1e4)))
def test_a_printed_ratio_is_on_the_same_side_of_its_budget_as_the_ratio(budget, rel):
    ratio = budget * (1 + rel)
    text = fmt_ratio(ratio, budget)
    shown = float(text.removesuffix("x"))
    assert (shown > budget) == (ratio > budget), (ratio, budget, text)
    digits = text.removesuffix("x").split("e")[0].replace(".", "").lstrip("0")
    assert ratio == 0 or len(digits) >= 3, text


@pytest.fixture(scope="module")
def just_over():
    """A real run (accumulated mode, --budget 3) whose first divergence is just over its budget
    (3 < ratio < 3.005, which 2 decimals print as '3.00x'): the planted defect's size is bisected."""
    lo, hi = 5e-7, 2e-6  # ratio ~1.46 and ~4.8 at layers.1.mix of the 2-layer fake
    for _ in range(60):
        size = (lo + hi) / 2
        r = _run(FakeConfig(n_layers=2), [Defect("layers.1.mix", size)], budget=3.0)
        ratio = r.tap("layers.1.mix").ratio
        if 3.0 < ratio < 3.005 and r.first_divergence and r.first_divergence.tap == "layers.1.mix":
            return r
        lo, hi = (size, hi) if ratio <= 3.0 else (lo, size)
    pytest.fail(f"no defect size puts layers.1.mix in (3, 3.005); last ratio {ratio}")


def test_a_ratio_just_over_budget_prints_over_it_in_every_report(just_over, tmp_path):
    r = just_over
    t = r.tap("layers.1.mix")
    shown = fmt_ratio(t.ratio, 3.0)
    assert float(shown[:-1]) > 3.0 and r.budget == 3.0
    assert f"first at layers.1.mix ({shown} > budget 3)" in summary_line(r)
    paths = write_reports(r, tmp_path)
    table = terminal_table(r)
    row = next(ln for ln in table.splitlines() if ln.startswith("> layers.1.mix"))
    assert "FAIL" in row and f" {shown} " in row
    texts = {"terminal": table.replace("\n  ", " "), "md": paths["report.md"].read_text(),
             "html": paths["report.html"].read_text()}
    for name, text in texts.items():
        expected = f"layers.1.mix: {shown} the reference's float32 error > budget 3"
        assert (html.escape(expected) if name == "html" else expected) in text, name
        assert "3.00x" not in text and "(3.0x" not in text, name
    fd = read_report(paths["report.json"])["first_divergence"]
    assert f"{shown} the reference's float32 error > budget 3" in fd["explanation"]


def test_a_tap_failed_by_the_max_error_guard_says_so():
    """The RMS ratio is within budget; the guard on the largest element failed the tap."""
    oracle = np.random.default_rng(0).standard_normal(4000)
    reference = oracle.astype(np.float32)
    port = reference.copy()
    port[7] = np.float32(port[7] + 60 * np.spacing(np.float32(np.abs(oracle).max())))
    t = compare_tap("x", port, reference, oracle, budget=3.0)
    assert t.verdict == "fail" and t.ratio <= 3.0 < 12.0 == t.max_budget < t.ratio_max
    brief = failure_brief(t)
    assert brief == f"max-error ratio {fmt_ratio(t.ratio_max, 12.0)} > guard 12"
    assert f"(guard 12x) while the RMS ratio is {fmt_ratio(t.ratio, 3.0)} (budget 3x)" in tap_reason(t)


# ---------------------------------------------------------------------------------------------
# coverage in every verdict line


class _LogitsOnly(FakeModel):
    """A port that returns only the logits."""

    def __init__(self, cfg):
        super().__init__(cfg, "float32")
        self.tap_names = ["logits"]

    def forward(self, ids, mask=None, taps=True):
        return {"logits": super().forward(ids, mask)["logits"]}


def test_a_logits_only_port_says_only_the_logits_were_compared(tmp_path):
    cfg = FakeConfig(n_layers=4)
    r = _run(cfg, model=_LogitsOnly(cfg))
    line = "EQUIVALENT: 1 of 15 taps compared (logits only; 14 not produced by the port), 0 fail"
    assert summary_line(r) == line
    paths = write_reports(r, tmp_path)
    assert paths["report.md"].read_text().startswith(
        f"### ssm-equiv layer-wise diff: EQUIVALENT (1 of 15 taps compared, 0 fail)\n\n{line}\n")
    assert line in paths["report.html"].read_text() and line in terminal_table(r).replace("\n  ", " ")
    report = read_report(paths["report.json"])
    assert report["summary"] == line and report["counts"]["compared"] == 1


def test_fail_counts_are_out_of_the_compared_taps(divergent):
    verdicts = [t.verdict for t in divergent.taps]
    n_pass, n_fail = verdicts.count("pass"), verdicts.count("fail")
    assert summary_line(divergent).startswith(
        f"DIVERGENT: {n_pass + n_fail} of {len(verdicts)} taps compared (12 not produced by the port; "
        f"12 not produced by the reference), {n_fail} fail, first at layers.5.mix (")
    assert to_json_dict(divergent)["counts"]["compared"] == n_pass + n_fail


def test_a_port_without_isolated_mode_is_inconclusive_with_nothing_compared():
    cfg = FakeConfig(n_layers=1)
    r = _run(cfg, mode="isolated", model=FakeModel(cfg, "float32", isolated=False))
    assert summary_line(r) == "INCONCLUSIVE: 0 of 6 taps compared (6 unavailable on a side), 0 fail"


# ---------------------------------------------------------------------------------------------
# the plot shows every tap


def _red_pixels(png: bytes) -> int:
    import matplotlib.image

    rgb = (matplotlib.image.imread(io.BytesIO(png), format="png")[..., :3] * 255).astype(int)
    return int(((rgb[..., 0] > 200) & (rgb[..., 1] < 60) & (rgb[..., 2] < 60)).sum())


@pytest.mark.parametrize("n_layers", [2, 64])
def test_the_plot_shows_every_tap_at_any_depth(n_layers):
    pytest.importorskip("matplotlib")
    bad = _run(FakeConfig(n_layers=n_layers), [Defect(f"layers.{n_layers // 2}.mix", 1e-4)])
    xs, ticks, layers = plot_positions(bad)
    assert layers == n_layers and set(xs) == {t.name for t in bad.taps}
    assert xs["embed"] < 0 < n_layers - 1 < xs["norm_f"] < xs["logits"]
    labels = [label for _, label in ticks]
    assert {"embed", "norm_f", "logits", "0", str(n_layers - 1)} <= set(labels) and len(labels) <= 24
    png = ratio_plot_png(bad)
    good_png = ratio_plot_png(_run(FakeConfig(n_layers=n_layers)))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and good_png[:8] == png[:8]
    assert _red_pixels(png) > _red_pixels(good_png) + 200  # failing taps crossed in red


# ---------------------------------------------------------------------------------------------
# golden mode


def test_a_golden_replay_says_so_in_every_report(tmp_path):
    cfg = FakeConfig(n_layers=2)
    ref, oracle = RecordingRunner(FakeRunner(cfg, "float32")), RecordingRunner(FakeRunner(cfg, "float64"))
    live = _run(cfg, reference=ref, oracle=oracle)
    (tmp_path / "rec").mkdir()
    save_recording(ref, tmp_path / "rec" / "fake-float32")
    save_recording(oracle, tmp_path / "rec" / "fake-float64")
    r = _run(cfg, reference=GoldenRunner(tmp_path / "rec" / "fake-float32"),
             oracle=GoldenRunner(tmp_path / "rec" / "fake-float64"))
    assert [t.ratio for t in r.taps] == [t.ratio for t in live.taps]
    golden = to_json_dict(r)["golden"]
    assert [(g["side"], Path(g["replayed_from"]).name, g["dtype"]) for g in golden["recordings"]] == [
        ("reference", "fake-float32", "float32"), ("oracle", "fake-float64", "float64")]
    statement = golden["statement"]
    assert statement.startswith("GOLDEN MODE: the reference was not run here; its recorded outputs were "
                                "replayed.")
    assert f"recorded with numpy {np.__version__}" in statement
    assert statement.endswith("the recordings carry no date: they are deterministic, and `nox -s fixtures` "
                              "regenerates them bit for bit with these versions")
    paths = write_reports(r, tmp_path / "out")
    for text in (terminal_table(r), paths["report.md"].read_text(), paths["report.html"].read_text()):
        assert "GOLDEN MODE" in text and f"numpy {np.__version__}" in text
        assert str(tmp_path / "rec" / "fake-float32") in "".join(text.split())  # wrapped, whole
    live_texts = [terminal_table(live), to_markdown(live), to_html(live, None), to_json(live)]
    assert to_json_dict(live)["golden"] is None and not any("GOLDEN" in x for x in live_texts)


# ---------------------------------------------------------------------------------------------
# nothing is cut


def test_notes_explanations_and_tap_names_are_wrapped_never_cut(divergent):
    tail = "the-very-end-of-this-note"
    note = "a long caveat " + "that goes on and on, " * 20 + tail
    r = dataclasses.replace(divergent, notes=[*divergent.notes, note])
    table = terminal_table(r, limit=100)
    assert max(map(len, table.splitlines())) <= 80
    flat = " ".join(table.split())
    assert " ".join(note.split()) in flat and "a_port_only_tap_with_a_very_long_name" in table
    assert "  layers.0.a_port_only_tap_with_a_very_long_name" in table.splitlines()  # a line of its own
    for text in (to_markdown(r), to_html(r, None)):
        assert tail in text
    page = to_html(r, None)
    assert r.inputs["ids_sha256"] in page  # the whole hash
