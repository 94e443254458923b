"""The mamba_ssm MambaLMHeadModel reference (equiv_reference/mamba2/mamba_ssm_model.py,
equiv_reference/mamba2/mamba_ssm_runner.py)
on a CPU machine: config translation, strict key mapping, the one-line errors, sys.modules hygiene,
and the whole runner through Triton's interpreter (the kernels' own source, numpy arithmetic)
against transformers' float64 oracle. The GPU run is equiv_reference/mamba2/gpu_mamba_ssm.py (docs/gpu.md)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from equiv.errors import CheckpointError, ConfigError, UnsupportedFeatureError
from equiv.fixtures import list_fixtures
from equiv_reference.mamba_ssm_refs import mamba_ssm_installed

pytestmark = pytest.mark.skipif(
    not (mamba_ssm_installed() and importlib.util.find_spec("huggingface_hub")),
    reason="mamba_ssm is not installed (the `tests` nox session installs it: noxfile.py install_mamba_ssm)")

ROOT = Path(__file__).resolve().parents[1]
# this runner translates Mamba-2 checkpoints only; the other families' fixtures have their own tests
FIXTURES = [n for n in list_fixtures() if n != "golden"
            and json.loads((ROOT / "fixtures" / n / "config.json").read_text()).get("model_type") == "mamba2"]


def _raw(name: str) -> dict:
    return json.loads((ROOT / "fixtures" / name / "config.json").read_text())


def _copy_fixture(tmp_path: Path, name: str = "tiny-g1", **config_changes) -> Path:
    dst = tmp_path / name
    shutil.copytree(ROOT / "fixtures" / name, dst)
    raw = _raw(name) | config_changes
    (dst / "config.json").write_text(json.dumps({k: v for k, v in raw.items() if v is not None}))
    return dst


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------
# config translation


@pytest.mark.parametrize("name", FIXTURES)
def test_translation_matches_config_json(name):
    from equiv_reference.mamba2.mamba_ssm_model import load_mamba_ssm_model, translate_config

    raw = _raw(name)
    kwargs, _ = translate_config(ROOT / "fixtures" / name)
    ssm = kwargs["ssm_cfg"]
    lo, hi = raw["time_step_limit"]
    hi = math.inf if isinstance(hi, dict) else hi
    assert (kwargs["d_model"], kwargs["n_layer"], kwargs["vocab_size"]) == (
        raw["hidden_size"], raw["num_hidden_layers"], raw["vocab_size"])
    ours = ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size")
    theirs = ("state_size", "conv_kernel", "expand", "head_dim", "n_groups", "chunk_size")
    assert [ssm[k] for k in ours] == [raw[k] for k in theirs]
    assert ssm["expand"] * kwargs["d_model"] // ssm["headdim"] == raw["num_heads"]  # mamba_ssm derives h
    assert ssm["dt_limit"] == (lo, hi) and isinstance(ssm["dt_limit"], tuple)  # Mamba2 compares by ==
    assert (ssm["bias"], ssm["conv_bias"]) == (raw["use_bias"], raw["use_conv_bias"])
    assert (kwargs["residual_in_fp32"], kwargs["tie_embeddings"]) == (raw["residual_in_fp32"],
                                                                      raw["tie_word_embeddings"])
    assert ssm["layer"] == "Mamba2" and ssm["rmsnorm"] and not ssm["norm_before_gate"]
    assert not ssm["use_mem_eff_path"] and kwargs["pad_vocab_size_multiple"] == 1
    assert kwargs["d_intermediate"] == 0 and kwargs["attn_layer_idx"] == []
    load_mamba_ssm_model().config_mamba.MambaConfig(**kwargs)  # every key is a MambaConfig field


@pytest.mark.parametrize("change, error, names", [
    ({"layer_norm_epsilon": 1e-6}, UnsupportedFeatureError, "layer_norm_epsilon"),
    ({"some_new_scale": 2.0}, ConfigError, "some_new_scale"),
])
def test_untranslatable_attribute_refused_by_name(tmp_path, change, error, names):
    from equiv_reference.mamba2.mamba_ssm_model import translate_config

    with pytest.raises(error) as e:
        translate_config(_copy_fixture(tmp_path, **change))
    assert names in _one_line(e)


def test_unlisted_attribute_refused_even_if_the_port_accepts_it(tmp_path, monkeypatch):
    """The runner's own allow-list: an attribute it does not list is refused by name, whatever the
    port's reader made of it."""
    from equiv_reference.mamba2 import mamba_ssm_model

    mamba_ssm_model.translate_config(ROOT / "fixtures" / "tiny-g1")  # accepted as is
    monkeypatch.setattr(mamba_ssm_model, "NOT_NUMERIC", mamba_ssm_model.NOT_NUMERIC - {"initializer_range"})
    with pytest.raises(UnsupportedFeatureError) as e:
        mamba_ssm_model.translate_config(ROOT / "fixtures" / "tiny-g1")
    assert "initializer_range (no MambaLMHeadModel counterpart)" in _one_line(e)


