"""Record the reference's outputs for the main job's inputs: `python -m reference.golden --out fixtures/golden`.

Runs exactly what `equiv check` runs (equiv/check.py `check_fixture`, same plan, same seeds) with
the live transformers runners wrapped in recorders, and writes one recording per fixture and dtype:
fixtures/golden/<fixture>/transformers-<dtype>.{safetensors,json}. `equiv check --golden` replays
them where torch is unavailable. Deterministic: same versions, same bytes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from equiv.check import check_fixture
from equiv.fixtures import fixture_dir, list_fixtures
from equiv.golden import RecordingRunner, save_recording
from equiv.ports import resolve_port
from reference.provenance import versions
from reference.registry import load_reference


def record(name: str, out_dir: Path) -> None:
    path = fixture_dir(name)
    recorders = {}

    def load_ref(p, dtype):
        recorders[dtype] = RecordingRunner(load_reference("transformers", p, dtype))
        return recorders[dtype]

    outcome = check_fixture(name, path, resolve_port("builtin"), load_ref, progress=lambda m: print(m, flush=True))
    target = out_dir / name
    target.mkdir(parents=True, exist_ok=True)
    for dtype, rec in recorders.items():
        save_recording(rec, target / f"transformers-{dtype}")
    print(f"{name}: recorded ({outcome.verdict} at recording time)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="fixtures/golden")
    ap.add_argument("--fixture", action="append", dest="fixtures")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.fixtures or [n for n in list_fixtures() if n != "golden"]:
        record(name, out)
    (out / "generator.json").write_text(json.dumps(
        {"generator": "python -m reference.golden", "seed": 0, "versions": versions()}, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
