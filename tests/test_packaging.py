"""What `pip install ssm-equiv` gives a user's CI: the package list, the shipped fixtures and
tested-versions file, and the main job run from an installed wheel in a fresh venv with neither
torch nor transformers, from a directory outside the checkout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

from equiv import tested_versions

ROOT = Path(__file__).resolve().parents[1]


def test_explicit_package_list_matches_the_tree():
    """pyproject lists packages by hand (a mapped data package is invisible to find): every
    directory with an __init__.py must be in it, and nothing else."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {str(p.parent.relative_to(ROOT)).replace(os.sep, ".")
               for top in ("equiv", "equiv_reference") for p in (ROOT / top).rglob("__init__.py")}
    assert listed == on_disk | {"equiv.fixture_data"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           str(ROOT), "-w", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = out.glob("ssm_equiv-*.whl")
    return path


def test_wheel_ships_fixtures_and_versions_under_unique_top_level_names(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"equiv", "equiv_reference"}  # no bare `reference` (or `tests`) package
    assert "equiv/tested_versions.toml" in names
    manifest = json.loads(zipfile.ZipFile(wheel).read("equiv/fixture_data/manifest.json"))
    for fixture, entry in manifest["fixtures"].items():
        for rel in entry["files"]:
            assert f"equiv/fixture_data/{fixture}/{rel}" in names, (fixture, rel)


def test_installed_wheel_runs_the_golden_main_job_without_torch(wheel, tmp_path):
    """A fresh venv, the wheel and its dependencies at the tested pins, no torch, no transformers,
    no source checkout on the path: `equiv check --fixture tiny-g2 --golden` passes with the SSD
    properties run (their count printed)."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(tested_versions.constraints(transformers=""))
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SSM_EQUIV_FIXTURES")}
    done = subprocess.run([str(py), "-m", "pip", "install", "-q", "-c", str(constraints), str(wheel)],
                          capture_output=True, text=True, timeout=900, env=clean)
    assert done.returncode == 0, done.stderr[-3000:]
    probe = subprocess.run([str(py), "-c", "import importlib.util as u, equiv; print(equiv.__file__); "
                            "print(u.find_spec('torch'), u.find_spec('transformers'))"],
                           capture_output=True, text=True, cwd=tmp_path, env=clean)
    where, missing = probe.stdout.strip().splitlines()
    assert Path(where).is_relative_to(env_dir) and missing == "None None", probe.stdout
    work = tmp_path / "elsewhere"
    work.mkdir()
    run = subprocess.run([str(env_dir / "bin" / "equiv"), "check", "--fixture", "tiny-g2", "--golden",
                          "--property-examples", "3", "--out", "report"],
                         capture_output=True, text=True, cwd=work, env=clean, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "verdict: EQUIVALENT" in run.stdout
    summary = json.loads((work / "report" / "summary.json").read_text())
    ssd = summary["property_suites"]["SSD duality"]
    assert ssd["verdict"] == "pass"
    assert ssd["properties_run"] >= 9 and ssd["examples"] > 0
    assert [f["verdict"] for f in summary["fixtures"]] == ["pass"]
    assert summary["provenance"]["versions"].get("torch") is None
