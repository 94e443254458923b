"""References replayed from GPU recordings (Family.recorded_references, Mamba-3's mamba_ssm kernels):
the main job adds "<fixture>@<reference>" checks exactly where a recording exists, decodes unpadded
prompts for them (the kernels take no attention mask), and a recording made by
equiv_reference/mamba3/record_kernels.py answers every call of that check (made here through
Triton's interpreter, the script's CPU test mode) and no other."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from equiv.check import _targets, check_fixture, plan_for, recorded_loader
from equiv.families import family
from equiv.ports import resolve_port
from equiv_reference.mamba_ssm_refs import mamba_ssm_installed

ROOT = Path(__file__).resolve().parents[1]


def _fixtures_copy(tmp_path: Path, names) -> Path:
    root = tmp_path / "fixtures"
    root.mkdir()
    shutil.copy(ROOT / "fixtures" / "manifest.json", root / "manifest.json")
    for name in names:
        shutil.copytree(ROOT / "fixtures" / name, root / name)
    return root


def test_a_recorded_check_is_added_exactly_where_a_recording_exists(tmp_path, monkeypatch):
    root = _fixtures_copy(tmp_path, ["mamba3-tiny-siso", "mamba3-tiny-mimo", "tiny-g2"])
    monkeypatch.setenv("SSM_EQUIV_FIXTURES", str(root))
    (root / "golden" / "mamba3-tiny-siso").mkdir(parents=True)
    (root / "golden" / "mamba3-tiny-siso" / "mamba_ssm-float32.json").write_text("{}")
    (root / "golden" / "tiny-g2").mkdir(parents=True)
    (root / "golden" / "tiny-g2" / "mamba_ssm-float32.json").write_text("{}")  # not a recorded ref of Mamba-2
    targets = _targets(["mamba3-tiny-siso", "mamba3-tiny-mimo", "tiny-g2"], None, False, "builtin")
    assert [(name, recorded) for name, _, _, recorded in targets] == [
        ("mamba3-tiny-siso", ""), ("mamba3-tiny-mimo", ""), ("tiny-g2", ""),
        ("mamba3-tiny-siso@mamba_ssm", "mamba_ssm")]
    assert targets[-1][1] == targets[0][1]  # the same checkpoint, checked again


def test_unpadded_plan_decodes_the_same_prompts_one_per_batch():
    path = ROOT / "fixtures" / "mamba3-tiny-siso"
    padded, unpadded = plan_for(path, 96, (2, 16)), plan_for(path, 96, (2, 16), unpadded=True)
    (ids, mask), = padded.decode_batches
    want = [row[m.astype(bool)].tolist() for row, m in zip(ids, mask)]
    assert [b[0].tolist()[0] for b in unpadded.decode_batches] == want
    assert all(m is None and b.shape[0] == 1 for b, m in unpadded.decode_batches)
    np.testing.assert_array_equal(padded.layerwise_ids, unpadded.layerwise_ids)


def test_the_recorded_loader_replays_float32_and_keeps_the_oracle(tmp_path):
    fam = family("mamba3")
    golden = tmp_path / "golden"
    load = recorded_loader(fam, "mamba_ssm", False, golden)
    oracle = load(ROOT / "fixtures" / "mamba3-tiny-siso", "float64")
    assert type(oracle).__name__ == "Mamba3OracleRunner" and oracle.dtype == "float64"
    from equiv.errors import FixtureIntegrityError

    with pytest.raises(FixtureIntegrityError, match="mamba_ssm-float32"):
        load(ROOT / "fixtures" / "mamba3-tiny-siso", "float32")


@pytest.mark.skipif(not mamba_ssm_installed(), reason="mamba_ssm is not installed (nox -s tests installs it)")
def test_a_kernel_recording_answers_the_main_jobs_check_and_nothing_else(tmp_path):
    """Record mamba3-tiny-siso through the interpreter (record_kernels' CPU test mode, ~3 min on two
    cores), replay it as the main job does: every call answered, the built-in port equivalent; the
    padded plan asks for calls the recording does not have, an error naming the recording."""
    out = tmp_path / "rec"
    proc = subprocess.run([sys.executable, "-m", "equiv_reference.mamba3.record_kernels", "--out", str(out),
                           "--fixture", "mamba3-tiny-siso"], cwd=ROOT, capture_output=True, text=True,
                          timeout=1200, env={**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    meta = json.loads((out / "mamba3-kernels-generator.json").read_text())
    fixture = meta["fixtures"]["mamba3-tiny-siso"]
    assert fixture["builtin_port_verdict"]["verdict"] == "pass"
    assert fixture["code_paths"]["siso_prefill"]["calls"] > 0 and fixture["recorded_calls"] >= 13
    golden = tmp_path / "golden" / "mamba3-tiny-siso"
    golden.mkdir(parents=True)
    for suffix in (".json", ".safetensors"):  # the interpreter's recording, under the GPU recording's name
        shutil.copy(out / "mamba3-tiny-siso" / f"mamba_ssm-interpreter-float32{suffix}",
                    golden / f"mamba_ssm-float32{suffix}")
    fam = family("mamba3")
    load = recorded_loader(fam, "mamba_ssm", False, tmp_path / "golden")
    path = ROOT / "fixtures" / "mamba3-tiny-siso"
    quiet = lambda _m: None  # noqa: E731
    outcome = check_fixture("mamba3-tiny-siso@mamba_ssm", path, resolve_port("builtin", fam), load, quiet,
                            unpadded=True)
    assert outcome.error == "" and outcome.verdict == "pass", outcome.error
    assert [sum(d.matched_steps) for d in outcome.decode] == [64] * 6
    assert outcome.reference["path"].startswith("Triton interpreter")
    padded = check_fixture("mamba3-tiny-siso@mamba_ssm", path, resolve_port("builtin", fam), load, quiet)
    assert "mamba_ssm-float32" in padded.error and "no " in padded.error and "\n" not in padded.error


def test_a_reference_declaring_bfloat16_is_judged_plausible_at_bfloat16_only():
    """A reference 3% from the oracle (mamba_ssm's GPU angles tap, whose inputs are bfloat16) is
    implausible as float32 (the tap fails whatever the port does) and judged by the budget when it
    declares bfloat16; 30% is implausible either way."""
    from equiv.compare import compare_tap

    rng = np.random.default_rng(0)
    oracle = rng.standard_normal(4096)
    port = oracle + 1e-7 * rng.standard_normal(4096)
    cases = [(0.03, None, "fail"), (0.03, "bfloat16", "pass"), (0.3, "bfloat16", "fail")]
    for rel, precision, verdict in cases:
        ref = oracle + rel * rng.standard_normal(4096)
        t = compare_tap("t", port, ref, oracle, "float32", reference_precision=precision)
        assert t.verdict == verdict, (rel, precision, t.reason)
        assert (t.verdict == "fail") == t.reason.startswith("the reference itself is")
    assert family("mamba3").recorded_references == {"mamba_ssm": "bfloat16"}


@pytest.mark.parametrize("name", ["mamba3-tiny-siso", "mamba3-tiny-mimo"])
def test_the_committed_gpu_recordings_answer_the_check_and_say_what_they_are(name):
    """The kernels' recordings made on an H100 (SISO: Triton; MIMO: TileLang) answer every call of
    the main job's check, the built-in port is equivalent against them, and the report says they are
    GPU recordings judged at bfloat16 and how to record them again (not `nox -s fixtures`)."""
    from equiv.fixtures import fixtures_root
    from equiv.report_wording import golden_replay

    fam = family("mamba3")
    load = recorded_loader(fam, "mamba_ssm", False, fixtures_root() / "golden")
    outcome = check_fixture(f"{name}@mamba_ssm", fixtures_root() / name, resolve_port("builtin", fam), load,
                            lambda _m: None, unpadded=True)
    assert outcome.error == "" and outcome.verdict == "pass", outcome.error
    assert outcome.reference["path"] == "GPU kernels" and outcome.reference["device"] == "cuda"
    kernel = "mimo_prefill" if "mimo" in name else "siso_prefill"
    assert outcome.reference["code_paths"][kernel]["ran"] == "shipped kernel"
    acc = outcome.layerwise["accumulated"]
    assert {t.reference_precision for t in acc.taps if t.verdict == "pass"} == {"bfloat16"}
    statement = golden_replay(acc)["statement"]
    assert "record_kernels" in statement and "nox -s fixtures" not in statement
    assert "judged plausible at bfloat16" in statement
