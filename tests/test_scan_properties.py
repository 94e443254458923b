"""The selective-scan properties (equiv/mamba1/scan_properties.py): they pass on equiv.mamba1.scan with
mamba_ssm's torch references and with their numpy counterparts, and each fails on a planted defect
of the form it checks, so none is vacuous.

The planted defects replace the jitted scan or step of equiv.mamba1.scan_harness (JITTED), for one
form or for all: exp(dt A) taken at position t - 1, x where dt x belongs, D dropped, the state carried
in bfloat16, the chunk carry not applied, the initial state ignored, the decay without dt, and C
read at position t + 1.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, settings

from equiv.mamba1 import scan as S
from equiv.mamba1 import scan_harness as H
from equiv.mamba1 import scan_properties as P
from equiv.mamba1.scan_numpy import NumpyScanReferences
from equiv_reference.mamba_ssm_refs import mamba_ssm_installed

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:triton.*")

needs_mamba_ssm = pytest.mark.skipif(not mamba_ssm_installed(), reason="mamba_ssm is not installed")


@functools.cache
def torch_references():
    import torch

    torch.set_num_threads(1)  # tensors far too small for intra-op threads to pay
    from equiv_reference.mamba1.scan_references import TorchScanReferences

    return TorchScanReferences()


# ---------------------------------------------------------------------------------------------
# every property passes with mamba_ssm's torch references (the ci profile's examples)


def _run(name: str) -> None:
    P.hypothesis_test(P.PROPERTIES_BY_NAME[name], torch_references())()


@needs_mamba_ssm
@pytest.mark.needs_mamba_ssm
@pytest.mark.parametrize("name", list(P.PROPERTIES_BY_NAME))
def test_property_passes_with_torch_references(name):
    with H.strict_jax():
        _run(name)


# ---------------------------------------------------------------------------------------------
# the runner, with the numpy references


RUNNER_EXAMPLES = 4


def test_runner_passes_with_numpy_references():
    result = P.run_scan_properties(NumpyScanReferences(), RUNNER_EXAMPLES, progress=None)
    json.dumps(result)  # the main job writes it into its report
    assert result["verdict"] == "pass", result["detail"]
    assert result["properties_run"] == result["properties_passed"] == len(P.PROPERTIES) == 8
    explicit = sum(len(p.examples()) for p in P.PROPERTIES)
    assert result["examples"] == len(P.PROPERTIES) * RUNNER_EXAMPLES + explicit
    assert result["examples_per_property"] == RUNNER_EXAMPLES
    assert [p["name"] for p in result["properties"]] == [p.name for p in P.PROPERTIES]
    assert result["references"]["name"] == "numpy"
    assert result["detail"].startswith(f"8/8 properties, {result['examples']} examples, budget from numpy")
    for row in result["properties"]:
        assert set(row) == {"name", "verdict", "examples", "detail", "budget", "worst_ratio",
                            "worst_max_ratio", "seconds"}
        if row["budget"] == P.EXACT:
            assert row["worst_ratio"] is None
        else:
            assert 0 < row["worst_ratio"] <= H.BUDGET and 0 < row["worst_max_ratio"] <= H.MAX_GUARD, row


def test_runner_passes_with_torch_references():
    pytest.importorskip("torch")
    if not mamba_ssm_installed():
        pytest.skip("mamba_ssm is not installed")
    result = P.run_scan_properties(torch_references(), 2, progress=None)
    assert result["verdict"] == "pass", result["detail"]
    assert result["references"]["name"] == "torch" and "mamba_ssm" in result["references"]


def test_runner_restores_the_jax_configuration():
    with jax.numpy_rank_promotion("allow"), jax.default_matmul_precision("default"):
        P.run_scan_properties(NumpyScanReferences(), 1, progress=None)
        assert jax.config.jax_numpy_rank_promotion == "allow"
        assert jax.config.jax_default_matmul_precision == "default"


def test_default_run_is_deterministic_and_shrinks():
    s = P.runner_settings(P.DEFAULT_EXAMPLES_PER_PROPERTY)
    assert s.derandomize and s.database is None and Phase.shrink in s.phases


# ---------------------------------------------------------------------------------------------
# planted defects


_BF16 = ml_dtypes.bfloat16


def _bf16(a):
    return a.astype(_BF16).astype(jnp.float32)


def _skip(y, x, D):
    return y if D is None else y + D[None, None, :] * x


def decay_at_previous_position(x, dt, A, B, C, D=None, *, mode, chunk=None, initial_state=None):
    """exp(dt_{t-1} A) decays h_{t-1} (dt_t still scales the input: x rescaled by dt_t / dt_{t-1})."""
    dt_prev = jnp.concatenate([dt[:, :1], dt[:, :-1]], axis=1)
    y, h = S.selective_scan(x * (dt / dt_prev), dt_prev, A, B, C, mode=mode, chunk=chunk,
                            initial_state=initial_state)
    return _skip(y, x, D), h


def input_without_dt(x, dt, A, B, C, D=None, *, mode, chunk=None, initial_state=None):
    """x B where (dt x) B belongs."""
    y, h = S.selective_scan(x / dt, dt, A, B, C, mode=mode, chunk=chunk, initial_state=initial_state)
    return _skip(y, x, D), h


def decay_without_dt(x, dt, A, B, C, D=None, *, mode, chunk=None, initial_state=None):
    """exp(A) where exp(dt A) belongs (the input keeps its dt)."""
    y, h = S.selective_scan(x * dt, jnp.ones_like(dt), A, B, C, mode=mode, chunk=chunk,
                            initial_state=initial_state)
    return _skip(y, x, D), h


def D_dropped(x, dt, A, B, C, D=None, *, mode, chunk=None, initial_state=None):
    return S.selective_scan(x, dt, A, B, C, mode=mode, chunk=chunk, initial_state=initial_state)


def initial_state_ignored(x, dt, A, B, C, D=None, *, mode, chunk=None, initial_state=None):
    return S.selective_scan(x, dt, A, B, C, D, mode=mode, chunk=chunk)


def C_from_next_position(x, dt, A, B, C, D=None, *, mode, chunk=None, initial_state=None):
    """y_t read with C_{t+1} (the last position keeps its own): an off-by-one that sees the future."""
    C_next = jnp.concatenate([C[:, 1:], C[:, -1:]], axis=1)
    return S.selective_scan(x, dt, A, B, C_next, D, mode=mode, chunk=chunk, initial_state=initial_state)


def _h0(x, A, initial_state):
    b, _, e = x.shape
    return jnp.zeros((b, e, A.shape[1]), jnp.float32) if initial_state is None else initial_state


def state_in_bfloat16(x, dt, A, B, C, D=None, *, mode, chunk=None, initial_state=None):
    """The state carried in bfloat16: rounded after every step (sequential), the associative scan's
    elements and products in bfloat16 (associative), the carry between chunks rounded (chunked)."""
    h0 = _h0(x, A, initial_state)
    if mode == "sequential":
        def step(h, xs):
            y, h = S.selective_step(h, *xs[:2], A, *xs[2:])
            return _bf16(h), y

        h, ys = jax.lax.scan(step, h0, [jnp.moveaxis(a, 1, 0) for a in (x, dt, B, C)])
        return _skip(jnp.moveaxis(ys, 0, 1), x, D), h
    if mode == "associative":
        decay, inp = S._discretize(x, dt, A, B)
        inp = inp.at[:, 0].add(decay[:, 0] * h0)
        hs = jax.lax.associative_scan(S._combine, (decay.astype(_BF16), inp.astype(_BF16)), axis=1)[1]
        hs = hs.astype(jnp.float32)
        return S._readout(hs, C, x, D), hs[:, -1]
    return _chunk_by_chunk(x, dt, A, B, C, D, chunk, h0, carry=_bf16)


def chunk_carry_dropped(x, dt, A, B, C, D=None, *, mode, chunk=None, initial_state=None):
    """Every chunk after the first starts from a zero state."""
    return _chunk_by_chunk(x, dt, A, B, C, D, chunk, _h0(x, A, initial_state), carry=jnp.zeros_like)


def _chunk_by_chunk(x, dt, A, B, C, D, chunk, h0, carry):
    """The chunked form with `carry` applied to the state passed from chunk to chunk."""
    b, l, e = x.shape
    c = -(-l // chunk)

    def chunks(a):  # b l ... -> c b q ...: padded with dt = 0, which keeps the state
        a = jnp.pad(a, [(0, 0), (0, c * chunk - l)] + [(0, 0)] * (a.ndim - 2))
        return jnp.moveaxis(a.reshape(b, c, chunk, *a.shape[2:]), 1, 0)

    def one_chunk(h, part):
        y, last = S.selective_scan(part[0], part[1], A, part[2], part[3], mode="associative",
                                   initial_state=h)
        return carry(last), (y, last)

    _, (ys, lasts) = jax.lax.scan(one_chunk, h0, [chunks(a) for a in (x, dt, B, C)])
    return _skip(jnp.moveaxis(ys, 0, 1).reshape(b, c * chunk, e)[:, :l], x, D), lasts[-1]


def step_input_without_dt(state, x, dt, A, B, C, D=None):
    y, h = S.selective_step(state, x / dt, dt, A, B, C)
    return y if D is None else y + D[None, :] * x, h


def step_state_in_bfloat16(state, x, dt, A, B, C, D=None):
    y, h = S.selective_step(state, x, dt, A, B, C, D)
    return y, _bf16(h)


def step_D_dropped(state, x, dt, A, B, C, D=None):
    return S.selective_step(state, x, dt, A, B, C)


def step_state_ignored(state, x, dt, A, B, C, D=None):
    return S.selective_step(jnp.zeros_like(state), x, dt, A, B, C, D)


ALL = ("sequential", "associative", "chunked")

# property -> [(defective scan, the forms it replaces) or (defective step, "step")]: each must fail it
PLANTED = {
    "sequential_matches_oracle": [(decay_at_previous_position, ("sequential",)),
                                  (input_without_dt, ("sequential",)), (D_dropped, ("sequential",)),
                                  (state_in_bfloat16, ("sequential",))],
    "associative_matches_oracle": [(decay_at_previous_position, ("associative",)),
                                   (state_in_bfloat16, ("associative",)), (D_dropped, ("associative",))],
    "chunked_matches_oracle": [(chunk_carry_dropped, ("chunked",)), (state_in_bfloat16, ("chunked",)),
                               (decay_at_previous_position, ("chunked",))],
    "step_by_step_matches_oracle": [(step_input_without_dt, "step"), (step_state_in_bfloat16, "step"),
                                    (step_D_dropped, "step")],
    "split_prefill_matches_oracle": [(initial_state_ignored, ALL), (step_state_ignored, "step"),
                                     (chunk_carry_dropped, ("chunked",))],
    "zero_dt_keeps_the_state": [(decay_without_dt, ALL), (D_dropped, ALL), (step_D_dropped, "step")],
    "linearity_in_x": [(input_without_dt, ("associative",)), (state_in_bfloat16, ("associative",))],
    "causality_bit_exact": [(C_from_next_position, ALL)],
}

PLANTED_SETTINGS = settings(max_examples=40, derandomize=True, database=None, deadline=None,
                            phases=(Phase.explicit, Phase.generate), print_blob=False,
                            suppress_health_check=[HealthCheck.too_slow])


@functools.cache
def _jitted(defect, form):
    """One jitted executable per (defect, form), shared by the tests that plant it."""
    return jax.jit(defect) if form == "step" else H.jit_form(defect, form)


def _plant(monkeypatch, defect, forms) -> None:
    for form in ("step",) if forms == "step" else forms:
        monkeypatch.setitem(H.JITTED, form, _jitted(defect, form))


def test_every_property_has_planted_defects():
    assert set(PLANTED) == set(P.PROPERTIES_BY_NAME)


@pytest.mark.parametrize("name, defect, forms", [
    pytest.param(name, defect, forms, id=f"{name}-{defect.__name__}")
    for name, plants in PLANTED.items() for defect, forms in plants])
def test_property_fails_on_a_planted_defect(monkeypatch, name, defect, forms):
    _plant(monkeypatch, defect, forms)
    with H.strict_jax(), pytest.raises(AssertionError):
        P.hypothesis_test(P.PROPERTIES_BY_NAME[name], NumpyScanReferences(), PLANTED_SETTINGS)()


def test_bfloat16_state_defect_is_homogeneous():
    """Rounding to bfloat16 commutes with scaling by 2**k: the planted bf16 state passes the exact
    half of linearity_in_x, so only the budgeted half (additivity against the oracle) catches it."""
    inst = P._corners()[1]
    kw = inst.kwargs()
    fn = jax.jit(state_in_bfloat16, static_argnames=("mode", "chunk"))
    with H.strict_jax():
        y, _ = fn(**kw, mode="associative")
        ys, _ = fn(**{**kw, "x": kw["x"] * 8, "initial_state": kw["initial_state"] * 8}, mode="associative")
    np.testing.assert_array_equal(np.asarray(ys), np.asarray(y) * 8)


def test_runner_reports_a_planted_defect_with_its_example(monkeypatch):
    _plant(monkeypatch, chunk_carry_dropped, ("chunked",))
    result = P.run_scan_properties(NumpyScanReferences(), RUNNER_EXAMPLES, progress=None)
    json.dumps(result)
    rows = {r["name"]: r for r in result["properties"]}
    assert result["verdict"] == "fail"
    assert rows["chunked_matches_oracle"]["verdict"] == "fail"
    assert "falsifying example: " in rows["chunked_matches_oracle"]["detail"]
    assert "build_instance(" in rows["chunked_matches_oracle"]["detail"]
    for untouched in ("sequential_matches_oracle", "step_by_step_matches_oracle"):
        assert rows[untouched]["verdict"] == "pass", rows[untouched]
    assert "chunked_matches_oracle" in result["detail"]
