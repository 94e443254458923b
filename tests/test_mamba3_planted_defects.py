"""Proof that the verdicts mean something for Mamba-3: every porting bug of the Mamba-3 section of
docs/porting-bugs.md ("M3-N"), planted in the correct port (tests/planted_mamba3_defects.py), is
flagged at its own tap or by the decode check, against the float64 oracle with the family's default
float32 reference (the oracle's float32 run); a planted defect that is harmless on a fixture (a MIMO
defect on a SISO checkpoint, A_floor on a checkpoint whose floor never binds) is not flagged there;
and the correct port raises no alarm on any Mamba-3 fixture (layer-wise in both modes, cached
decode, greedy decode).

Each test prints one `PLANTED` or `NO-FALSE-ALARM` line per finding: defect, fixture, where it
was flagged, measured RMS ratio (run with -s to see the table)."""

from __future__ import annotations

import numpy as np
import pytest

from equiv.check import left_pad
from equiv.compare import compare_tap
from equiv.decode import full_logits, match_greedy
from equiv.fixtures import fixtures_root
from equiv.layerwise import format_ratio, run_layerwise
from equiv.mamba3.port import Mamba3Port
from tests.planted_mamba3_defects import DEFECTS, plant

SISO, ROPE1, MIMO = "mamba3-tiny-siso", "mamba3-tiny-siso-rope1-outnorm", "mamba3-tiny-mimo"
FIXTURES = (SISO, ROPE1, MIMO)
LENGTH = 37  # the main job's layer-wise length for chunk 16 (2 x 16 + 5): crosses two chunk boundaries


class _Memo:
    """A reference runner whose `run` remembers its answers: every planted variant of a fixture is
    compared against the same reference and oracle forwards."""

    def __init__(self, runner):
        self.runner, self.cache = runner, {}

    def run(self, ids, mask=None):
        key = (ids.tobytes(), ids.shape, None if mask is None else mask.tobytes())
        if key not in self.cache:
            self.cache[key] = self.runner.run(ids, mask)
        return self.cache[key]

    def __getattr__(self, name):  # step_logits, generate, provenance, ...
        return getattr(self.runner, name)


@pytest.fixture(scope="module")
def trio():
    """name -> (correct port model, float32 reference, float64 oracle), loaded once per module."""
    from equiv_reference.mamba3.references import oracle

    cache = {}

    def get(name):
        if name not in cache:
            path = fixtures_root() / name
            cache[name] = (Mamba3Port().load(path, "float32"), _Memo(oracle(path, "float32")),
                           _Memo(oracle(path, "float64")))
        return cache[name]

    return get


def _ids(vocab, b=2, l=LENGTH, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (b, l)).astype(np.int32)


def _decode_batch(vocab, new=8, seed=5):
    """The decode checks' left-padded batch: prompts of 1, 2, 3 and 17 tokens (either side of the
    trapezoid's first previous-position term and of the chunk boundary), and the same prompts
    followed by `new` random tokens with its mask, for teacher-forced cached decode. The shapes are
    match_greedy's, so its step_logits reuses the compiled prefill and step."""
    rng = np.random.default_rng(seed)
    prompts, mask = left_pad([rng.integers(1, vocab, n).tolist() for n in (1, 2, 3, 17)], 0)
    seq = np.concatenate([prompts, rng.integers(0, vocab, (prompts.shape[0], new)).astype(np.int32)], axis=1)
    full_mask = np.concatenate([mask, np.ones((mask.shape[0], new), mask.dtype)], axis=1)
    return prompts, mask, seq, full_mask


def _report(defect, fixture, where, ratio):
    shown = ratio if isinstance(ratio, str) else format_ratio(ratio)
    print(f"\nPLANTED | {defect} | {fixture} | {where} | {shown}")


def _overridden(defect: str) -> str:
    return DEFECTS[defect].overrides[0][1]


def _failing_subtaps(result):
    """The failing taps of a result as layer-relative names ('mixer.ssm', ...), with their layers."""
    out = {}
    for t in result.taps:
        if t.verdict == "fail":
            parts = t.name.split(".", 2)
            sub, layer = (parts[2], parts[1]) if len(parts) == 3 else (t.name, "")
            out.setdefault(sub, set()).add(layer)
    return out


