"""The Mamba-3 family's torch side on a CPU machine: the fixtures have the edge cases they claim and
regenerate bit-identically, mamba_ssm's Mamba3 stack loads them strictly, the numpy oracle runner is
float64 throughout and its decode continues its own recurrence exactly, the oracle agrees with
mamba_ssm's pure-torch references in float64, and the kernel runner, through Triton's interpreter
with its recorded adaptations, gives every canonical tap in its documented shape within float32
rounding of the float64 oracle (in a subprocess: TRITON_INTERPRET must be set before triton's import)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from equiv.errors import CheckpointError
from equiv.mamba3.config_file import load_config
from equiv.mamba3.taps import tap_names
from equiv.ports import GenerateResult
from equiv_reference.mamba_ssm_refs import mamba_ssm_installed

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ("mamba3-tiny-siso", "mamba3-tiny-siso-rope1-outnorm", "mamba3-tiny-mimo")
needs_mamba_ssm = pytest.mark.skipif(not mamba_ssm_installed(),
                                     reason="mamba_ssm is not installed (the `tests` nox session installs "
                                            "it: noxfile.py install_mamba_ssm)")


def _fixture(name: str) -> Path:
    return ROOT / "fixtures" / name


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------
# fixtures


def test_fixtures_have_the_edge_cases_they_claim():
    from equiv.mamba3.convert import read_checkpoint
    from equiv_reference.mamba3.oracle_runner import Mamba3OracleRunner

    siso, _ = load_config(_fixture("mamba3-tiny-siso"))
    assert (siso.nheads, siso.vocab_size % 2, siso.ngroups, siso.is_mimo) == (3, 1, 1, False)
    assert 0 < siso.num_rope_angles < siso.d_state // 2 and siso.tie_embeddings and siso.residual_in_fp32

    rope1, _ = load_config(_fixture("mamba3-tiny-siso-rope1-outnorm"))
    assert rope1.num_rope_angles == rope1.d_state // 2 and rope1.is_outproj_norm
    assert rope1.ngroups == rope1.nheads == 4 and not rope1.tie_embeddings and not rope1.residual_in_fp32
    ids = np.random.default_rng(0).integers(0, rope1.vocab_size, (1, 40)).astype(np.int32)
    taps = Mamba3OracleRunner(_fixture("mamba3-tiny-siso-rope1-outnorm")).run(ids)
    floored = np.mean(taps["layers.0.mixer.A"] == -rope1.A_floor)
    assert 0.1 < floored < 0.6, floored  # the A floor clamps often, not always
    assert np.abs(taps["layers.0.mixer.angles"]).max() > 2 * np.pi  # angles pass a whole turn

    mimo, _ = load_config(_fixture("mamba3-tiny-mimo"))
    assert mimo.is_mimo and mimo.rank == 2 and not mimo.rotate_pairwise and mimo.chunk_size * mimo.rank <= 64
    _, params, _ = read_checkpoint(_fixture("mamba3-tiny-mimo"))
    lp = params["layers"][0]
    assert lp["mimo_x"].shape == (mimo.nheads, 2, mimo.headdim)
    for name, default in (("mimo_x", 0.5), ("mimo_z", 1.0), ("mimo_o", 0.5), ("D", 1.0), ("B_bias", 1.0)):
        assert np.std(lp[name]) > 0.05 and abs(np.mean(lp[name]) - default) < 0.2, name  # random around it


def test_fixtures_regenerate_bit_identically(tmp_path):
    from equiv_reference.mamba3 import make_fixtures

    assert make_fixtures.main(["--out", str(tmp_path)]) == 0
    for name in FIXTURES:
        for file in ("model.safetensors", "config.json"):
            assert (tmp_path / name / file).read_bytes() == (_fixture(name) / file).read_bytes(), (name, file)
        made = json.loads((tmp_path / name / "generator.json").read_text())
        kept = json.loads((_fixture(name) / "generator.json").read_text())
        assert made.keys() == kept.keys()
        assert {k: made[k] for k in made if k != "versions"} == {k: kept[k] for k in kept if k != "versions"}


# ---------------------------------------------------------------------------------------------
# the numpy oracle as a runner


def test_oracle_runner_is_float64_throughout_and_float32_is_float32():
    from equiv_reference.mamba3.references import oracle

    path = _fixture("mamba3-tiny-mimo")
    cfg, _ = load_config(path)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 19)).astype(np.int32)
    o64, o32 = oracle(path, "float64").run(ids), oracle(path, "float32").run(ids)
    assert list(o64) == tap_names(cfg.n_layers)
    assert {v.dtype for v in o64.values()} == {np.dtype(np.float64)}
    assert {v.dtype for v in o32.values()} == {np.dtype(np.float32)}
    rel = max(float(np.abs(o32[k] - o64[k]).max() / max(np.abs(o64[k]).max(), 1e-30)) for k in o64)
    assert 0 < rel < 1e-4  # a float32 run of the same code: close, not equal


def test_oracle_runner_decode_continues_its_recurrence():
    from equiv_reference.mamba3.oracle_runner import Mamba3OracleRunner

    path = _fixture("mamba3-tiny-siso")
    runner = Mamba3OracleRunner(path, "float64")
    ids = np.random.default_rng(2).integers(0, runner.cfg.vocab_size, (1, 24)).astype(np.int32)
    full = runner.run(ids)["logits"]
    steps = runner.step_logits(ids, None, 17)
    np.testing.assert_allclose(steps[:, :-1], full[:, 16:23], rtol=0, atol=1e-11)
    gen = runner.generate(ids[:, :5], None, 6)
    assert isinstance(gen, GenerateResult) and gen.tokens.shape == (1, 6) and gen.steps == 6
    seq = np.concatenate([ids[:, :5], gen.tokens], axis=1)
    np.testing.assert_array_equal(gen.tokens[0], runner.run(seq)["logits"][0, 4:10].argmax(-1))
    with pytest.raises(ValueError) as e:
        Mamba3OracleRunner(path, "float16")
    assert "float16" in _one_line(e)


def test_oracle_runner_left_padding_leaves_real_positions_unchanged():
    from equiv_reference.mamba3.oracle_runner import Mamba3OracleRunner

    runner = Mamba3OracleRunner(_fixture("mamba3-tiny-siso-rope1-outnorm"), "float64")
    ids = np.random.default_rng(3).integers(0, runner.cfg.vocab_size, (1, 12)).astype(np.int32)
    padded = np.concatenate([np.zeros((1, 3), np.int32), ids], axis=1)
    mask = np.concatenate([np.zeros((1, 3)), np.ones((1, 12))], axis=1).astype(np.int32)
    alone, in_batch = runner.run(ids)["logits"], runner.run(padded, mask)["logits"][:, 3:]
    np.testing.assert_allclose(in_batch, alone, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# mamba_ssm's Mamba3 stack (lm.py) and its pure-torch references


@needs_mamba_ssm
@pytest.mark.parametrize("name", FIXTURES)
def test_lm_loads_every_fixture_strictly(name):
    from equiv_reference.mamba3.lm import load_model

    model, cfg = load_model(_fixture(name))
    keys = set(model.state_dict())
    assert ("lm_head.weight" in keys) == (not cfg.tie_embeddings)
    import torch

    assert {p.dtype for n, p in model.named_parameters() if n.endswith("dt_bias")} == {torch.float32}


@needs_mamba_ssm
def test_lm_refuses_a_missing_or_unknown_tensor_in_one_line(tmp_path):
    from equiv.io.safetensors_io import read_safetensors, write_safetensors
    from equiv_reference.mamba3.lm import load_model

    for change in ("extra", "missing", "tied_head_copy"):
        dst = tmp_path / change
        shutil.copytree(_fixture("mamba3-tiny-siso"), dst)
        tensors = read_safetensors(dst / "model.safetensors")
        if change == "extra":
            tensors["backbone.layers.0.mixer.conv1d.weight"] = np.zeros((2, 2), np.float32)
        elif change == "missing":
            del tensors["backbone.layers.1.mixer.D"]
        else:  # mamba_ssm's own state_dict writes the tied head: accepted when it is the embedding
            tensors["lm_head.weight"] = tensors["backbone.embedding.weight"].copy()
        write_safetensors(dst / "model.safetensors", tensors)
        if change == "tied_head_copy":
            load_model(dst)
            continue
        with pytest.raises(CheckpointError) as e:
            load_model(dst)
        msg = _one_line(e)
        assert ("conv1d" in msg) if change == "extra" else ("mixer.D" in msg), msg


@needs_mamba_ssm
def test_oracle_agrees_with_mamba_ssms_float64_references():
    from equiv_reference.mamba3.validate_oracle import check_fused_step_reference, check_rotary_reference

    rows = check_fused_step_reference(0) + check_rotary_reference(0)
    assert len(rows) == 7 and all(r["pass"] for r in rows), rows
    assert "mamba3_step_fn.py" in rows[0]["source"]  # read from the installed package, not copied


@needs_mamba_ssm
def test_cpu_refusals_are_one_line(monkeypatch):
    from equiv_reference.mamba3.runner import Mamba3SsmRunner, ReferenceError

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ReferenceError) as e:
        Mamba3SsmRunner(_fixture("mamba3-tiny-siso"), device="cpu")
    assert "TRITON_INTERPRET=1" in _one_line(e)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ReferenceError) as e:
        Mamba3SsmRunner(_fixture("mamba3-tiny-siso"), device="cpu")
    assert "inline asm" in _one_line(e) and "interpreter_adaptations=True" in str(e.value)
    with pytest.raises(ReferenceError) as e:
        Mamba3SsmRunner(_fixture("mamba3-tiny-siso"), "float64", device="cpu")
    assert "oracle" in _one_line(e)


_INTERPRETED = """
import json, numpy as np, torch
from equiv_reference.mamba3 import kernels
from equiv_reference.mamba3.runner import Mamba3SsmRunner, ReferenceError, _NoCudaDevice
from equiv_reference.mamba3.oracle_runner import Mamba3OracleRunner
out = {}
path = 'fixtures/mamba3-tiny-siso-rope1-outnorm'
ref = Mamba3SsmRunner(path, device='cpu', interpreter_adaptations=True)
o64, o32 = Mamba3OracleRunner(path, 'float64'), Mamba3OracleRunner(path, 'float32')
ids = np.random.default_rng(0).integers(0, ref.cfg.vocab_size, (1, 20)).astype(np.int32)
got, want, yard = ref.run(ids), o64.run(ids), o32.run(ids)
rms = lambda x: float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
out['names'] = list(got)
out['shapes'] = {k: list(v.shape) for k, v in got.items()}
out['oracle_shapes'] = {k: list(v.shape) for k, v in want.items()}
out['err'] = {k: rms(got[k] - want[k]) for k in got}
out['err32'] = {k: rms(yard[k] - want[k]) for k in got}
steps = ref.step_logits(ids, None, 14)
out['cache_vs_full'] = float(np.abs(steps[:, :-1] - got['logits'][:, 13:19]).max())
gen = ref.generate(ids[:, :5], None, 4)
out['gen'] = list(gen.tokens.shape)
try:
    ref.run(ids, np.concatenate([[[0]], np.ones((1, 19))], axis=1).astype(np.int32))
    out['masked'] = 'accepted'
