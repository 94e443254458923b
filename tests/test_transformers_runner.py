"""The transformers reference runner (equiv_reference/mamba2/transformers_runner.py) on the tiny
fixtures: taps
and their shapes, the derived conv tap against a hand-computed conv, float64 vs float32, the float64
cast lift, the reference's own cache against its full forward (docs/porting-bugs.md #4, #5), left padding
in generate, eos handling, and that the torch fallback ran even with mamba_ssm installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pytest
import transformers
from packaging.version import Version

from equiv.errors import EquivError, TokenRangeError
from equiv.fixtures import fixture_dir
from equiv.mamba2.taps import tap_names

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runners():
    """{(fixture, dtype): runner}, built on demand and shared by the module's tests."""
    from equiv.references import load_reference

    cache = {}

    def get(fixture, dtype="float32"):
        if (fixture, dtype) not in cache:
            cache[(fixture, dtype)] = load_reference("transformers", fixture_dir(fixture), dtype)
        return cache[(fixture, dtype)]

    return get


def _ids(b, l, seed=0, vocab=96):
    return np.random.default_rng(seed).integers(3, vocab, (b, l)).astype(np.int32)


def _left_pad(seqs, width):
    ids, mask = np.zeros((len(seqs), width), np.int32), np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):], mask[i, width - len(s):] = s, 1
    return ids, mask


def _rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def test_taps_have_the_documented_shapes_and_dtypes(runners):
    b, l, d, e, g, n, h, v = 2, 21, 64, 128, 2, 16, 8, 96
    want = {"embed": d, "norm": d, "mixer.in_proj": 2 * e + 2 * g * n + h, "mixer.conv": e + 2 * g * n,
            "mixer.ssm": e, "mixer.gated_norm": e, "mixer.out_proj": d, "block": d, "norm_f": d, "logits": v}
    for dtype, np_dtype in (("float32", np.float32), ("float64", np.float64), ("bfloat16", np.float32)):
        taps = runners("tiny-g2", dtype).run(_ids(b, l))
        assert list(taps) == tap_names(2)
        for name, arr in taps.items():
            key = (name.split(".", 2)[2] if name.count(".") >= 2
                   else "block" if name.startswith("layers.") else name)
            assert arr.shape == (b, l, want[key]), (dtype, name, arr.shape)
            assert arr.dtype == np_dtype, (dtype, name, arr.dtype)
            assert np.isfinite(arr).all(), (dtype, name)


def _silu(x):
    return x / (1.0 + np.exp(-x))


def test_derived_conv_tap_equals_a_hand_computed_causal_conv(runners):
    """Left-padded input on the use_bias fixture: padded positions have a non-zero in_proj output (its
    bias), so both the causal window and the mask after the conv matter."""
    r = runners("tiny-dtlimit-bias", "float64")
    ids, mask = _left_pad([_ids(1, 9, seed=1)[0], _ids(1, 20, seed=2)[0]], 20)
    taps = r.run(ids, mask)
    e, conv_dim, k = 128, 128 + 2 * 2 * 16, 4
    for i in range(2):
        conv1d = r.model.backbone.layers[i].mixer.conv1d
        w = conv1d.weight.detach().double().numpy()[:, 0, :]  # c k
        bias = conv1d.bias.detach().double().numpy()
        xbc = taps[f"layers.{i}.mixer.in_proj"][..., e:e + conv_dim]  # b l c
        padded = np.concatenate([np.zeros((2, k - 1, conv_dim)), xbc], axis=1)
        hand = sum(padded[:, j:j + 20] * w[:, j] for j in range(k)) + bias
        hand = _silu(hand) * mask[..., None]
        np.testing.assert_allclose(taps[f"layers.{i}.mixer.conv"], hand, rtol=1e-12, atol=1e-12)
        assert np.abs(taps[f"layers.{i}.mixer.in_proj"][0, :11]).max() > 0.1  # padding is not zero before
        assert (taps[f"layers.{i}.mixer.conv"][0, :11] == 0).all()  # and is after the mask