def _flagged_at(trio, fixture, planted, tap, mode):
    """run_layerwise on the planted model: divergent, first divergence at `tap`, every tap before it
    passing, the broken function traced; returns the result."""
    base, ref, oracle = trio(fixture)
    defect = planted.defect.name
    r = run_layerwise(planted, ref, oracle, _ids(base.cfg.vocab_size), mode=mode)
    assert planted.traced[_overridden(defect)], f"{defect}: the broken function was never traced"
    fd = r.first_divergence
    assert r.verdict == "divergent" and fd is not None, f"{defect} on {fixture} ({mode}): not flagged"
    assert fd.tap == tap, f"{defect} on {fixture}: first divergence {fd.explanation}, expected {tap}"
    assert all(t.verdict == "pass" for t in r.taps[:fd.index]), fd.explanation
    _report(defect, fixture, f"{mode} {fd.tap}", fd.ratio)
    return r


def _not_flagged(trio, fixture, defect, label):
    base, ref, oracle = trio(fixture)
    planted = plant(base, defect)
    r = run_layerwise(planted, ref, oracle, _ids(base.cfg.vocab_size))
    assert planted.traced[_overridden(defect)], f"{defect}: the broken function was never traced"
    assert r.verdict == "equivalent", r.explanations
    _report(defect, fixture, f"{label} (accumulated, worst tap)", max(t.ratio for t in r.taps))


# ---------------------------------------------------------------------------------------------
# the correct port: no false alarm on any Mamba-3 fixture


@pytest.mark.parametrize("fixture", FIXTURES)
def test_correct_port_raises_no_alarm(trio, fixture):
    """The port through the planting path (fresh jits, no defect) gives the port's own numbers; both
    modes are equivalent with every tap compared; teacher-forced cached decode on the left-padded
    batch of _decode_batch (prompts of 1, 2, 3 and 17 tokens) passes against the oracle's full
    forward; the greedy decode match on that batch passes, any token mismatch a near-tie."""
    base, ref, oracle = trio(fixture)
    correct = plant(base, None)
    ids = _ids(base.cfg.vocab_size)
    got, want = correct.forward(ids), base.forward(ids)
    assert [k for k in want if not np.array_equal(got[k], want[k])] == []
    worst = []
    for mode in ("accumulated", "isolated"):
        r = run_layerwise(correct, ref, oracle, ids, mode=mode)
        assert r.verdict == "equivalent", r.explanations
        assert all(np.isfinite(t.ratio) for t in r.taps)
        worst.append(f"{mode} {max(t.ratio for t in r.taps):.2f}x")
    vocab = base.cfg.vocab_size
    prompts, mask, seq, full_mask = _decode_batch(vocab)
    P = prompts.shape[1]
    want, ref_full = (full_logits(r, seq, full_mask)[:, P - 1:] for r in (oracle, ref))
    cmp = compare_tap("decode.logits", correct.step_logits(seq, full_mask, P), ref_full, want)
    assert cmp.verdict == "pass", cmp.reason
    worst.append(f"step_logits {cmp.ratio:.2f}x")
    res = match_greedy(correct, ref, oracle, prompts, mask, max_new_tokens=seq.shape[1] - P)
    assert res.verdict == "pass" and res.logits.verdict == "pass", res.reason
    assert all(mm.classification == "near-tie" for mm in res.mismatches), res.mismatches
    worst.append(f"greedy {res.reason}, logits {res.logits.ratio:.2f}x")
    print(f"\nNO-FALSE-ALARM | {fixture} | {'; '.join(worst)}")


# ---------------------------------------------------------------------------------------------
# flagged by the layer-wise diff at the op itself, in both modes