except ReferenceError as e:
    out['masked'] = str(e)
prov = ref.provenance()
out['calls'] = {k: v['calls'] for k, v in prov['code_paths'].items()}
out['ran'] = {k: v['ran'] for k, v in prov['code_paths'].items()}
out['adaptations'] = len(prov['interpreter_adaptations'])
try:
    Mamba3SsmRunner('fixtures/mamba3-tiny-mimo', device='cpu', interpreter_adaptations=True)
    out['mimo'] = 'ran'
except ReferenceError as e:
    out['mimo'] = str(e)
# why lm.Mamba3Mixer exists: Mamba3.forward with a warm cache hands step a (b, 1, d) input
code = kernels.load_mamba3()
kernels.adapt_for_interpreter(code, ptx=True, float32_inputs=True); kernels.use_torch_step(code)
torch.cuda.device = _NoCudaDevice
m = code.mamba3.Mamba3(d_model=32, d_state=16, headdim=16, chunk_size=16, layer_idx=0)
params = code.generation.InferenceParams(max_seqlen=8, max_batch_size=1)
with torch.no_grad():
    m(torch.randn(1, 4, 32), inference_params=params)
    params.seqlen_offset = 4
    try:
        m(torch.randn(1, 1, 32), inference_params=params)
        out['own_step'] = 'ran'
    except Exception as e:
        out['own_step'] = type(e).__name__ + ': ' + str(e)[-80:]