def test_mamba_ssm_format_config_refused(tmp_path):
    from equiv_reference.mamba2.mamba_ssm_model import translate_config

    d = tmp_path / "ms"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "d_model": 64, "n_layer": 2, "vocab_size": 96, "pad_vocab_size_multiple": 1, "tie_embeddings": True,
        "ssm_cfg": {"layer": "Mamba2", "d_state": 16, "headdim": 16, "ngroups": 2, "chunk_size": 16}}))
    with pytest.raises(ConfigError) as e:
        translate_config(d)
    assert "expected a transformers Mamba2 config.json" in _one_line(e)


# ---------------------------------------------------------------------------------------------
# weights


@pytest.mark.parametrize("name", FIXTURES)
def test_strict_key_mapping_loads_every_tensor(name):
    import torch

    from equiv.io.checkpoint_files import read_tensors
    from equiv_reference.mamba2.mamba_ssm_model import build_model, map_state_dict

    path = ROOT / "fixtures" / name
    ckpt = read_tensors(path)
    model, kwargs, cfg = build_model(path, torch.float32, "cpu")  # strict=True inside
    assert set(model.state_dict()) == set(map_state_dict(ckpt, cfg.tie_embeddings))
    last = cfg.n_layers - 1

    def same(ours, theirs):
        np.testing.assert_array_equal(ours.detach().numpy(), ckpt[theirs])

    same(model.backbone.embedding.weight, "backbone.embeddings.weight")
    same(model.backbone.norm_f.weight, "backbone.norm_f.weight")
    mixer = model.backbone.layers[last].mixer
    for attr in ("A_log", "D", "dt_bias", "conv1d.weight", "conv1d.bias", "in_proj.weight", "norm.weight",
                 "out_proj.weight"):
        same(mixer.get_parameter(attr), f"backbone.layers.{last}.mixer.{attr}")
    assert (mixer.in_proj.bias is not None) == cfg.use_bias
    if cfg.use_bias:
        same(mixer.in_proj.bias, f"backbone.layers.{last}.mixer.in_proj.bias")
    if cfg.tie_embeddings:
        assert model.lm_head.weight is model.backbone.embedding.weight
    else:
        same(model.lm_head.weight, "lm_head.weight")
        assert not np.array_equal(ckpt["lm_head.weight"], ckpt["backbone.embeddings.weight"])


def test_unknown_and_inconsistent_keys_refused():
    from equiv.io.checkpoint_files import read_tensors
    from equiv_reference.mamba2.mamba_ssm_model import map_state_dict

    ckpt = read_tensors(ROOT / "fixtures" / "tiny-g1")
    with pytest.raises(CheckpointError) as e:
        map_state_dict(ckpt | {"backbone.layers.0.mixer.dt_scale": np.ones(8, np.float32)}, True)
    assert "backbone.layers.0.mixer.dt_scale" in _one_line(e)
    with pytest.raises(CheckpointError) as e:
        map_state_dict(ckpt | {"lm_head.weight": ckpt["backbone.embeddings.weight"] + 1}, True)
    assert "tie_word_embeddings" in _one_line(e)