def test_float64_and_float32_runs_agree(runners):
    ids = _ids(2, 37)
    t32, t64 = runners("tiny-g2", "float32").run(ids), runners("tiny-g2", "float64").run(ids)
    errs = {name: _rel(t32[name], t64[name]) for name in t64}
    assert max(errs.values()) < 1e-5, errs
    assert max(errs.values()) > 0  # they are different computations


def test_float64_run_is_float64_inside(runners):
    """transformers casts to float32 inside norms, the SSD, A and the logits; the oracle lifts those
    casts. Checked on the block norm (float64 RMSNorm by hand) and in provenance."""
    from equiv_reference.mamba2.transformers_runner import TransformersRunner

    ids = _ids(2, 37)
    lifted = runners("tiny-g2", "float64")
    literal = TransformersRunner(fixture_dir("tiny-g2"), "float64", lift_float32_casts=False)
    x = lifted.run(ids)["embed"]
    w = lifted.model.backbone.layers[0].norm.weight.detach().double().numpy()
    hand = w * x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5)
    assert _rel(lifted.run(ids)["layers.0.norm"], hand) < 1e-14
    assert _rel(literal.run(ids)["layers.0.norm"], hand) > 1e-9  # literal float64 carries float32 rounding
    assert _rel(literal.run(ids)["layers.0.mixer.ssm"], lifted.run(ids)["layers.0.mixer.ssm"]) > 1e-9
    sites = lifted.provenance()["float64_lift"]["lifted_casts"]
    assert any(s.startswith("mamba2_chunk_scan:") for s in sites), sites
    assert literal.provenance()["float64_lift"] == {"active": False, "lifted_casts": {}}


def test_step_logits_equal_the_full_forward_across_chunk_boundaries(runners):
    """The reference's own cache (docs/porting-bugs.md #5): prefill + one-token steps == full forward,
    float64, at prompt lengths straddling chunk_size 16 (prefill through the chunked scan with a carried
    state)."""
    r = runners("tiny-g2", "float64")
    ids = _ids(2, 2 * 16 + 3, seed=3)
    full = r.run(ids)["logits"]
    for prompt_len in (1, 15, 16, 17, 33):
        steps = r.step_logits(ids, None, prompt_len)
        assert steps.shape == (2, ids.shape[1] - prompt_len + 1, 96)
        assert _rel(steps, full[:, prompt_len - 1:]) < 1e-12, prompt_len


def test_reference_cached_decode_ignores_time_step_limit(runners, monkeypatch):
    """Porting bug #4 (docs/porting-bugs.md) in the reference itself: transformers 5.23 calls
    `mamba2_selective_state_update` (one decode step) without dt_limit and its torch body has no
    clamp, so with an active clamp the cached decode != the full forward. Pinned, with the cause
    shown: clamping dt in that one function makes them agree to rounding."""
    import torch.nn.functional as F

    from equiv_reference.mamba2.transformers_runner import TransformersRunner

    r = TransformersRunner(fixture_dir("tiny-dtlimit-bias"), "float64")
    ids = _ids(2, 2 * 16 + 3, seed=3)
    full = r.run(ids)["logits"]
    steps = r.step_logits(ids, None, 16)
    assert _rel(steps[:, :1], full[:, 15:16]) < 1e-12  # the prefill clamps
    assert _rel(steps[:, 1:], full[:, 16:]) > 1e-2  # every decode step does not
    assert "time_step_limit" in r.provenance()["known_reference_defects"][0]

    lo, hi = r.config.time_step_limit
    torch_body = r.recorder.torch_body

    def with_clamp(name):
        body = torch_body(name)
        if name != "mamba2_selective_state_update":
            return body

        def clamped(state, x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, **kw):
            dt = torch.clamp(F.softplus(dt + dt_bias), lo, hi)
            return body(state, x, dt, A, B, C, D, dt_bias=None, dt_softplus=False, **kw)

        return clamped

    monkeypatch.setattr(r.recorder, "torch_body", with_clamp)
    assert _rel(r.step_logits(ids, None, 16), full[:, 15:]) < 1e-12


