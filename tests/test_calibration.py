"""The null-distribution tool (equiv_reference/mamba2/calibration.py): it runs, its null ratios are finite and
positive, and a defect-sized change of one tap stands far above them (the measurement can tell a
defect from rounding noise). tiny-g2 only, the plan's input only, one alternative: a few seconds."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from equiv_reference.mamba2 import calibration as cal  # noqa: E402

ALT = "torch-linear-kblock32"


@pytest.fixture(scope="module")
def tiny_run():
    return cal.calibrate(["tiny-g2"], seeds=0, alternatives=[ALT], modes=("accumulated",),
                         defect_fixtures=[], progress=lambda _msg: None)


def test_runs_and_every_null_ratio_is_finite_and_positive(tiny_run):
    rows = cal.rows_of(tiny_run)
    assert rows, "no ratios measured"
    assert {r["alternative"] for r in rows} == {ALT}
    assert {r["fixture"] for r in rows} == {"tiny-g2"} and {r["input"] for r in rows} == {"plan"}
    for r in rows:
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0, r
        assert math.isfinite(r["ratio_max"]) and r["ratio_max"] > 0, r
    # the patch really ran: 2 layers x (in_proj, out_proj) + lm_head per forward
    assert tiny_run["run_details"]["tiny-g2"][ALT]["linear_calls_patched"] == 5
    # an alternative that changed nothing would be no sample of the null at all
    assert not all(r["identical"] for r in rows)
    agg = tiny_run["aggregate"]["by_group"]["accumulated"]["reference"]
    # rows are stored to 5 significant digits, the aggregate from the unrounded values
    assert agg["*"]["ratio"]["max"] == pytest.approx(max(r["ratio"] for r in rows), rel=1e-4)
    assert json.loads(cal.to_json(tiny_run)) == json.loads(json.dumps(tiny_run))  # what --out writes
    assert "layers.*.mixer.ssm" in cal.table(tiny_run["aggregate"])


def test_planted_relative_perturbation_stands_far_above_the_null():
    from equiv.check import plan_for
    from equiv.fixtures import fixture_dir
    from equiv.references import load_reference

    path = fixture_dir("tiny-g2")
    cfg = json.loads((path / "config.json").read_text())
    ids = plan_for(path, cfg["vocab_size"], cfg["chunk_size"]).layerwise_ids
    oracle = load_reference("transformers", path, "float64").run(ids, None)
    ref_runner = load_reference("transformers", path, "float32")
    ref = ref_runner.run(ids, None)
    alt_runner = load_reference("transformers", path, "float32")
    alt, _ = cal.run_torch_alternative(alt_runner, cal.ALTERNATIVES[ALT], cfg["chunk_size"], ids)
    null = cal.ratios_for(alt, ref, oracle)
    null_max = max(r["ratio"] for r in null.values())

    tap = "layers.1.mixer.ssm"
    rng = np.random.default_rng(0)
    planted = dict(alt)
    planted[tap] = (alt[tap] * (1 + 1e-3 * rng.standard_normal(alt[tap].shape))).astype(np.float32)
    hit = cal.ratios_for(planted, ref, oracle)[tap]["ratio"]
    assert null_max < 3, null_max
    assert hit > 100 * null_max, (hit, null_max)
    # the other taps are untouched by the plant
    assert all(cal.ratios_for(planted, ref, oracle)[t]["ratio"] == null[t]["ratio"] for t in null if t != tap)


MARGIN = 1.5
"""Each budget must sit at least this far above the null maximum it was set from (docs/calibration.md)."""


@pytest.mark.slow
def test_the_budgets_still_hold_over_a_regenerated_null():
    """Regenerates part of the calibration (the trained fixture and one tiny one, the main job's
    inputs plus one random input; reorderings, random rounding and the JAX family) and fails if a
    budget of equiv/compare.py TOLERANCES no longer stands MARGIN above the null it measures: an
    equally correct computation must never come near failing."""
    from equiv.compare import tolerance

    alts = ["torch-chunk-odd", "torch-linear-reversed", "torch-mca-1", "torch-mca-2", "jax-builtin",
            "jax-unsplit"]
    run = cal.calibrate(["tiny-gh", "trained-bytes"], seeds=1, alternatives=alts, defect_fixtures=[],
                        progress=lambda _msg: None)
    null = run["aggregate"]["by_group"]
    checks = [("accumulated", "ratio", "error_budget_accumulated"),
              ("accumulated", "ratio_max", "max_error_guard_accumulated"),
              ("isolated", "ratio", "error_budget"), ("isolated", "ratio_max", "max_error_guard")]
    for mode, metric, key in checks:
        worst = null[mode]["null-all"]["*"][metric]["max"]
        budget = tolerance("float32", key).budget
        assert MARGIN * worst <= budget, (mode, metric, worst, budget, null[mode]["null-all"]["*"]["argmax"])
