"""The bundled fixtures: the manifest covers and matches them, a corrupted copy is caught with the
file named, the tiny checkpoints and the golden recordings regenerate bit-identically, and the tiny
checkpoints are randomised the way equiv_reference/mamba2/make_fixtures.py says (not transformers'
default init)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from equiv.errors import FixtureIntegrityError
from equiv.fixtures import (
    MANIFEST,
    UnknownFixture,
    fixture_dir,
    fixtures_root,
    list_fixtures,
    read_manifest,
    scan_files,
    verify_fixture,
)
from equiv.io.safetensors_io import read_safetensors

TINY = ["tiny-g1", "tiny-g2", "tiny-gh", "tiny-untied", "tiny-dtlimit-bias"]


def test_manifest_lists_every_fixture_directory_and_all_match():
    root = fixtures_root()
    on_disk = sorted(p.name for p in root.iterdir() if p.is_dir() and scan_files(p))
    assert list_fixtures() == on_disk
    assert set(TINY) <= set(on_disk)
    for name in on_disk:
        verify_fixture(name)


def test_manifest_is_up_to_date_and_deterministic():
    from equiv_reference.manifest import build_manifest

    text = json.dumps(build_manifest(fixtures_root()), indent=1, sort_keys=True) + "\n"
    assert text == (fixtures_root() / MANIFEST).read_text(), "run `python -m equiv_reference.manifest`"


def test_every_fixture_records_its_generator_and_versions():
    for name, entry in read_manifest()["fixtures"].items():
        gen = entry["generator"]
        assert gen.get("generator") not in (None, "unknown"), name
        assert {"python", "torch", "transformers"} <= set(gen.get("versions", {})), name


def test_tiny_fixtures_are_small():
    for name in TINY:
        total = read_manifest()["fixtures"][name]["total_bytes"]
        assert total < 1_000_000, f"{name}: {total:,} B"


def _copy(tmp_path, name="tiny-g1"):
    root = tmp_path / "fixtures"
    shutil.copytree(fixture_dir(name), root / name)
    shutil.copy(fixtures_root() / MANIFEST, root / MANIFEST)
    return root


def test_a_corrupted_file_is_named_with_expected_and_actual_sha256(tmp_path):
    root = _copy(tmp_path)
    verify_fixture("tiny-g1", root)  # the pristine copy passes
    weights = root / "tiny-g1" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # one bit of one float
    weights.write_bytes(bytes(data))
    expected = read_manifest()["fixtures"]["tiny-g1"]["files"]["model.safetensors"]["sha256"]
    with pytest.raises(FixtureIntegrityError) as err:
        verify_fixture("tiny-g1", root)
    msg = str(err.value)
    assert "model.safetensors" in msg and expected in msg and scan_files(root / "tiny-g1")[
        "model.safetensors"]["sha256"] in msg
    assert "config.json" not in msg


def test_missing_and_extra_files_are_all_reported_at_once(tmp_path):
    root = _copy(tmp_path)
    (root / "tiny-g1" / "config.json").unlink()
    (root / "tiny-g1" / "notes.txt").write_text("x")
    with pytest.raises(FixtureIntegrityError, match=r"config.json: missing.*notes.txt: extra"):
        verify_fixture("tiny-g1", root)


def test_unknown_fixture_and_missing_manifest(tmp_path):
    with pytest.raises(UnknownFixture, match="tiny-g1"):
        fixture_dir("no-such-fixture")
    with pytest.raises(FixtureIntegrityError, match="equiv_reference.manifest"):
        list_fixtures(tmp_path)


def test_manifest_takes_generator_records_from_the_fixture_directories(tmp_path):
    from equiv_reference.manifest import build_manifest

    (tmp_path / "made").mkdir()
    (tmp_path / "made" / "w.bin").write_bytes(b"\x00")
    (tmp_path / "made" / "generator.json").write_text(json.dumps({"generator": "g", "seed": 3}))
    (tmp_path / "trained").mkdir()
    (tmp_path / "trained" / "training.json").write_text(json.dumps(
        {"generator": "equiv_reference.mamba2.train_byte_model", "train_config": {"seed": 7},
         "model_config": {},
         "versions": {"torch": "t", "python": "p"}}))
    (tmp_path / "legacy").mkdir()  # a record from before the rename names no generator
    (tmp_path / "legacy" / "training.json").write_text(json.dumps({"train_config": {"seed": 1}}))
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "x").write_text("x")
    (tmp_path / "empty").mkdir()
    fx = build_manifest(tmp_path)["fixtures"]
    assert sorted(fx) == ["bare", "legacy", "made", "trained"]
    assert fx["legacy"]["generator"]["generator"] == "reference.train_byte_model"
    assert fx["made"]["generator"]["seed"] == 3
    assert (fx["trained"]["generator"]["generator"], fx["trained"]["generator"]["seed"]) == (
        "equiv_reference.mamba2.train_byte_model", 7)
    assert fx["bare"]["generator"]["generator"] == "unknown"


def test_tiny_fixtures_regenerate_bit_identically(tmp_path):
    pytest.importorskip("torch")
    from equiv_reference.mamba2 import make_fixtures

    recorded = read_manifest()["fixtures"]
    current = make_fixtures.fixture_versions()
    for name in TINY:
        was = recorded[name]["generator"]["versions"]
        differ = {k: (was.get(k), v) for k, v in current.items() if k != "python" and was.get(k) != v}
        if differ:
            pytest.skip(f"{name} was generated with other package versions (recorded, now): {differ}")
    assert make_fixtures.main(["--out", str(tmp_path), "--no-manifest"]) == 0
    for name in TINY:
        assert scan_files(tmp_path / name) == recorded[name]["files"], name


def test_golden_recording_regenerates_bit_identically(tmp_path):
    """`nox -s fixtures` runs `python -m equiv_reference.golden`; run the same, in a fresh process (torch
    fixes its CPU kernels at its first op), for tiny-g1 (the cheapest fixture, ~15 s; all of them
    take ~100 s), and require the committed bytes, unless generator.json says other versions."""
    pytest.importorskip("torch")
    root = Path(__file__).resolve().parents[1]
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "equiv_reference.golden", "--out", str(tmp_path),
                           "--fixture",
                           "tiny-g1"], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    golden = fixtures_root() / "golden"
    was = json.loads((golden / "generator.json").read_text())
    now = json.loads((tmp_path / "generator.json").read_text())
    was_v, now_v = was.pop("versions"), now.pop("versions")
    differ = {k: (was_v.get(k), now_v.get(k)) for k in sorted(set(was_v) | set(now_v))
              if k != "python" and was_v.get(k) != now_v.get(k)}
    if differ:
        pytest.skip(f"fixtures/golden was recorded with other versions or CPU kernels "
                    f"(recorded, now): {differ}")
    assert now == was
    files = sorted(p.name for p in (golden / "tiny-g1").iterdir())
    assert sorted(p.name for p in (tmp_path / "tiny-g1").iterdir()) == files
    for name in files:
        assert (tmp_path / "tiny-g1" / name).read_bytes() == (golden / "tiny-g1" / name).read_bytes(), name


@pytest.mark.parametrize("name", TINY)
def test_tiny_weights_are_randomised_as_documented(name):
    w = read_safetensors(fixture_dir(name) / "model.safetensors")
    cfg = json.loads((fixture_dir(name) / "config.json").read_text())
    for i in range(cfg["num_hidden_layers"]):
        p = f"backbone.layers.{i}.mixer."
        A = -np.exp(w[p + "A_log"].astype(np.float64))
        fast, slow = A[A <= -1.0], A[A > -1.0]
        assert len(fast) and len(slow) and (fast >= -16).all() and (slow > -0.011).all(), A
        assert w[p + "D"].std() > 0.3 and (w[p + "D"] < 0).any()
        assert np.abs(w[p + "conv1d.bias"]).max() > 0.1
        assert 0.02 < w[p + "norm.weight"].std() < 0.3
        assert np.ptp(w[p + "dt_bias"]) > 2.0
    assert ("lm_head.weight" in w) == (not cfg["tie_word_embeddings"])
