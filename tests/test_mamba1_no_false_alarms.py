"""The other half of tests/test_mamba1_planted_defects.py: the correct Mamba-1 / Falcon-Mamba port (its
real jitted entry points) raises no alarm, at the harness's default budgets (equiv/compare.py), on
every Mamba-1 fixture: run_layerwise in both modes passes every tap for several seeds of random ids
(float32) and on a left-padded batch (float32, and bfloat16: the dtype of the residual check); and
the main job's greedy decode match on its left-padded batch (equiv/check.py plan_for: prompts
straddling the conv width, or a trained checkpoint's recorded prompts; 64 new tokens) passes.

Each test prints its worst ratios (run with -s): the margin the correct port actually has below the
budget and the max-error guard."""

from __future__ import annotations

import math

import numpy as np
import pytest

from equiv.check import left_pad, plan_for
from equiv.decode import match_greedy
from equiv.fixtures import fixtures_root
from equiv.layerwise import run_layerwise
from equiv.mamba1.port import Mamba1Port
from tests.planted_mamba1_defects import fixture_path

FIXTURES = ["mamba1-tiny-oddrank", "mamba1-tiny-untied-bias", "mamba1-tiny-noconvbias", "falcon-mamba-tiny"]
FIXTURES += [n for n in ("mamba1-trained-bytes",) if (fixtures_root() / n / "config.json").is_file()]
SEEDS = range(3)
LENGTH = 29  # seven conv widths and more: the carried state matters


class _Memo:
    """A reference runner whose `run` remembers its answers: both modes compare against the same
    reference and oracle forwards, so each is computed once per input."""

    def __init__(self, runner):
        self.runner, self.cache = runner, {}

    def run(self, ids, mask=None):
        key = (ids.tobytes(), ids.shape, None if mask is None else mask.tobytes())
        if key not in self.cache:
            self.cache[key] = self.runner.run(ids, mask)
        return self.cache[key]

    def __getattr__(self, name):  # step_logits, generate, provenance, ...
        return getattr(self.runner, name)


@pytest.fixture(scope="module", params=FIXTURES)
def trio(request):
    """(name, dtype -> (port model, reference, float64 oracle)), each dtype loaded once per module."""
    from equiv.references import load_reference

    path, cache = fixture_path(request.param), {}

    def get(dtype="float32"):
        if dtype not in cache:
            cache[dtype] = (Mamba1Port().load(path, dtype),
                            _Memo(load_reference("transformers", path, dtype, threads=1)),
                            _Memo(load_reference("transformers", path, "float64", threads=1)))
        return cache[dtype]

    return request.param, get


def _check_all(name, label, runs, n_taps):
    """Every run equivalent with every tap compared; prints the worst RMS and max-error ratios."""
    failures, worst, worst_max = [], (0.0, "", ""), (0.0, "", "")
    for key, r in runs:
        if r.verdict != "equivalent":
            fd = r.first_divergence
            failures.append(f"{key}: {r.verdict}, {fd.explanation if fd else r.explanations}")
        compared = [t for t in r.taps if math.isfinite(t.ratio)]
        assert len(compared) == n_taps, [t.name for t in r.taps if not math.isfinite(t.ratio)]
        worst = max(worst, *((t.ratio, t.name, key) for t in compared))
        worst_max = max(worst_max, *((t.ratio_max, t.name, key) for t in compared))
    print(f"\nNO-FALSE-ALARM | {name} | {label} | max RMS ratio {worst[0]:.2f}x ({worst[1]}, {worst[2]}) | "
          f"max max-error ratio {worst_max[0]:.2f}x ({worst_max[1]}, {worst_max[2]}) | "
          f"budgets {sorted({r.budget for _, r in runs})}")
    assert not failures, failures
    assert worst[0] > 0.0  # a measurement, not a constant


@pytest.mark.parametrize("mode", ["accumulated", "isolated"])
def test_correct_port_passes_layerwise_on_every_seed(trio, mode):
    name, get = trio
    port, ref, oracle = get()
    runs = []
    for seed in SEEDS:
        ids = np.random.default_rng(seed).integers(0, port.cfg.vocab_size, (2, LENGTH)).astype(np.int32)
        runs.append((f"seed {seed}", run_layerwise(port, ref, oracle, ids, mode=mode, seed=seed)))
    _check_all(name, f"float32 {mode}, {len(SEEDS)} seeds", runs, len(port.tap_names))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_correct_port_passes_layerwise_on_a_left_padded_batch(trio, dtype):
    """Both modes on one left-padded batch (rows of 29, 11 and 3 tokens)."""
    name, get = trio
    port, ref, oracle = get(dtype)
    rng = np.random.default_rng(11)
    ids, mask = left_pad([rng.integers(1, port.cfg.vocab_size, n).tolist() for n in (LENGTH, 11, 3)], 0)
    runs = [(f"padded, {mode}", run_layerwise(port, ref, oracle, ids, mask, mode=mode, dtype=dtype))
            for mode in ("accumulated", "isolated")]
    _check_all(name, f"{dtype} left-padded batch, both modes", runs, len(port.tap_names))


def test_correct_port_greedy_decode_matches(trio):
    """The main job's decode match for this checkpoint, at its defaults, on its left-padded batch
    (for a trained checkpoint the main job also decodes each prompt alone; the batch holds them all,
    and alone they would cost a minute here)."""
    name, get = trio
    port, ref, oracle = get()
    plan = plan_for(fixture_path(name), port.vocab_size, port.decode_lengths)
    for prompts, mask in plan.decode_batches[-1:]:
        assert mask is not None
        res = match_greedy(port, ref, oracle, prompts, mask, plan.max_new_tokens, plan.eos_id)
        assert res.verdict == "pass", res.reason
        assert res.logits.verdict == "pass", res.logits.reason
        assert res.reference_consistency.verdict == "pass", res.reference_consistency.reason
        assert all(mm.classification == "near-tie" for mm in res.mismatches), res.mismatches
        print(f"\nNO-FALSE-ALARM | {name} | greedy decode left-padded, prompts of {res.prompt_lengths} | "
              f"{res.reason} | decode logits ratio {res.logits.ratio:.2f}x")
