"""The bundled fixtures and their integrity: fixtures/<name>/ directories listed, with a sha256 and
size per file, in fixtures/manifest.json (written by `python -m equiv_reference.manifest`).

A fixture that does not match its manifest entry (a changed, missing or extra file) raises
`FixtureIntegrityError` naming every offending file with the expected and actual sha256, before
anything is computed from it: a silently regenerated or corrupted checkpoint would otherwise show
up as a numerical "divergence" with a misleading cause.

The root is SSM_EQUIV_FIXTURES if set, else the fixtures an installed wheel carries
(equiv/fixture_data/), else the repository's fixtures/.
No torch here: the golden-replay path runs where torch is not installed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from equiv.errors import EquivError, FixtureIntegrityError, clip, format_mismatches, quote, quote_path
from equiv.io.bounded import open_regular, probe, read_json_object_file

MANIFEST = "manifest.json"
SCHEMA = {"schema": "ssm-equiv/fixtures-manifest", "schema_version": 1}
IGNORED = frozenset({"__pycache__", ".DS_Store"})
"""Names never counted as fixture files (interpreter and OS droppings)."""


class UnknownFixture(EquivError):
    """A fixture name that is not in the manifest."""


PACKAGED = Path(__file__).resolve().parent / "fixture_data"
"""Where an installed wheel carries the fixtures (pyproject.toml maps the repository's fixtures/ there)."""
CHECKOUT = Path(__file__).resolve().parents[1] / "fixtures"
"""Where a source checkout (or an editable install of it) has them."""


def fixtures_root(root: str | Path | None = None) -> Path:
    if root is not None:
        return Path(root)
    env = os.environ.get("SSM_EQUIV_FIXTURES")
    if env:
        return Path(env)
    return PACKAGED if PACKAGED.is_dir() else CHECKOUT


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open_regular(path, "a fixture file", FixtureIntegrityError) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def scan_files(directory: Path) -> dict[str, dict]:
    """{relative posix path: {"sha256", "size"}} for every file under `directory`, sorted."""
    out = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if any(part in IGNORED for part in rel.parts) or not path.is_file():
            continue
        out[rel.as_posix()] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return out


def read_manifest(root: str | Path | None = None) -> dict:
    path = fixtures_root(root) / MANIFEST
    if probe(path, "a fixtures manifest", FixtureIntegrityError) is None:
        raise FixtureIntegrityError(f"fixtures manifest: expected {quote_path(path)}, it does not exist "
                                    "(write it with `python -m equiv_reference.manifest`)")
    manifest = read_json_object_file(path, "a fixtures manifest", error=FixtureIntegrityError)
    if {k: manifest.get(k) for k in SCHEMA} != SCHEMA:
        got = {k: manifest.get(k) for k in SCHEMA}
        raise FixtureIntegrityError(f"fixtures manifest {quote_path(path)}: expected {SCHEMA}, got "
                                    f"{clip(repr(got), 60)}")
    fixtures = manifest.get("fixtures")
    if not (isinstance(fixtures, dict) and all(isinstance(v, dict) and isinstance(v.get("files"), dict)
                                               for v in fixtures.values())):
        raise FixtureIntegrityError(f"fixtures manifest {quote_path(path)}: expected a 'fixtures' object of "
                                    "{name: {files: {...}}} entries")
    return manifest


def list_fixtures(root: str | Path | None = None) -> list[str]:
    """Fixture names in the manifest, sorted."""
    return sorted(read_manifest(root)["fixtures"])


def fixture_dir(name: str, root: str | Path | None = None) -> Path:
    """The directory of fixture `name` (must be in the manifest and exist)."""
    names = list_fixtures(root)
    if name not in names:
        raise UnknownFixture(f"fixture: expected one of {names}, got {quote(name)}")
    path = fixtures_root(root) / name
    if not path.is_dir():
        raise FixtureIntegrityError(f"fixture {quote(name)}: expected directory {quote_path(path)}, it "
                                    "does not exist")
    return path


def verify_fixture(name: str, root: str | Path | None = None) -> Path:
    """Check every file of fixture `name` against the manifest; return its directory.
    Raises FixtureIntegrityError listing every changed, missing and extra file at once."""
    path = fixture_dir(name, root)
    expected = read_manifest(root)["fixtures"][name]["files"]
    actual = scan_files(path)
    problems = []
    for rel in sorted(set(expected) | set(actual)):
        want, got = expected.get(rel), actual.get(rel)
        if got is None:
            problems.append(f"{rel}: missing (expected sha256 {want['sha256']}, {want['size']} bytes)")
        elif want is None:
            problems.append(f"{rel}: extra file not in the manifest "
                            f"(sha256 {got['sha256']}, {got['size']} bytes)")
        elif want["sha256"] != got["sha256"]:
            problems.append(f"{rel}: expected sha256 {want['sha256']} ({want['size']} bytes), "
                            f"got {got['sha256']} ({got['size']} bytes)")
    if problems:
        raise FixtureIntegrityError(format_mismatches(f"fixture {quote(name)} ({quote_path(path)}) does not "
                                                      f"match {quote_path(fixtures_root(root) / MANIFEST)}",
                                                      problems))
    return path
