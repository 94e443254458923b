"""Write fixtures/manifest.json: every fixture directory, every file's sha256 and size, and how the
fixture was produced.

    python -m equiv_reference.manifest [--root fixtures]

Every directory under the root is a fixture, including ones other scripts write later
(fixtures/trained-bytes/, fixtures/golden/); empty directories are skipped. Per fixture the
"generator" record says which script and seed produced it and with which python / torch /
transformers, read from, in order:
  1. <dir>/generator.json   (equiv_reference.mamba2.make_fixtures writes one; other generators should too:
                             {"generator": "python -m ...", "seed": ..., "versions": {...}})
  2. <dir>/training.json    (equiv_reference.mamba2.train_byte_model's record)
  3. the previous manifest's record for that fixture
  4. otherwise an explicit "unknown" record.
Output is deterministic (sorted keys, no timestamps), so an unchanged tree rewrites the same bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from equiv.errors import FixtureIntegrityError
from equiv.fixtures import MANIFEST, SCHEMA, fixtures_root, read_manifest, scan_files

_VERSION_KEYS = ("python", "torch", "transformers", "numpy", "safetensors", "mamba_ssm")


def _from_training(record: dict) -> dict:
    # records written before the package was renamed carry no "generator": reference.train_byte_model
    return {"generator": record.get("generator", "reference.train_byte_model"),
            "seed": record.get("train_config", {}).get("seed"),
            "params": {"model_config": record.get("model_config"),
                       "train_config": record.get("train_config")},
            "versions": {k: v for k, v in record.get("versions", {}).items() if k in _VERSION_KEYS},
            "source": "training.json"}


def generator_of(directory: Path, previous: dict | None) -> dict:
    for name, convert in (("generator.json", lambda r: r | {"source": "generator.json"}),
                          ("training.json", _from_training)):
        path = directory / name
        if path.is_file():
            try:
                return convert(json.loads(path.read_text()))
            except (json.JSONDecodeError, AttributeError, TypeError) as e:
                raise FixtureIntegrityError(f"{path}: expected a JSON object describing the generator, "
                                            f"got {type(e).__name__}: {e}") from None
    if previous and "generator" in previous:
        return previous["generator"]
    return {"generator": "unknown", "source": f"no generator.json or training.json in {directory.name}/"}


def build_manifest(root: Path) -> dict:
    try:
        old = read_manifest(root)["fixtures"]
    except FixtureIntegrityError:
        old = {}
    fixtures = {}
    for directory in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        files = scan_files(directory)
        if not files:
            continue
        fixtures[directory.name] = {"files": files,
                                    "generator": generator_of(directory, old.get(directory.name)),
                                    "total_bytes": sum(f["size"] for f in files.values())}
    return {**SCHEMA, "fixtures": fixtures}


def write_manifest(root: str | Path | None = None) -> Path:
    root = fixtures_root(root)
    manifest = build_manifest(root)
    path = root / MANIFEST
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=None,
                    help="fixtures root (default: the repository's fixtures/)")
    args = ap.parse_args(argv)
    path = write_manifest(args.root)
    manifest = json.loads(path.read_text())
    for name, entry in manifest["fixtures"].items():
        print(f"{name:<20} {len(entry['files'])} files {entry['total_bytes']:>10,} B  "
              f"generator: {entry['generator'].get('generator')}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