def test_step_logits_with_a_left_padded_prompt(runners):
    r = runners("tiny-g2", "float64")
    ids, mask = _left_pad([_ids(1, 10, seed=4)[0], _ids(1, 18, seed=5)[0]], 18)
    ids = np.concatenate([ids, _ids(2, 6, seed=6)], axis=1)
    mask = np.concatenate([mask, np.ones((2, 6), np.int32)], axis=1)
    full = r.run(ids, mask)["logits"]
    assert _rel(r.step_logits(ids, mask, 18), full[:, 17:]) < 1e-12


def test_generate_on_a_left_padded_batch_equals_each_sequence_alone(runners):
    r = runners("tiny-g2", "float32")
    seqs = [_ids(1, n, seed=10 + n)[0] for n in (7, 15, 17)]
    ids, mask = _left_pad(seqs, 17)
    batch = r.generate(ids, mask, 12)
    assert batch.tokens.shape == (3, 12) and batch.steps == 12
    for i, s in enumerate(seqs):
        alone = r.generate(s[None], None, 12)
        np.testing.assert_array_equal(batch.tokens[i], alone.tokens[0])
        np.testing.assert_allclose(batch.margins[i], alone.margins[0], rtol=0, atol=1e-4)
    assert np.median(batch.margins) > 0.5  # the fixture's greedy decodes are not near-ties


def test_left_padding_leaks_the_in_proj_bias_into_the_conv(runners):
    """transformers masks in_proj's *input*, so with use_bias=True a padded position's in_proj output
    is the bias, and the causal conv of the first k-1 real tokens sees it: a left-padded row is NOT
    the sequence alone. Pinned here because the port must mirror it (it is the reference)."""
    r = runners("tiny-dtlimit-bias", "float64")
    seq = _ids(1, 9, seed=7)
    ids, mask = _left_pad([seq[0]], 14)
    padded, alone = r.run(ids, mask), r.run(seq)
    np.testing.assert_allclose(padded["layers.0.mixer.in_proj"][:, 5:], alone["layers.0.mixer.in_proj"],
                               rtol=0, atol=1e-13)
    conv_diff = np.abs(padded["layers.0.mixer.conv"][0, 5:] - alone["layers.0.mixer.conv"][0]).max(-1)
    assert (conv_diff[:3] > 1e-3).all() and (conv_diff[3:] < 1e-13).all(), conv_diff


def test_generate_stops_rows_at_eos(runners):
    r = runners("tiny-g2", "float32")
    prompts = _ids(2, 6, seed=8)
    free = r.generate(prompts, None, 6)
    eos = int(free.tokens[0, 0])
    assert eos not in free.tokens[1].tolist()  # else row 1 would stop too; seed chosen so it does not
    out = r.generate(prompts, None, 6, eos_id=eos)
    assert out.tokens[0, 0] == eos and (out.tokens[0, 1:] == r.pad_id).all()
    assert np.isnan(out.margins[0, 1:]).all() and not np.isnan(out.margins[0, 0])
    np.testing.assert_array_equal(out.tokens[1], free.tokens[1])


def test_generate_ignores_the_checkpoints_own_eos_unless_asked(runners):
    """The fixtures' config says eos_token_id=2; only the eos_id a caller passes may stop a row."""
    r = runners("tiny-untied", "float32")
    out = r.generate(_ids(16, 8), None, 20)
    rows = [i for i in range(16) if 2 in out.tokens[i, :-1].tolist()]
    assert rows, "seed chosen so some row emits token 2"
    for i in rows:
        after = out.tokens[i, out.tokens[i].tolist().index(2) + 1:]
        assert (after != r.pad_id).any() and not np.isnan(out.margins[i]).any()


