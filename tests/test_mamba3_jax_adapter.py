"""mamba3-jax 1.0.1 behind the port protocol (equiv/mamba3/mamba3_jax_adapter.py) on the Mamba-3
fixtures, against the project's numpy oracle (no torch needed).

What is pinned: the taps the adapter records are right (with the package's heavy-tail A swapped for
mamba_ssm 2.3.2.post1's softplus, every tap is within the accumulated budget of the oracle's float32
run), and the finding of docs/findings/mamba3-jax.md as shipped (the first divergence is
`layers.0.mixer.A` on every fixture, every tap before it within budget)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest

from equiv.compare import compare_tap
from equiv.errors import CheckpointError, EquivError
from equiv.mamba3.taps import tap_names
from equiv.ports import LoadedModel, TapUnavailable, check_loaded_model

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mamba3_jax") is None,
                                reason="mamba3-jax is not installed (pip install 'mamba3-jax==1.0.1')")

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ("mamba3-tiny-siso", "mamba3-tiny-siso-rope1-outnorm", "mamba3-tiny-mimo")
BUDGET = 4.5  # equiv/compare.py's accumulated float32 budget


def _fixture(name: str) -> Path:
    return ROOT / "fixtures" / name


def _load(name: str):
    from equiv.mamba3.mamba3_jax_adapter import Mamba3JaxPort

    return Mamba3JaxPort().load(_fixture(name))


def _ratios(model, name: str, ids) -> dict[str, float]:
    from equiv_reference.mamba3.oracle_runner import Mamba3OracleRunner

    got = model.forward(ids)
    o64 = Mamba3OracleRunner(_fixture(name), "float64").run(ids)
    o32 = Mamba3OracleRunner(_fixture(name), "float32").run(ids)
    assert list(got) == list(o64)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in o64.items()}
    return {k: compare_tap(k, got[k], o32[k], o64[k]).ratio for k in got}


@pytest.fixture
def softplus_a(monkeypatch):
    """The package with mamba_ssm 2.3.2.post1's A = -softplus(dd_A) instead of its heavy-tail one."""
    from mamba3_jax import modeling

    jax.clear_caches()  # a trace made before the swap must not be reused
    monkeypatch.setattr(modeling, "heavy_tail_activation", jax.nn.softplus)
    yield
    jax.clear_caches()


@pytest.mark.parametrize("name", FIXTURES)
def test_taps_are_right_when_a_is_mamba_ssms(name, softplus_a):
    model = _load(name)
    ids = np.random.default_rng(0).integers(0, model.vocab_size, (1, 40)).astype(np.int32)
    ratios = _ratios(model, name, ids)
    assert max(ratios.values()) <= BUDGET, {k: v for k, v in ratios.items() if v > BUDGET}


@pytest.mark.parametrize("name", FIXTURES)
def test_as_shipped_it_first_diverges_at_the_decay_rate(name):
    """mamba3-jax 1.0.1 computes A = -(heavy-tail activation)(dd_A) (mamba_ssm's main after #962),
    the fixtures' mamba_ssm 2.3.2.post1 -softplus(dd_A): everything before A is within budget."""
    model = _load(name)
    ids = np.random.default_rng(0).integers(0, model.vocab_size, (1, 40)).astype(np.int32)
    ratios = _ratios(model, name, ids)
    order = list(ratios)
    first = next(k for k in order if ratios[k] > BUDGET)
    assert first == "layers.0.mixer.A" and ratios[first] > 1e4, (first, ratios[first])


def test_protocol_decode_and_generation():
    model = _load("mamba3-tiny-siso")
    assert isinstance(model, LoadedModel)
    check_loaded_model(model, "mamba3-jax", uses=("layer-wise diff", "decode match"))
    assert model.tap_names == tap_names(2) and model.decode_lengths == (2, 16)
    ids = np.random.default_rng(1).integers(0, model.vocab_size, (2, 24)).astype(np.int32)
    full = model.forward(ids, taps=False)["logits"]
    steps = model.step_logits(ids, None, 17)
    assert steps.shape == (2, 8, model.vocab_size)
    np.testing.assert_allclose(steps[:, :-1], full[:, 16:23], atol=1e-4)
    gen = model.generate(ids[:, :5], None, 6)
    assert gen.tokens.shape == (2, 6) and gen.margins.shape == (2, 6) and gen.steps == 6
    seq = np.concatenate([ids[:, :5], gen.tokens], axis=1)
    np.testing.assert_array_equal(gen.tokens, model.forward(seq, taps=False)["logits"][:, 4:10].argmax(-1))
    eos = int(gen.tokens[0, 0])
    stopped = model.generate(ids[:1, :5], None, 6, eos_id=eos)
    assert stopped.steps == 1 and stopped.tokens.tolist() == [[eos]]
    info = model.info().details
    assert info["dtype"] == "float32" and "derived_taps" in info


def test_refusals_are_one_line(tmp_path):
    from equiv.mamba3.mamba3_jax_adapter import Mamba3JaxPort

    model = _load("mamba3-tiny-siso")
    ids = np.ones((1, 6), np.int32)
    with pytest.raises(TapUnavailable, match="no padding mask"):
        model.forward(ids, np.array([[0, 1, 1, 1, 1, 1]]))
    with pytest.raises(TapUnavailable):
        model.forward_isolated(ids, None, {})
    with pytest.raises(EquivError, match="dtype"):
        Mamba3JaxPort().load(_fixture("mamba3-tiny-siso"), "float16")
    with pytest.raises(CheckpointError, match="expected a directory"):
        Mamba3JaxPort().load(tmp_path / "absent")


def test_recording_puts_the_package_back():
    from mamba3_jax import modeling

    before = (modeling.ssd_forward, modeling._ssd_mimo, modeling.cumulative_angles,
              modeling.Mamba3Mixer._preprocess)
    model = _load("mamba3-tiny-siso")
    model.forward(np.ones((1, 5), np.int32))
    assert (modeling.ssd_forward, modeling._ssd_mimo, modeling.cumulative_angles,
            modeling.Mamba3Mixer._preprocess) == before


def test_resolved_as_a_plugin():
    from equiv.ports import resolve_port

    port = resolve_port("equiv.mamba3.mamba3_jax_adapter:Mamba3JaxPort")  # checked like any plug-in
    assert port.load(_fixture("mamba3-tiny-siso")).info().name == "mamba3-jax"