kernels.restore(code)
print(json.dumps(out))
"""


def _python(code: str, **env) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_mamba_ssm
def test_kernel_runner_through_the_interpreter_gives_every_tap_within_float32_rounding():
    """Every tap in its documented shape and within 2x the oracle's own float32 run of the float64
    oracle (angles: within 8x, since the kernel reduces them mod 2 pi with a float32 2 pi); the
    cached decode (rotary step kernel + the CuTe step's torch reference) equals the full forward to
    float rounding; masks and MIMO (TileLang) are refused in one line; Mamba3.forward's own cached
    path fails on its step's input shape."""
    out = _python(_INTERPRETED, TRITON_INTERPRET="1")
    assert out["names"] == tap_names(2) and out["shapes"] == out["oracle_shapes"]
    assert out["shapes"]["layers.0.mixer.B"] == [1, 20, 1, 4, 16]
    assert out["shapes"]["layers.1.mixer.ssm"] == [1, 20, 1, 64]
    assert out["shapes"]["layers.0.mixer.angles"] == [1, 20, 4, 8]
    for tap, err in out["err"].items():
        limit = 8 if tap.endswith("angles") else 2
        assert err <= limit * max(out["err32"][tap], 1e-7), (tap, err, out["err32"][tap])
    assert out["cache_vs_full"] < 1e-4
    assert out["gen"] == [1, 4]
    assert "takes no attention mask" in out["masked"] and "\n" not in out["masked"]
    assert min(out["calls"][k] for k in ("siso_prefill", "rotary_step", "cute_step")) > 0
    assert "selective_state_update_fused_ref_v2" in out["ran"]["cute_step"] and out["adaptations"] == 4
    assert "TileLang" in out["mimo"] and "\n" not in out["mimo"]
    assert "expected 2 dims" in out["own_step"], out["own_step"]
