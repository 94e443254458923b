"""Proof that the verdicts mean something for Mamba-1 / Falcon-Mamba: every porting bug of the
Mamba-1 section of docs/porting-bugs.md ("M1-N"), planted in the correct port
(tests/planted_mamba1_defects.py), is flagged at the right tap or by the right check, and a planted
defect that is harmless on a fixture (Falcon's norms on a Mamba-1 checkpoint, an unmasked conv
output without any bias, a float32 residual cast in a float32 model) is not flagged there. The
correct port's side of each check is tests/test_mamba1_no_false_alarms.py.

Each test prints one `PLANTED` line per finding: defect, fixture, where it was flagged, measured
RMS ratio (run with -s to see the table)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from equiv.check import left_pad
from equiv.compare import compare_tap
from equiv.decode import full_logits, match_greedy
from equiv.layerwise import format_ratio, run_layerwise
from equiv.mamba1.port import Mamba1Port
from tests.planted_mamba1_defects import DEFECTS, fixture_path, plant

ODD, BIAS, NOCONV, FALCON = ("mamba1-tiny-oddrank", "mamba1-tiny-untied-bias", "mamba1-tiny-noconvbias",
                             "falcon-mamba-tiny")
LENGTH = 13  # the main job's layer-wise length for conv width 4 (2 k + 5)


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
    """(name, dtype) -> (correct port model, reference in dtype, float64 oracle), loaded once per module."""
    from equiv.references import load_reference

    cache = {}

    def get(name, dtype="float32"):
        if (name, dtype) not in cache:
            path = fixture_path(name)
            cache[name, dtype] = (Mamba1Port().load(path, dtype),
                                  _Memo(load_reference("transformers", path, dtype, threads=1)),
                                  _Memo(load_reference("transformers", path, "float64", threads=1)))
        return cache[name, dtype]

    return get


def _ids(vocab, b=2, l=LENGTH, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (b, l)).astype(np.int32)


def _padded(vocab, lengths=(LENGTH, 7, 3), seed=1):
    """A left-padded batch (pad id 0) of random sequences of the given lengths."""
    rng = np.random.default_rng(seed)
    return left_pad([rng.integers(1, vocab, n).tolist() for n in lengths], 0)


def _report(defect, fixture, where, ratio):
    shown = ratio if isinstance(ratio, str) else format_ratio(ratio)
    print(f"\nPLANTED | {defect} | {fixture} | {where} | {shown}")


def _overridden(defect: str) -> str:
    return DEFECTS[defect].overrides[0][1]


def _flagged_at(trio, fixture, defect, tap, mode, ids=None, mask=None, label=None):
    """run_layerwise on the planted model: divergent, first divergence at `tap`, every tap before it
    passing, the broken function traced; returns the result."""
    base, ref, oracle = trio(fixture)
    planted = plant(base, defect)
    ids = _ids(base.cfg.vocab_size) if ids is None else ids
    r = run_layerwise(planted, ref, oracle, ids, mask, mode=mode)
    assert planted.traced[_overridden(defect)], f"{defect}: the broken function was never traced"
    fd = r.first_divergence
    assert r.verdict == "divergent" and fd is not None, f"{defect} on {fixture} ({mode}): not flagged"
    assert fd.tap == tap, f"{defect} on {fixture}: first divergence {fd.explanation}, expected {tap}"
    assert all(t.verdict == "pass" for t in r.taps[:fd.index]), fd.explanation
    _report(defect, label or fixture, f"{mode} {fd.tap}", fd.ratio)
    return r


def _not_flagged(trio, fixture, defect, ids=None, mask=None, dtype="float32", label="not flagged"):
    base, ref, oracle = trio(fixture, dtype)
    planted = plant(base, defect)
    ids = _ids(base.cfg.vocab_size) if ids is None else ids
    r = run_layerwise(planted, ref, oracle, ids, mask, dtype=dtype)
    assert planted.traced[_overridden(defect)], f"{defect}: the broken function was never traced"
    assert r.verdict == "equivalent", r.explanations
    _report(defect, fixture, f"{label} ({dtype} accumulated, worst tap)", max(t.ratio for t in r.taps))
    return r


def _failing_subtaps(result):
    """The failing taps of a result as layer-relative names ('mixer.ssm', ...), with their layers."""
    out = {}
    for t in result.taps:
        if t.verdict == "fail":
            parts = t.name.split(".", 2)
            sub, layer = (parts[2], parts[1]) if len(parts) == 3 else (t.name, "")
            out.setdefault(sub, set()).add(layer)
    return out


def test_planting_path_without_a_defect_is_the_port(trio):
    """Fresh jits of the port's entry points, no defect: the port's own numbers, equivalent by the suite."""
    base, ref, oracle = trio(ODD)
    correct = plant(base, None)
    ids = _ids(base.cfg.vocab_size)
    got, want = correct.forward(ids), base.forward(ids)
    assert [k for k in want if not np.array_equal(got[k], want[k])] == []
    np.testing.assert_array_equal(correct.step_logits(ids, None, 5), base.step_logits(ids, None, 5))
    for mode in ("accumulated", "isolated"):
        r = run_layerwise(correct, ref, oracle, ids, mode=mode)
        assert r.verdict == "equivalent", r.explanations


# ---------------------------------------------------------------------------------------------
# flagged by the layer-wise diff at the op itself, in both modes

SSM = {"mixer.ssm"}
X_PROJ = {"mixer.x_proj.dt", "mixer.x_proj.B", "mixer.x_proj.C"}
AT_THEIR_OP = [  # (defect, fixture, first divergence, sub-taps failing in isolated mode)
    ("dt_bias_twice", BIAS, "layers.0.mixer.ssm", SSM),
    ("dt_bias_twice", FALCON, "layers.0.mixer.ssm", SSM),
    ("x_proj_split_b_c_dt", ODD, "layers.0.mixer.x_proj.dt", X_PROJ),
    ("softplus_missing", NOCONV, "layers.0.mixer.ssm", SSM),
    ("softplus_twice", FALCON, "layers.0.mixer.ssm", SSM),
    ("falcon_bcdt_norms_missing", FALCON, "layers.0.mixer.x_proj.dt", X_PROJ),
    ("d_skip_dropped", ODD, "layers.0.mixer.ssm", SSM),
    ("decay_after_input", FALCON, "layers.0.mixer.ssm", SSM),
]


@pytest.mark.parametrize(("defect", "fixture", "tap", "isolated_subtaps"), AT_THEIR_OP,
                         ids=[f"{d}-{f}" for d, f, _, _ in AT_THEIR_OP])
def test_defect_flagged_at_its_op(trio, defect, fixture, tap, isolated_subtaps):
    """M1-1, M1-2, M1-3, M1-4, M1-6, M1-9, M1-10: accumulated mode puts the first divergence at the
    op with every tap before it passing; isolated mode fails that op, in every layer, and no other."""
    _flagged_at(trio, fixture, defect, tap, "accumulated")
    iso = _flagged_at(trio, fixture, defect, tap, "isolated")
    layers = {str(i) for i in range(trio(fixture)[0].cfg.n_layers)}
    assert _failing_subtaps(iso) == {sub: layers for sub in isolated_subtaps}, _failing_subtaps(iso)


def test_falcon_norms_missing_is_harmless_on_a_mamba1_checkpoint(trio):
    """M1-6's control: without mixer_rms_eps the planted x_proj is the correct one, so the check
    must pass there; it tests the norms and nothing else."""
    _not_flagged(trio, ODD, "falcon_bcdt_norms_missing", label="not flagged (Mamba-1 has no dt/B/C norms)")


# ---------------------------------------------------------------------------------------------
# M1-8: left padding, on a left-padded batch


@pytest.mark.parametrize(("defect", "fixture", "tap"), [
    ("padding_unmasked_before_in_proj", BIAS, "layers.0.mixer.in_proj"),
    ("padding_unmasked_after_conv", FALCON, "layers.0.mixer.conv"),
])
def test_unmasked_left_padding_flagged_on_a_left_padded_batch(trio, defect, fixture, tap):
    """Flagged at the op whose mask is missing, in both modes, on a left-padded batch; the same
    planted port passes without padding."""
    vocab = trio(fixture)[0].cfg.vocab_size
    ids, mask = _padded(vocab)
    label = f"{fixture} (left-padded)"
    _flagged_at(trio, fixture, defect, tap, "accumulated", ids, mask, label)
    iso = _flagged_at(trio, fixture, defect, tap, "isolated", ids, mask, label)
    assert set(_failing_subtaps(iso)) == {tap.split(".", 2)[2]}, _failing_subtaps(iso)
    _not_flagged(trio, fixture, defect, ids=_ids(vocab), label="not flagged without padding")


def test_unmasked_conv_output_is_harmless_without_any_bias(trio):
    """M1-8's control: without a conv bias or an in_proj bias, a padded position's conv output is
    silu(0) = 0 whether masked or not, so the planted port is correct on a padded batch there."""
    ids, mask = _padded(trio(NOCONV)[0].cfg.vocab_size)
    _not_flagged(trio, NOCONV, "padding_unmasked_after_conv", ids, mask,
                 label="not flagged on a left-padded batch (no conv or in_proj bias)")


# ---------------------------------------------------------------------------------------------
# M1-5: decode only, caught by the decode checks on prompts straddling the conv width


@pytest.mark.parametrize("fixture", [ODD, NOCONV])  # conv widths 4 and 3
def test_conv_state_off_by_one_caught_by_decode_checks(trio, fixture):
    """The prefill is untouched (the layer-wise diff passes); teacher-forced cached decode from
    prompts of k-1, k and k+1 tokens fails against the oracle's full forward after the first
    decoded token, where the correct port passes; and the greedy decode match fails on the
    main job's left-padded batch of those prompts."""
    base, ref, oracle = trio(fixture)
    planted = plant(base, "conv_state_off_by_one")
    k, vocab = base.cfg.conv_kernel, base.cfg.vocab_size
    _not_flagged(trio, fixture, "conv_state_off_by_one", label="prefill not flagged")
    rng = np.random.default_rng(3)
    for n in (k - 1, k, k + 1):
        seq = rng.integers(1, vocab, (2, n + 8)).astype(np.int32)
        want = full_logits(oracle, seq, None)[:, n - 1:]
        ref_full = full_logits(ref, seq, None)[:, n - 1:]
        bad, good = planted.step_logits(seq, None, n), base.step_logits(seq, None, n)
        first = compare_tap("decode.logits[prefill]", bad[:, :1], ref_full[:, :1], want[:, :1])
        assert first.verdict == "pass", first.reason  # the prefill's own logits are right
        cmp = compare_tap("decode.logits", bad[:, 1:], ref_full[:, 1:], want[:, 1:])
        control = compare_tap("decode.logits", good[:, 1:], ref_full[:, 1:], want[:, 1:])
        assert control.verdict == "pass", control.reason
        assert cmp.verdict == "fail", cmp.reason
        _report("conv_state_off_by_one", fixture, f"step_logits from a {n}-token prompt (k={k})", cmp.ratio)
    prompts, mask = left_pad([rng.integers(1, vocab, n).tolist() for n in (k - 1, k, k + 1)], 0)
    res = match_greedy(planted, ref, oracle, prompts, mask, max_new_tokens=16)
    assert res.verdict == "fail" and res.logits.verdict == "fail", res.reason
    assert planted.traced["causal_conv"]
    _report("conv_state_off_by_one", f"{fixture} (left-padded {k - 1}/{k}/{k + 1})",
            "match_greedy teacher-forced logits", res.logits.ratio)


