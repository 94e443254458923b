"""Record the reference's outputs for the main job's inputs:

    python -m equiv_reference.golden --out fixtures/golden

Runs exactly what `equiv check` runs (equiv/check.py `check_fixture`, same plan, same seeds) with
the live runners of each fixture's family's default reference wrapped in recorders, and writes one
recording per fixture and dtype: fixtures/golden/<fixture>/<reference>-<dtype>.{safetensors,json}.
`equiv check --golden` replays them where torch is unavailable. Deterministic: same versions, same
bytes, on any x86 machine (torch's CPU kernels are pinned to AVX2, see `pin_cpu_kernels`);
generator.json records the versions and the kernel set that made them.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from equiv.check import check_fixture
from equiv.families import family_of_checkpoint
from equiv.fixtures import fixture_dir, list_fixtures
from equiv.golden import RecordingRunner, save_recording
from equiv.ports import resolve_port
from equiv.references import load_reference
from equiv_reference.provenance import versions

PINNED_CPU_CAPABILITY = "avx2"


def pin_cpu_kernels() -> str:
    """torch picks its CPU kernels by instruction set (ATEN_CPU_CAPABILITY, read once, at the first
    op), and its AVX512 and AVX2 float32 kernels round differently: tiny-g1's float32 recording
    regenerated on an AVX512 machine differed from the committed (AVX2) one in most logits, by up
    to 4.6e-5 (float64 identical). Pinned so the bytes do not depend on the CPU. Returns the
    capability torch really uses: another one if the CPU lacks AVX2 or a torch op already ran in
    this process (generator.json records it, so such a recording shows it)."""
    os.environ["ATEN_CPU_CAPABILITY"] = PINNED_CPU_CAPABILITY
    import torch

    return torch.backends.cpu.get_cpu_capability()


def generator_record() -> dict:
    """generator.json: what made the recordings; a regeneration is bit-identical when it matches."""
    capability = pin_cpu_kernels()
    return {"generator": "python -m equiv_reference.golden", "seed": 0,
            "versions": versions() | {"torch_cpu_capability": capability}}


def record(name: str, out_dir: Path) -> None:
    path = fixture_dir(name)
    fam = family_of_checkpoint(path)
    recorders = {}

    def load_ref(p, dtype):
        recorders[dtype] = RecordingRunner(load_reference(fam.default_reference, p, dtype, family=fam))
        return recorders[dtype]

    outcome = check_fixture(name, path, resolve_port("builtin", fam), load_ref,
                            progress=lambda m: print(m, flush=True))
    target = out_dir / name
    target.mkdir(parents=True, exist_ok=True)
    for dtype, rec in recorders.items():
        save_recording(rec, target / f"{fam.default_reference}-{dtype}")
    print(f"{name}: recorded ({outcome.verdict} at recording time)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="fixtures/golden")
    ap.add_argument("--fixture", action="append", dest="fixtures")
    args = ap.parse_args(argv)
    generator = generator_record()  # first: pins the CPU kernels before any torch op runs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.fixtures or [n for n in list_fixtures() if n != "golden"]:
        record(name, out)
    (out / "generator.json").write_text(json.dumps(generator, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
