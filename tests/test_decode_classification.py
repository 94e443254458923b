"""The decode match's mismatch labels on hand-made logits: a near-tie is a rounding-sized flip of a
close call, never a cover for a port far off the oracle."""

from __future__ import annotations

import numpy as np

from equiv.decode import match_greedy
from equiv.ports import GenerateResult

P, T, V = 3, 2, 5


class Runner:
    """Teacher-forced and full-forward logits fixed in advance; generate = their argmax."""

    def __init__(self, logits: np.ndarray):
        self.full = logits  # (1, P + T, V): position j predicts token j + 1

    def generate(self, prompts, mask, max_new_tokens, eos_id=None):
        tokens = np.argmax(self.full[:, P - 1:P - 1 + T], axis=-1).astype(np.int32)
        return GenerateResult(tokens, np.zeros(tokens.shape, np.float32), T)

    def step_logits(self, ids, mask, prompt_len):
        return self.full[:, P - 1:]

    def logits(self, ids, mask=None):
        return self.full


def _oracle() -> np.ndarray:
    """Token 0 wins every step but the first, where tokens 1 and 2 are a close call (1e-4 apart)."""
    base = np.zeros((1, P + T, V))
    base[0, :, 0] = 5.0
    base[0, P - 1, :3] = [0.0, 6.0, 6.0 - 1e-4]
    return base


def _match(port_noise: float):
    oracle = _oracle()
    reference = oracle + 3e-4 * np.random.default_rng(1).standard_normal(oracle.shape)  # float32-ish error
    port = reference + port_noise * np.random.default_rng(2).standard_normal(oracle.shape)
    port[0, P - 1, [1, 2]] = port[0, P - 1, [2, 1]]  # the port takes the other side of the close call
    return match_greedy(Runner(port), Runner(reference), Runner(oracle), np.ones((1, P), np.int32), None, T)


def test_a_correct_port_flipping_a_close_call_is_a_near_tie():
    result = _match(port_noise=1e-5)
    assert result.logits.verdict == "pass"
    (mm,) = result.mismatches
    assert (mm.step, mm.classification, result.verdict) == (0, "near-tie", "pass")


def test_a_port_far_off_is_never_a_near_tie():
    """Its own error (here ~1e3x the reference's) must not widen the bound that excuses it."""
    result = _match(port_noise=0.3)
    assert result.logits.verdict == "fail"
    (mm,) = result.mismatches
    assert mm.classification == "divergence" and result.verdict == "fail"
    assert mm.logit_error_bound < 0.01  # the old bound, 2 x (port + reference error), was ~1


def test_kl_and_top_k_agreement_are_reported_beside_the_budget():
    from equiv.decode import logit_agreement

    ref = np.log(np.array([[0.7, 0.2, 0.05, 0.03, 0.01, 0.01], [0.5, 0.3, 0.1, 0.05, 0.03, 0.02]]))
    same = logit_agreement(ref, ref)
    assert same["kl_max"] < 1e-15 and same["top1_agreement"] == same["top5_agreement"] == 1.0
    swapped = ref[:, [1, 0, 2, 3, 4, 5]]  # row-wise top-1 and top-2 exchanged, same top-5 set
    out = logit_agreement(swapped, ref)
    expected_kl = 0.7 * np.log(0.7 / 0.2) + 0.2 * np.log(0.2 / 0.7)  # the first row's KL(ref || port)
    assert np.isclose(out["kl_max"], expected_kl) and out["top1_agreement"] == 0.0
    assert out["top5_agreement"] == 1.0
    result = _match(port_noise=1e-5)
    assert result.top1_agreement == 0.5 and result.kl_max > 0  # step 0 flipped, step 1 agrees
    assert result.to_dict()["kl_mean"] == result.kl_mean
