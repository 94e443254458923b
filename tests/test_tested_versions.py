"""The tested-versions file is the one source of the pins: its shape, the constraints the nox
sessions get from it, and what a report says when a version outside it ran."""

from __future__ import annotations

import re

import numpy as np
import pytest

from equiv import tested_versions as tv
from tests.fake_port import FakeConfig, FakeModel, FakeRunner


def test_every_pin_is_exact_and_transformers_is_the_newest_supported():
    pins = tv.pins()
    for name, version in pins.items():
        assert re.fullmatch(r"\d+(\.\d+)*(\.post\d+)?", version), (name, version)
    supported = tv.supported_transformers()
    assert supported == sorted(supported, key=lambda v: tuple(map(int, v.split(".")))), supported
    assert pins["transformers"] == supported[-1]
    assert {"5.23.0", "5.24.0", "5.25.0"} <= set(supported)  # the range the suite promises
    for verdict_lib in ("torch", "transformers", "mamba-ssm", "jax", "jaxlib", "numpy", "hypothesis"):
        assert verdict_lib in pins, verdict_lib


def test_constraints_pin_a_chosen_transformers_or_leave_it_free():
    five_23 = tv.constraints("5.23.0")
    assert "transformers==5.23.0\n" in five_23 and "torch==2.13.0\n" in five_23
    free = tv.constraints("")
    assert "transformers==" not in free and "kernels==" not in free  # the "newest" leg
    assert "torch==2.13.0\n" in free and "numpy==" in free


@pytest.mark.parametrize(("installed", "expected"), [
    ({"transformers": "5.24.0", "torch": "2.13.0+cpu"}, []),  # a local build tag is the same release
    ({"transformers": "5.26.0"}, ["transformers 5.26.0 (tested: 5.23.0 to 5.25.0)"]),
    ({"jax": "0.11.0", "numpy": None}, ["jax 0.11.0 (tested: 0.10.2)"]),  # not installed: not listed
    ({"some-other-package": "1.0"}, []),
])
def test_untested_names_each_version_outside_the_set(installed, expected):
    assert tv.untested(installed) == expected


def test_a_report_notes_a_version_outside_the_tested_set(monkeypatch):
    from equiv.layerwise import run_layerwise

    cfg = FakeConfig()
    ids = np.zeros((1, 8), np.int32)

    def run():
        return run_layerwise(FakeModel(cfg, "float32"), FakeRunner(cfg, "float32"),
                             FakeRunner(cfg, "float64"), ids, None)

    result = run()
    assert result.settings["untested_versions"] == [] and not any("outside" in n for n in result.notes)
    monkeypatch.setattr(tv, "installed_versions", lambda: {"python": "3.11", "transformers": "5.26.0"})
    result = run()
    assert result.settings["untested_versions"] == ["transformers 5.26.0 (tested: 5.23.0 to 5.25.0)"]
    assert any(n.startswith("outside the tested versions: transformers 5.26.0") for n in result.notes)


def test_a_report_gives_the_reason_of_the_budget_it_applied():
    from equiv.compare import tolerance
    from equiv.layerwise import run_layerwise

    cfg = FakeConfig()
    ids = np.zeros((1, 8), np.int32)
    for mode, key in (("accumulated", "error_budget_accumulated"), ("isolated", "error_budget")):
        r = run_layerwise(FakeModel(cfg, "float32"), FakeRunner(cfg, "float32"), FakeRunner(cfg, "float64"),
                          ids, None, mode=mode)
        assert r.budget == tolerance("float32", key).budget
        assert r.settings["budget_reason"] == tolerance("float32", key).reason
    r = run_layerwise(FakeModel(cfg, "float32"), FakeRunner(cfg, "float32"), FakeRunner(cfg, "float64"),
                      ids, None, budget=3.0)
    assert r.settings["budget_reason"].startswith("given with --budget (this mode's default is 4.5")
    guard = tolerance("float32", "max_error_guard_accumulated").budget
    assert r.settings["max_error_guard"] == guard * 3.0 / 4.5
