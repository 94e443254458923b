"""The Mamba-3 SSM properties (equiv/mamba3/ssm_properties.py): they pass on equiv.mamba3.ssm with the
numpy references, and fail on planted defects of the forms they check, so they are not vacuous.

The planted defects replace entries of equiv.mamba3.ssm_harness.JITTED: the trapezoid's
previous-position term dropped (step and sequential), k and q rotated by the previous position's
angle (step and sequential), lambda and 1 - lambda swapped (chunked and its split prefill).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import Phase, settings

from equiv.mamba3 import ssm as S
from equiv.mamba3 import ssm_harness as H
from equiv.mamba3 import ssm_properties as P
from equiv.mamba3.oracle import ssm as oracle_ssm
from equiv.mamba3.ssm_numpy import NumpySSMReferences, recurrence_careful
from equiv.mamba3.ssm_strategies import Regime, build_instance

REFS = NumpySSMReferences()
RUNNER_EXAMPLES = 2


def test_runner_passes_with_numpy_references():
    result = P.run_ssm_properties(REFS, RUNNER_EXAMPLES, progress=None)
    json.dumps(result)  # the main job writes it into its report
    assert result["verdict"] == "pass", result["detail"]
    assert result["properties_run"] == result["properties_passed"] == len(P.PROPERTIES)
    assert result["references"]["variants"] == ["recurrence", "careful"]
    for row in result["properties"]:
        if row["budget"] == P.EXACT:
            assert row["worst_ratio"] is None
        else:
            assert 0 < row["worst_ratio"] <= H.BUDGET and 0 < row["worst_max_ratio"] <= H.MAX_GUARD, row


def test_careful_reference_is_a_float32_run_of_the_recurrence():
    """recurrence_careful errs like float32 (far below the float32 cutoff of equiv.compare, far above
    0) and keeps the angle unwrapped, as the oracle does."""
    inst = build_instance("C-long", Regime(seed=11, log10_dt=0.5, log10_decay=1.5, log10_floor=0.5,
                                           floored=1.0, log10_angle=1.0, log10_x_scale=2.0))
    kw = inst.kwargs()
    truth, careful = oracle_ssm(**kw, dtype=np.float64), recurrence_careful(**kw)
    assert careful[0].dtype == np.float32
    for got, want in zip(H.outputs(careful), H.outputs(truth)):
        rel = np.sqrt(np.mean((got - want) ** 2) / np.mean(want**2))
        assert 0 < rel < 1e-4
    assert np.abs(truth[2]).max() > 100  # unwrapped: many turns


def test_pool_is_the_quadratic_mean_of_the_deviations():
    inst = build_instance("A-siso", Regime(seed=3, log10_dt=0.0, log10_decay=0.0, log10_floor=0.0,
                                           floored=0.0, log10_angle=0.0, log10_x_scale=0.0))
    kw = inst.kwargs()
    truth = REFS.oracle(kw)
    runs = H.reference_runs(REFS, "sequential", kw)
    pooled = H.outputs(H.pool(runs, truth))
    for i, want in enumerate(H.outputs(truth)):
        dev = [np.asarray(H.outputs(r)[i], np.float64) - want for r in runs]
        np.testing.assert_allclose(pooled[i] - want, np.sqrt((dev[0] ** 2 + dev[1] ** 2) / 2), rtol=1e-9,
                                   atol=1e-12 * np.abs(want).max())
    assert H.pool(runs[:1], truth) is runs[0]


def test_tanh_is_nearly_correctly_rounded():
    x = np.random.default_rng(0).uniform(-12, 12, 100_000).astype(np.float32)
    x[:4] = (0.0, -0.0, 0.625, 1e-30)
    exact = np.tanh(x.astype(np.float64))
    ulps = np.abs(np.asarray(jax.jit(S.tanh)(x), np.float64) - exact) / np.spacing(
        np.abs(exact).astype(np.float32)).astype(np.float64)
    assert ulps.max() <= 1.5 and ulps.mean() <= 0.3


# ---------------------------------------------------------------------------------------------
# planted defects


def _prev_term_dropped(state, x, dt, A, trap, B, C, angle, D, mimo_x=None, *, pairwise=True):
    """H_t without beta_t x_{t-1} k_{t-1}^T: the remembered x zeroed before the update."""
    y, new = S.ssm_step(state._replace(v=jnp.zeros_like(state.v)), x, dt, A, trap, B, C, angle, D, mimo_x,
                        pairwise=pairwise)
    return y, new


def _previous_angle(state, x, dt, A, trap, B, C, angle, D, mimo_x=None, *, pairwise=True):
    """k_t and q_t rotated by theta_{t-1}; theta itself still advances."""
    y, new = S.ssm_step(state, x, dt, A, trap, B, C, jnp.zeros_like(angle), D, mimo_x, pairwise=pairwise)
    inc = S.angle_increments(angle, dt)
    theta, lo = S._add2((state.angle, state.angle_lo), (inc, jnp.zeros_like(inc)))
    return y, new._replace(angle=theta, angle_lo=lo)


def _sequential_of(step):
    def forward(x, dt, A, trap, B, C, angle, D, mimo_x=None, state=None, *, mode, chunk=64, pairwise=True):
        del mode, chunk
        b, _, h, p = x.shape
        st = state if state is not None else S.zero_state(b, h, p, B.shape[-1], angle.shape[-1], B.shape[2],
                                                          x.dtype)

        def body(carry, inputs):
            y, new = step(carry, *inputs, D, mimo_x, pairwise=pairwise)
            return new, (y, new.angle)

        seq = tuple(jnp.moveaxis(v, 1, 0) for v in (x, dt, A, trap, B, C, angle))
        final, (ys, thetas) = jax.lax.scan(body, st, seq)
        return jnp.moveaxis(ys, 0, 1), final, jnp.moveaxis(thetas, 0, 1)

    return forward


def _trap_swapped(x, dt, A, trap, B, C, angle, D, mimo_x=None, state=None, *, mode, chunk=64, pairwise=True):
    return S.ssm_forward(x, dt, A, 1.0 - trap, B, C, angle, D, mimo_x, state, mode=mode, chunk=chunk,
                         pairwise=pairwise)


def _plant(monkeypatch, step):
    monkeypatch.setitem(H.JITTED, "step", jax.jit(step, static_argnames=("pairwise",)))
    monkeypatch.setitem(H.JITTED, "sequential", H.jit_form(_sequential_of(step), "sequential"))


def _fails(name: str, examples: int = 3) -> str:
    """The property's explicit corners and `examples` drawn ones, unshrunk: the first failure's message."""
    quick = settings(P.runner_settings(examples), phases=(Phase.explicit, Phase.generate))
    with H.strict_jax(), pytest.raises(AssertionError) as info:
        P.hypothesis_test(P.PROPERTIES_BY_NAME[name], REFS, quick)()
    return str(info.value)


@pytest.mark.parametrize("step", [_prev_term_dropped, _previous_angle],
                         ids=["prev_term_dropped", "previous_angle"])
def test_planted_step_defects_fail(monkeypatch, step):
    _plant(monkeypatch, step)
    for name in ("sequential_matches_oracle", "step_by_step_matches_oracle"):
        assert "the reference's own float error" in _fails(name)


def test_planted_chunked_defect_fails(monkeypatch):
    monkeypatch.setitem(H.JITTED, "chunked", H.jit_form(_trap_swapped, "chunked"))
    assert "chunked(chunk=" in _fails("chunked_matches_oracle")
    assert "chunked split at" in _fails("split_prefill_matches_oracle")