def test_missing_tensor_refused_by_the_strict_load(tmp_path):
    import torch

    from equiv.io.safetensors_io import read_safetensors, write_safetensors
    from equiv_reference.mamba2.mamba_ssm_model import build_model

    d = _copy_fixture(tmp_path)
    tensors = read_safetensors(d / "model.safetensors")
    del tensors["backbone.layers.1.mixer.D"]
    write_safetensors(d / "model.safetensors", tensors)
    with pytest.raises(CheckpointError) as e:
        build_model(d, torch.float32, "cpu")
    assert "backbone.layers.1.mixer.D" in _one_line(e) and "strict" in str(e.value)


# ---------------------------------------------------------------------------------------------
# where it can run, and the oracle


def test_cpu_only_machine_gets_one_line_errors(monkeypatch):
    import torch

    from equiv.references import ReferenceUnavailable, load_reference
    from equiv_reference.mamba2.mamba_ssm_runner import MambaSsmRunner, ReferenceError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    fixture = ROOT / "fixtures" / "tiny-g1"
    with pytest.raises(ReferenceUnavailable) as e:
        load_reference("mamba_ssm", fixture, "float32", threads=None)
    assert "needs a CUDA GPU" in _one_line(e)
    with pytest.raises(ReferenceError) as e:
        MambaSsmRunner(fixture, "float32")
    assert "torch.cuda.is_available() is False" in _one_line(e)
    with pytest.raises(ReferenceError) as e:
        MambaSsmRunner(fixture, "float32", device="cpu")
    assert "TRITON_INTERPRET=1" in _one_line(e)
    with pytest.raises(ReferenceError) as e:
        MambaSsmRunner(fixture, "float64")
    assert "load_oracle" in _one_line(e)


def test_float64_for_mamba_ssm_is_the_transformers_oracle():
    from equiv.references import load_reference

    oracle = load_reference("mamba_ssm", ROOT / "fixtures" / "tiny-g1", "float64", threads=None)
    p = oracle.provenance()
    assert (p["reference"], p["dtype"], p["oracle_for"]) == ("transformers Mamba2ForCausalLM", "float64",
                                                             "mamba_ssm")
    assert oracle.run(np.arange(1, 9, dtype=np.int32)[None])["logits"].dtype == np.float64


_HYGIENE = """
import importlib, json, sys
import equiv_reference.mamba2.mamba_ssm_runner
from equiv_reference.mamba2.mamba_ssm_model import load_mamba_ssm_model, STUBBED
mods = load_mamba_ssm_model()
left = sorted(k for k in sys.modules if k.split('.')[0] in ('mamba_ssm',) + STUBBED)
from equiv_reference.mamba2.dispatch import DISPATCHED, import_modeling_mamba2
from equiv_reference.provenance import bound_implementation
mm = import_modeling_mamba2()
try:
    importlib.import_module('mamba_ssm')
    real_import = 'succeeded'
except ImportError as e:
    real_import = type(e).__name__
print(json.dumps({'left': left, 'stubs': list(mods.stubs_installed), 'real_import': real_import,
                  'bound': {n: bound_implementation(getattr(mm, n)) for n in DISPATCHED},
                  'model_class': mods.mixer_seq_simple.MambaLMHeadModel.__name__}))
"""


def _python(code: str, **env) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_leaves_sys_modules_and_transformers_binding_alone():
    """A fresh process: loading MambaLMHeadModel leaves no mamba_ssm* or stub module behind, a
    real `import mamba_ssm` still fails, and transformers (imported after) binds its torch bodies."""
    from equiv_reference.mamba2 import mamba_ssm_model

    def owned():  # a failed real `import mamba_ssm` elsewhere may have left entries: keep them as is
        names = ("mamba_ssm", "selective_scan_cuda")
        return {k: v for k, v in sys.modules.items() if k.split(".")[0] in names}

    before = owned()
    mamba_ssm_model._load()  # uncached: a fresh import in this process too
    assert owned() == before
    out = _python(_HYGIENE)
    assert out["model_class"] == "MambaLMHeadModel"
    assert out["left"] == [] and out["real_import"] != "succeeded"
    if importlib.util.find_spec("selective_scan_cuda") is None:
        assert out["stubs"] == ["selective_scan_cuda"]
    assert set(out["bound"].values()) == {"torch fallback"}, out["bound"]


