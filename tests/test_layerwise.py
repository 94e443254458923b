"""The layer-wise engine on the numpy fake (tests/fake_port.py): defects planted at chosen taps must
be found there, the correct fake must pass, isolated mode must judge each op alone."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from equiv.errors import EquivError
from equiv.layerwise import align_taps, run_layerwise
from tests.fake_port import Defect, FakeConfig, FakeModel, FakeRunner, tap_names

CFG = FakeConfig()  # 3 layers: embed, layers.{0,1,2}.{a,mix}, layers.{0,1,2}, norm_f, logits
IDS = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 24))


def run(defects=(), mode="accumulated", dtype="float32", port_extra=(), ref_extra=(), **kw):
    model = kw.pop("model", None) or FakeModel(CFG, dtype, defects, extra_taps=port_extra)
    return run_layerwise(model, FakeRunner(CFG, dtype, ref_extra), FakeRunner(CFG, "float64", ref_extra),
                         kw.pop("ids", IDS), kw.pop("mask", None), mode=mode, dtype=dtype, **kw)


def failing(result) -> list[str]:
    return [t.name for t in result.taps if t.verdict == "fail"]


@pytest.mark.parametrize("mode", ["accumulated", "isolated"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_correct_fake_is_equivalent(mode, dtype):
    r = run(mode=mode, dtype=dtype)
    assert r.verdict == "equivalent", [(t.name, t.reason) for t in r.taps if t.verdict != "pass"]
    assert [t.name for t in r.taps] == tap_names(CFG.n_layers)
    assert r.first_divergence is None and r.counts["pass"] == r.counts["total"] == 12
    # the ratio is a measurement, not a constant: the port's summation order differs from the reference's
    ratios = [t.ratio for t in r.taps if t.name != "embed"]
    assert all(0 < x <= r.budget for x in ratios) and len({round(x, 6) for x in ratios}) > 3


def test_planted_defect_is_the_first_divergence_with_upstream_passing():
    r = run([Defect("layers.1.mix", 1e-4)])
    names = [t.name for t in r.taps]
    fd = r.first_divergence
    assert r.verdict == "divergent" and fd.tap == "layers.1.mix" and fd.index == names.index("layers.1.mix")
    assert all(t.verdict == "pass" for t in r.taps[:fd.index])
    assert fd.ratio > 10 * r.budget
    assert "every upstream tap is within budget, so the defect is in this op" in fd.explanation
    assert fd.explanation.startswith("layers.1.mix: ")
    # accumulated mode smears it: every later tap fails too, each explained by the upstream one
    assert failing(r) == names[fd.index:]
    assert "upstream tap layers.1.mix already diverged" in r.explanations["logits"]


def test_defect_below_the_budget_is_not_flagged():
    """A perturbation smaller than float32 rounding is not a divergence (no false alarm)."""
    assert run([Defect("layers.1.mix", 1e-9)]).verdict == "equivalent"


def test_isolated_mode_localises_what_accumulated_mode_smears():
    defects = [Defect("layers.0.mix", 1e-4), Defect("layers.2.a", 1e-4)]
    acc, iso = run(defects), run(defects, mode="isolated")
    names = [t.name for t in acc.taps]
    assert acc.first_divergence.tap == "layers.0.mix"
    assert failing(acc) == names[names.index("layers.0.mix"):]  # the second defect is hidden in the smear
    assert failing(iso) == ["layers.0.mix", "layers.2.a"]
    assert iso.first_divergence.tap == "layers.0.mix"
    assert "fed the oracle's inputs, this op alone is off, so the defect is in this op" \
        in iso.explanations["layers.2.a"]
    assert any("accumulated* error" in n for n in iso.notes)  # the stated approximation
    assert not acc.notes


def test_isolated_mode_feeds_the_oracle_rounded_to_the_compute_dtype():
    seen = {}

    class Recording(FakeModel):
        def forward_isolated(self, ids, mask, inputs):
            seen.update(inputs)
            return super().forward_isolated(ids, mask, inputs)

    oracle = FakeRunner(CFG, "float64").run(IDS)
    run(mode="isolated", dtype="bfloat16", model=Recording(CFG, "bfloat16"))
    assert set(seen) == set(oracle)
    x = seen["layers.1.mix"]
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, oracle["layers.1.mix"].astype(ml_dtypes.bfloat16).astype(np.float32))


def test_port_without_isolated_mode_is_inconclusive_not_equivalent():
    r = run(mode="isolated", model=FakeModel(CFG, "float32", isolated=False))
    assert r.verdict == "inconclusive" and r.first_divergence is None
    assert r.counts["unavailable"] == r.counts["total"] == 12
    assert any("isolated mode switched off" in n for n in r.notes)


def test_one_sided_taps_are_listed_in_execution_order_not_dropped():
    r = run(port_extra=("port_x",), ref_extra=("ref_y",))
    names = [t.name for t in r.taps]
    assert r.port_only == [f"layers.{i}.port_x" for i in range(3)]
    assert r.reference_only == [f"layers.{i}.ref_y" for i in range(3)]
    assert r.counts == {"total": 18, "pass": 12, "fail": 0, "unavailable": 6,
                        "port_only": 3, "reference_only": 3}
    # the reference emits ref_y after layers.i.mix: it is placed there, not appended at the end
    assert names.index("layers.0.ref_y") == names.index("layers.0.mix") + 1
    assert r.tap("layers.1.ref_y").reason.startswith("reference only")
    assert r.tap("layers.1.port_x").reason.startswith("port only")
    assert r.verdict == "equivalent"
    # one-sided taps further upstream do not hedge: the tap just before the defect passed
    bad = run([Defect("layers.2.mix", 1e-4)], port_extra=("port_x",), ref_extra=("ref_y",))
    assert "the tap before it, layers.2.a, is within budget, so the defect is in this op" \
        in bad.first_divergence.explanation


def test_align_taps():
    order, p_only, r_only = align_taps(["a", "b", "c", "d"], ["pre", "a", "x", "c", "y", "d", "z"])
    # each reference-only tap right after the last shared tap preceding it on the reference side
    assert order == ["pre", "a", "x", "b", "c", "y", "d", "z"]
    assert p_only == ["b"] and r_only == ["pre", "x", "y", "z"]


def test_unavailable_upstream_tap_hedges_the_explanation():
    class Missing(FakeModel):
        def forward(self, ids, mask=None, taps=True):
            out = super().forward(ids, mask, taps)
            del out["layers.1.a"]
            return out

    r = run(model=Missing(CFG, "float32", [Defect("layers.1.mix", 1e-4)]))
    assert r.tap("layers.1.a").verdict == "unavailable" and "port" in r.tap("layers.1.a").reason
    assert r.first_divergence.tap == "layers.1.mix"
    expected = ("the first compared tap to fail, but 1 tap before it was not compared (layers.1.a): the "
                "defect is after layers.0 (within budget) and at or before this op")
    assert expected in r.first_divergence.explanation


def test_taps_only_the_reference_produces_do_not_vouch_for_the_blamed_op():
    """A port exposing fewer taps: the failing tap is the first compared, not proven the culprit."""

    class LogitsAndLastLayer(FakeModel):
        def forward(self, ids, mask=None, taps=True):
            out = super().forward(ids, mask, taps)
            return {k: v for k, v in out.items() if k in ("layers.2", "norm_f", "logits")}

    r = run(model=LogitsAndLastLayer(CFG, "float32", [Defect("layers.0.mix", 1e-3)]))
    fd = r.first_divergence
    assert fd.tap == "layers.2" and "within budget, so the defect is in this op" not in fd.explanation
    assert "9 taps before it were not compared (embed, layers.0.a, layers.0.mix and 6 more)" in fd.explanation
    assert fd.explanation.endswith("the defect is at or before this op")


def test_nan_defect_is_explained_by_its_reason():
    r = run([Defect("layers.1.a", math.nan)])
    assert r.first_divergence.tap == "layers.1.a"
    assert "NaN/Inf" in r.first_divergence.explanation


def test_padded_inputs_and_provenance():
    mask = np.ones(IDS.shape, np.int64)
    mask[1, :5] = 0
    stages = []
    r = run(mask=mask, progress=stages.append, seed=7, budget=3.0)
    assert r.verdict == "equivalent" and r.budget == 3.0 and r.settings["budget"] == 3.0
    assert r.inputs["seed"] == 7 and r.inputs["shape"] == [2, 24] and r.inputs["padded_positions"] == 5
    assert len(r.inputs["ids_sha256"]) == 64
    assert r.port["name"] == "fake" and r.reference["runner"] == "fake" and r.oracle["dtype"] == "float64"
    assert r.settings["matmul_precision"] == "n/a (numpy)"
    assert r.settings["versions"]["numpy"] == np.__version__
    assert stages == ["oracle forward (float64)", "reference forward (float32)", "port forward", "comparing"]


@pytest.mark.parametrize("kw, match", [({"mode": "both"}, "mode: expected"), ({"dtype": "float16"}, "dtype"),
                                       ({"budget": 0}, "budget"), ({"budget": math.inf}, "budget")])
def test_bad_settings_raise_equiv_error(kw, match):
    model, ref = FakeModel(CFG, "float32"), FakeRunner(CFG, "float32")
    with pytest.raises(EquivError, match=match):
        run_layerwise(model, ref, FakeRunner(CFG, "float64"), IDS, None, **kw)
    assert ref.calls == []  # rejected before any forward ran
