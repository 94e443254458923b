"""The family registry: every checkpoint finds its family from config.json, every name a family
gives resolves, and the package graph has no cycles (the harness never imports a torch module or a
family's code except through the registry's strings; no family imports another)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from equiv.families import FAMILIES, UnknownFamily, all_families, family, family_for_config, import_attr
from equiv.fixtures import fixture_dir, list_fixtures

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every module an `import` / `from ... import` in the file names, at any depth (lazy imports
    inside functions count: they are dependencies too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def module_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names} | {
        n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}


def test_the_jax_side_never_imports_the_torch_side():
    """Never the torch side (at any depth: its names come through the registry's strings); torch
    itself only inside a function (reading a .bin checkpoint), so `import equiv` needs no torch."""
    offenders = [f"{p.relative_to(ROOT)} imports {m}" for p in (ROOT / "equiv").rglob("*.py")
                 for m in imported_modules(p) if m.split(".")[0] == "equiv_reference"]
    offenders += [f"{p.relative_to(ROOT)} imports {m} at module level" for p in (ROOT / "equiv").rglob("*.py")
                  for m in module_level_imports(p) if m.split(".")[0] == "torch"]
    assert offenders == []


@pytest.mark.parametrize("top", ["equiv", "equiv_reference"])
def test_no_family_imports_another_and_the_harness_imports_none(top):
    names = set(FAMILIES)
    offenders = []
    for p in (ROOT / top).rglob("*.py"):
        rel = p.relative_to(ROOT / top).parts
        own = rel[0] if len(rel) > 1 and rel[0] in names else None
        for m in imported_modules(p):
            parts = m.split(".")
            if len(parts) > 1 and parts[0] in ("equiv", "equiv_reference") and parts[1] in names:
                if parts[1] != own and not (p.name == "family.py" and m == "equiv.families"):
                    offenders.append(f"{p.relative_to(ROOT)} imports {m}")
    # the harness may name families only as 'module:attr' strings in equiv/families.py
    assert offenders == []


def test_every_bundled_fixture_belongs_to_a_family_and_every_family_has_fixtures():
    seen = {}
    for name in list_fixtures():
        if name == "golden":
            continue
        raw = json.loads((fixture_dir(name) / "config.json").read_text())
        seen.setdefault(family_for_config(raw).name, []).append(name)
    assert set(seen) == set(FAMILIES), seen
    for fam, names in seen.items():  # a trained checkpoint per family, so greedy decode means something,
        # or the family says why it has none (its decode plan then leans on near-tie classification)
        trained = any((fixture_dir(n) / "training.json").is_file() for n in names)
        assert trained or family(fam).notes.get("untrained"), (fam, names)


@pytest.mark.parametrize("raw, expected", [
    ({"model_type": "mamba2"}, "mamba2"),
    ({"model_type": "mamba"}, "mamba1"),
    ({"model_type": "falcon_mamba"}, "mamba1"),
    ({"ssm_cfg": {"layer": "Mamba2"}, "n_layer": 2}, "mamba2"),
    ({"ssm_cfg": {}, "n_layer": 2}, "mamba1"),  # mamba_ssm's create_block: no layer means Mamba1
])
def test_family_for_config(raw, expected):
    assert family_for_config(raw).name == expected


@pytest.mark.parametrize("raw, got", [
    ({"model_type": "llama"}, "got model_type 'llama'"),
    ({"ssm_cfg": {"layer": "Mamba9"}}, "ssm_cfg.layer 'Mamba9'"),
    ({"d_model": 8}, "got neither a model_type nor a mamba_ssm ssm_cfg"),
    ([1, 2], "expected a JSON object, got a JSON list"),
    (None, "expected a JSON object, got null"),
    ({"model_type": "x\n\x1b[31m" + "y" * 5000}, "got model_type 'x\\n\\x1b[31myyy"),
])
def test_an_unknown_architecture_is_one_line_naming_every_family(raw, got):
    with pytest.raises(UnknownFamily) as e:
        family_for_config(raw)
    message = str(e.value)
    assert "\n" not in message and got in message
    for fam in all_families():
        assert fam.name in message and all(t in message for t in fam.model_types)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_name_a_family_gives_resolves(name):
    fam = family(name)
    assert fam.name == name and fam.default_reference in fam.references and "builtin" in fam.ports
    suite = fam.properties
    for target in (fam.ports["builtin"], suite.run, suite.torch_free_references, suite.references,
                   *fam.references.values()):
        assert callable(import_attr(target, target)), target
    for module in (*fam.fixture_builders, *fam.trained_fixtures.values()):
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), module
    for name in fam.trained_fixtures:
        assert (fixture_dir(name) / "training.json").is_file(), name
