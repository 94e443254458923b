"""The port protocol v1 (equiv/ports.py): what the harness needs from a loaded model is declared by
the model and validated when it loads, in one line; and the main job runs on any checkpoint
directory, not only bundled fixtures."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from equiv.check import plan_for, run_main_job
from equiv.fixtures import fixture_dir
from equiv.layerwise import run_layerwise
from equiv.ports import PortError, check_loaded_model
from tests.fake_port import FakeConfig, FakeModel, FakeRunner


class Bare:
    """Only a forward: everything else the harness needs is missing."""

    def forward(self, ids, mask=None, taps=True):
        return {}


def test_missing_and_malformed_members_are_named_in_one_line():
    with pytest.raises(PortError) as info:
        check_loaded_model(Bare(), "my_pkg:Port", uses=("layer-wise diff", "decode match"))
    message = str(info.value)
    assert "\n" not in message and "protocol v1" in message
    for member in ("tap_names", "vocab_size", "info", "decode_lengths", "step_logits", "generate"):
        assert f"{member} (" in message, member
    assert "forward (" not in message  # present and callable
    model = FakeModel(FakeConfig(), "float32")
    check_loaded_model(model, "fake")  # the layer-wise members are all there
    model.vocab_size = True  # a bool is not a vocabulary size
    with pytest.raises(PortError, match=r"vocab_size \(an int >= 1"):
        check_loaded_model(model, "fake")


def test_a_model_without_forward_isolated_is_unavailable_in_isolated_mode_not_a_crash():
    cfg = FakeConfig()
    model = FakeModel(cfg, "float32")
    model.forward_isolated = None  # the protocol marks it optional
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 12))
    r = run_layerwise(model, FakeRunner(cfg, "float32"), FakeRunner(cfg, "float64"), ids, None,
                      mode="isolated")
    assert r.verdict == "inconclusive" and any("no forward_isolated" in n for n in r.notes)


def test_the_plan_straddles_every_length_the_port_declares():
    plan = plan_for(fixture_dir("tiny-g1"), 96, (4, 16))
    (prompts, mask), = plan.decode_batches
    assert sorted(mask.sum(axis=1).tolist()) == [3, 4, 5, 15, 16, 17]
    assert plan.layerwise_ids.shape == (2, 37) and plan.layerwise_ids.max() < 96


def test_the_main_job_runs_on_a_checkpoint_directory(tmp_path):
    """Any directory the port and the reference load: layer-wise both modes and the decode match."""
    ck = tmp_path / "my-checkpoint"
    shutil.copytree(fixture_dir("tiny-g1"), ck)
    (ck / "generator.json").unlink()  # not a fixture: no manifest entry, nothing extra
    code = run_main_job(None, tmp_path / "out", checkpoints=[ck], properties=False, allow_not_run=True,
                        progress=lambda _m: None)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    (fx,) = summary["fixtures"]
    assert code == 0 and fx["fixture"] == "my-checkpoint" and fx["verdict"] == "pass"
    assert set(fx["layerwise"]) == {"accumulated", "isolated"}
    assert sum(sum(d["matched_steps"]) for d in fx["decode"]) == 6 * 64