def test_bad_inputs_raise_equiv_errors(runners, tmp_path):
    from equiv.references import ReferenceUnavailable, load_reference
    from equiv_reference.mamba2.transformers_runner import ReferenceError, TransformersRunner

    r = runners("tiny-g2", "float32")
    with pytest.raises(TokenRangeError, match=r"\[0, 96\)"):
        r.run(np.full((1, 4), 96, np.int32))
    with pytest.raises(ReferenceError, match="prompt_len"):
        r.step_logits(_ids(1, 4), None, 0)
    with pytest.raises(EquivError, match="float16"):
        load_reference("transformers", fixture_dir("tiny-g2"), "float16")
    with pytest.raises(ReferenceError, match="float16"):
        TransformersRunner(fixture_dir("tiny-g2"), "float16")
    with pytest.raises(EquivError, match="expected a config.json, got nothing: the file does not exist"):
        load_reference("transformers", tmp_path, "float32")
    with pytest.raises(ReferenceError, match="config.json"):
        TransformersRunner(tmp_path, "float32")
    with pytest.raises(ReferenceUnavailable, match="expected one of"):
        load_reference("jax", fixture_dir("tiny-g2"))
    if not torch.cuda.is_available():
        with pytest.raises(ReferenceUnavailable, match="needs a CUDA GPU"):
            load_reference("mamba_ssm", fixture_dir("tiny-g2"))
    assert issubclass(ReferenceError, EquivError)


_KERNEL_SCENARIOS = r"""
import json, sys, types, importlib
import numpy as np
from equiv.references import load_reference
fixture, out = sys.argv[1], {}
ids = np.arange(3, 23, dtype=np.int32)[None]
# 1. the runner imports transformers' Mamba-2 first, with whatever mamba_ssm is installed
r = load_reference("transformers", fixture, "float32")
r.run(ids); r.step_logits(ids, None, 10)
out["installed"] = r.provenance()
# 2. the hazard: a mamba_ssm importable when modeling_mamba2 is (re)imported binds its "kernel"
fake = types.ModuleType("mamba_ssm")
def mamba_chunk_scan_combined(*a, **k):
    raise RuntimeError("fake mamba_ssm kernel ran")
fake.mamba_chunk_scan_combined = mamba_chunk_scan_combined
sys.modules["mamba_ssm"] = fake
mm = importlib.reload(sys.modules["transformers.models.mamba2.modeling_mamba2"])
del sys.modules["mamba_ssm"]
try:
    r.model(input_ids=__import__("torch").from_numpy(ids.astype(np.int64)))
    out["direct"] = "no error"
except RuntimeError as e:
    out["direct"] = str(e)
r2 = load_reference("transformers", fixture, "float32")
out["bypassed_logits_equal"] = bool((r2.run(ids)["logits"] == r.run(ids)["logits"]).all())
out["bound"] = r2.provenance()
print(json.dumps(out))
"""


def test_torch_fallback_runs_with_mamba_ssm_installed_and_with_a_kernel_bound():
    """Fresh interpreters (the binding happens once per process, at first import)."""
    proc = subprocess.run([sys.executable, "-c", _KERNEL_SCENARIOS, str(fixture_dir("tiny-g1"))],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    installed = out["installed"]
    try:
        version("mamba_ssm")
        assert installed["kernel_control"]["kernel_packages_installed"]["mamba_ssm"] is True
    except PackageNotFoundError:
        pass
    paths = installed["code_paths"]
    assert installed["path"] == "torch fallback"
    for key in ("chunk_scan", "conv", "conv_update", "state_update"):
        assert paths[key]["ran"] == "torch fallback" and paths[key]["calls"] > 0, paths[key]
        assert paths[key]["bound_at_import"] == "torch fallback"
    assert paths["fused_training_path"]["calls"] == 0
    # with the fake kernel bound, a plain forward runs it up to 5.24; from 5.25 transformers' own
    # dispatcher sends CPU tensors to the torch body (mamba_ssm is listed as CUDA-only). The runner
    # never runs it either way.
    assert out["direct"] == "fake mamba_ssm kernel ran" or (
        out["direct"] == "no error" and Version(transformers.__version__) >= Version("5.25.0")), out["direct"]
    assert out["bypassed_logits_equal"] is True
    chunk = out["bound"]["code_paths"]["chunk_scan"]
    assert chunk["bound_at_import"].startswith("kernel ")
    assert "mamba_chunk_scan_combined" in chunk["bound_at_import"]
    assert chunk["ran"] == "torch fallback" and "bypassed" in chunk["why"]