AT_THEIR_OP = [  # (defect, fixture, first divergence, sub-taps failing in isolated mode)
    ("trapezoid_euler", SISO, "layers.0.mixer.ssm", {"mixer.ssm"}),
    ("angle_bf16", ROPE1, "layers.0.mixer.angles", {"mixer.angles", "mixer.ssm"}),
    ("angle_off_by_one", SISO, "layers.0.mixer.angles", {"mixer.angles", "mixer.ssm"}),
    ("a_floor_skipped", ROPE1, "layers.0.mixer.A", {"mixer.A"}),
    ("mimo_x_head_rank_swapped", MIMO, "layers.0.mixer.ssm", {"mixer.ssm"}),
    ("mimo_ranks_summed_unweighted", MIMO, "layers.0.mixer.gate", {"mixer.gate"}),
    ("bc_bias_forgotten", MIMO, "layers.0.mixer.B", {"mixer.B", "mixer.C"}),
    ("bc_norm_forgotten", SISO, "layers.0.mixer.B", {"mixer.B", "mixer.C"}),
]


@pytest.mark.parametrize(("defect", "fixture", "tap", "isolated_subtaps"), AT_THEIR_OP,
                         ids=[f"{d}-{f}" for d, f, _, _ in AT_THEIR_OP])
def test_defect_flagged_at_its_op(trio, defect, fixture, tap, isolated_subtaps):
    """Accumulated mode puts the first divergence at the op with every tap before it passing;
    isolated mode fails that op (and, for an angle defect, the SSM that rotates by it), in every
    layer, and no other."""
    planted = plant(trio(fixture)[0], defect)
    _flagged_at(trio, fixture, planted, tap, "accumulated")
    iso = _flagged_at(trio, fixture, planted, tap, "isolated")
    layers = {str(i) for i in range(trio(fixture)[0].cfg.n_layers)}
    assert _failing_subtaps(iso) == {sub: layers for sub in isolated_subtaps}, _failing_subtaps(iso)


@pytest.mark.parametrize(("defect", "fixture", "why"), [
    ("a_floor_skipped", SISO, "A_floor 1e-4 never binds"),
    ("mimo_x_head_rank_swapped", SISO, "no MIMO"),
    ("mimo_ranks_summed_unweighted", ROPE1, "no MIMO"),
])
def test_defect_harmless_where_it_cannot_act(trio, defect, fixture, why):
    """The controls: the planted port is correct on these checkpoints, so the check must pass."""
    _not_flagged(trio, fixture, defect, f"not flagged ({why})")


# ---------------------------------------------------------------------------------------------
# decode only: the step's update, caught by the decode checks


@pytest.mark.parametrize(("defect", "fixture"), [("step_readout_before_update", SISO),
                                                 ("step_kv_not_carried", MIMO)])
def test_step_defect_caught_by_decode_checks(trio, defect, fixture):
    """The prefill is untouched (the layer-wise diff passes); teacher-forced cached decode on the
    left-padded batch of _decode_batch fails against the oracle's full forward after the first
    decoded token (the prefill's own logits pass), where the correct port passes
    (test_correct_port_raises_no_alarm); the greedy decode match on that batch fails."""
    base, ref, oracle = trio(fixture)
    planted = plant(base, defect)
    vocab = base.cfg.vocab_size
    res_lw = run_layerwise(planted, ref, oracle, _ids(vocab))
    assert res_lw.verdict == "equivalent", res_lw.explanations
    prompts, mask, seq, full_mask = _decode_batch(vocab)
    P = prompts.shape[1]
    want, ref_full = (full_logits(r, seq, full_mask)[:, P - 1:] for r in (oracle, ref))
    bad = planted.step_logits(seq, full_mask, P)
    assert planted.traced["ssm_step"]
    first = compare_tap("decode.logits[prefill]", bad[:, :1], ref_full[:, :1], want[:, :1])
    assert first.verdict == "pass", first.reason
    cmp = compare_tap("decode.logits", bad[:, 1:], ref_full[:, 1:], want[:, 1:])
    assert cmp.verdict == "fail", cmp.reason
    _report(defect, f"{fixture} (left-padded 1/2/3/17)", "step_logits on random continuations", cmp.ratio)
    res = match_greedy(planted, ref, oracle, prompts, mask, max_new_tokens=seq.shape[1] - P)
    assert res.verdict == "fail" and res.logits.verdict == "fail", res.reason
    _report(defect, f"{fixture} (left-padded 1/2/3/17)", "match_greedy teacher-forced logits",
            res.logits.ratio)