# ---------------------------------------------------------------------------------------------
# M1-7: the residual stream's precision, in bfloat16


def _bf16_exact(x) -> float:
    """The fraction of x's values that bfloat16 represents exactly."""
    x = np.asarray(x, np.float32)
    return float(np.mean(x.astype(ml_dtypes.bfloat16).astype(np.float32) == x))


def _residual_precision(port_taps, ref_taps, n_layers, slack=0.25):
    """The residual-stream check: per block output tap, (port's, reference's) fraction of values
    exact in bfloat16, and the taps where the port's exceeds the reference's by more than `slack`.
    Under residual_in_fp32 the reference's block outputs are float32 sums of bfloat16 terms (about a
    third exact in bfloat16 on these fixtures); a stream rounded to bfloat16 is exact everywhere."""
    fractions = {f"layers.{i}": (_bf16_exact(port_taps[f"layers.{i}"]), _bf16_exact(ref_taps[f"layers.{i}"]))
                 for i in range(n_layers)}
    return fractions, [t for t, (p, r) in fractions.items() if p > r + slack]


@pytest.mark.parametrize("fixture", [ODD, FALCON, BIAS])
def test_residual_not_kept_in_float32_caught_by_the_residual_precision_check(trio, fixture):
    """Invisible in float32, where the residual cast is the identity (the planted port's taps equal
    the port's bit for bit). In bfloat16 the error budget cannot see it either on two layers: the
    stream is rounded to bfloat16 once per block, at most half an ULP at its own scale, below the
    4-ULP floor (the ratio is printed). What catches it is the stream's precision: the block
    outputs of a residual_in_fp32 model carry float32 digits, the planted port's are all exact in
    bfloat16. On the untied-bias fixture (residual_in_fp32=False) the planted port is correct."""
    base32 = trio(fixture)[0]
    ids = _ids(base32.cfg.vocab_size)
    planted32 = plant(base32, "residual_not_fp32")
    got, want = planted32.forward(ids), base32.forward(ids)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    assert planted32.traced["block_residual"]

    base, ref, oracle = trio(fixture, "bfloat16")
    planted = plant(base, "residual_not_fp32")
    ref_taps = ref.run(ids)
    n = base.cfg.n_layers
    fractions, bad = _residual_precision(planted.forward(ids), ref_taps, n)
    _, control = _residual_precision(base.forward(ids), ref_taps, n)
    assert not control, (control, fractions)
    assert planted.traced["block_residual"]
    r = run_layerwise(planted, ref, oracle, ids, dtype="bfloat16")
    budget_ratio = f"budget ratio {format_ratio(r.tap('layers.0').ratio)} at layers.0 ({r.verdict})"
    shown = "; ".join(f"{t}: {p:.2f} vs {q:.2f}" for t, (p, q) in fractions.items())
    if not base.cfg.residual_in_fp32:
        assert not bad, fractions
        _report("residual_not_fp32", f"{fixture} bf16", "not flagged (residual_in_fp32=False)",
                f"bf16-exact {shown}; {budget_ratio}")
        return
    assert bad == [f"layers.{i}" for i in range(n)], fractions
    _report("residual_not_fp32", f"{fixture} bf16", "residual precision check at layers.0",
            f"bf16-exact port vs reference {shown}; {budget_ratio}")
