"""The README's figures and layout are checked against the code: every budget, guard and factor it
quotes comes from equiv/compare.py TOLERANCES, the supported transformers releases from
equiv/tested_versions.toml, its layout names every module (and only modules that exist), and every
`nox -s` session it names is in noxfile.py."""

from __future__ import annotations

import re
from pathlib import Path

from equiv import tested_versions
from equiv.compare import FLOOR_ULPS, tolerance

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def test_quoted_budgets_guards_and_factors_are_the_table():
    f32 = {k: tolerance("float32", k).budget for k in ("error_budget", "error_budget_accumulated",
                                                       "max_error_guard", "max_error_guard_accumulated",
                                                       "near_tie_factor")}
    bf16 = {k: tolerance("bfloat16", k).budget for k in ("error_budget", "error_budget_accumulated")}
    text = _flat(README)
    for claim in (f"the budget is {f32['error_budget']:.1f} per op",
                  f"and {f32['error_budget_accumulated']:g} in accumulated mode",
                  f"The guard is {f32['max_error_guard']:g}x per op (isolated mode) and "
                  f"{f32['max_error_guard_accumulated']:g}x in accumulated mode",
                  f"bfloat16 uses {bf16['error_budget']:.1f} and {bf16['error_budget_accumulated']:.1f}",
                  f"`near_tie_factor` ({f32['near_tie_factor']:g})",
                  f"`floor` is {FLOOR_ULPS} ULPs"):
        assert claim in text, claim


def test_the_supported_range_table_is_the_tested_versions_file():
    rows = re.findall(r"^\| (\d+\.\d+\.\d+) \| ([^|]+) \|$", README, re.M)
    assert [v for v, _ in rows] == tested_versions.supported_transformers()
    assert "the pin" in dict(rows)[tested_versions.supported_transformers()[-1]]


def test_the_layout_names_every_module_and_only_existing_ones():
    layout = README[README.index("## Layout"):README.index("## Installing the references")]
    named = set(re.findall(r"([a-z_0-9]+\.py)\b", layout))
    folders = set(re.findall(r"^\s*([a-z_0-9]+)/", layout, re.MULTILINE))
    for top in ("equiv", "equiv_reference"):
        for path in (ROOT / top).rglob("*.py"):
            if path.name != "__init__.py" and not path.name.startswith(("bench", "gpu_")):
                assert path.name in named, f"{path.relative_to(ROOT)} is not in the README's layout"
        for package in (ROOT / top).glob("*/__init__.py"):
            folder = package.parent.name
            assert folder in folders, f"{top}/{folder}/ is not in the README's layout"
    every = {p.name for p in ROOT.glob("equiv*/**/*.py")}
    assert named <= every, named - every
    families = {p.parent.name for p in ROOT.glob("equiv/*/family.py")}
    assert {"mamba1", "mamba2"} <= families
    for fam in families:  # each family has a folder on both sides
        assert (ROOT / "equiv_reference" / fam / "__init__.py").is_file(), fam


def test_every_nox_session_the_readme_names_exists():
    sessions = set()
    for deco, func in re.findall(r"@nox\.session\(([^)]*)\)\ndef (\w+)", (ROOT / "noxfile.py").read_text()):
        named = re.search(r'name="([\w-]+)"', deco)
        sessions.add(named.group(1) if named else func)
    assert {"equivalence", "tests", "gpu-bench"} <= sessions
    named = set(re.findall(r"nox -s ([\w-]+)", README))
    assert named and named <= sessions, named - sessions