_INTERPRETED = """
import json, numpy as np
from equiv.decode import match_greedy
from equiv.layerwise import run_layerwise
from equiv.mamba2.port import Mamba2Port
from equiv_reference.mamba2.mamba_ssm_runner import MambaSsmRunner, ReferenceError
from equiv_reference.mamba2.references import load_oracle
out = {}
for name in ('tiny-g2', 'tiny-dtlimit-bias'):
    path = 'fixtures/' + name
    ref, oracle = MambaSsmRunner(path, device='cpu'), load_oracle('mamba_ssm', path)
    port = Mamba2Port().load(path)
    ids = np.random.default_rng(0).integers(0, 96, (1, 20)).astype(np.int32)
    steps, full = ref.step_logits(ids, None, 17), ref.run(ids)['logits']
    row = {'cache_vs_full': float(np.abs(steps[:, :-1] - full[:, 16:19]).max())}
    if name == 'tiny-g2':
        r = run_layerwise(port, ref, oracle, ids, None)
        d = match_greedy(port, ref, oracle, ids[:, :17], None, 4)
        try:
            ref.run(ids, np.concatenate([[[0]], np.ones((1, 19))], axis=1))
            masked = 'accepted'
        except ReferenceError as e:
            masked = str(e)
        o, f = oracle.run(ids), ref.run(ids)  # the reference's own error (the budget cannot see it)
        rel = {k: float(np.abs(f[k] - o[k]).max() / np.abs(o[k]).max()) for k in o}
        row.update(verdict=r.verdict, counts=r.counts, ratios={t.name: t.ratio for t in r.taps}, rel=rel,
                   decode=[d.verdict, d.matched_steps, d.reference_consistency.verdict], masked=masked,
                   paths=ref.provenance()['code_paths'], unavailable=ref.provenance()['unavailable_taps'])
    out[name] = row
print(json.dumps(out))
"""


def test_runner_through_the_triton_interpreter_matches_the_oracle():
    """The whole runner (hooks, tap names, cache path, mamba_ssm's generate) on the CPU: every tap is
    within float32 rounding of the float64 oracle (checked directly: a wrong reference tap would only
    make the budget's denominator large), the built-in port passes the budget against it, decode
    matches, masks are refused, and the cached decode ignores time_step_limit (mamba_ssm's step has
    no dt clamp: docs/porting-bugs.md #4)."""
    out = _python(_INTERPRETED, TRITON_INTERPRET="1", MAMBA_DETERMINISTIC="1")
    g2 = out["tiny-g2"]
    assert g2["verdict"] == "equivalent" and g2["counts"]["pass"] == g2["counts"]["total"] == 17, g2
    assert g2["unavailable"] == {} and max(g2["ratios"].values()) < 2.0
    assert len(g2["rel"]) == 17 and max(g2["rel"].values()) < 1e-4, g2["rel"]
    assert g2["decode"] == ["pass", [4], "pass"]
    assert "takes no attention mask" in g2["masked"] and "\n" not in g2["masked"]
    assert g2["paths"]["chunk_scan"]["calls"] > 0 and g2["paths"]["decode_state_update"]["calls"] > 0
    assert g2["paths"]["conv"]["ran"] == "torch nn.Conv1d + SiLU fallback"
    assert g2["cache_vs_full"] < 1e-4  # same model, two paths: float rounding only
    assert out["tiny-dtlimit-bias"]["cache_vs_full"] > 1e-2  # the unclamped decode step
