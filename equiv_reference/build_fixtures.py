"""Every family's fixtures, then the golden recordings and the manifest (what `nox -s fixtures` runs):

    python -m equiv_reference.build_fixtures [--retrain] [--out fixtures]

Each family names its builders (equiv/families.py: `fixture_builders`, run with `--out`; trained
checkpoints by `trained_fixtures`, retrained only with --retrain, since they take minutes). Every
builder has fixed seeds, so a rebuild with the same versions is byte-identical.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from equiv.families import all_families


def run(*args: str) -> None:
    print("+ python -m " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", *args], check=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="fixtures")
    ap.add_argument("--retrain", action="store_true", help="also retrain the trained checkpoints")
    args = ap.parse_args(argv)
    for fam in all_families():
        for module in fam.fixture_builders:
            run(module, "--out", args.out)
        if args.retrain:
            for name, module in fam.trained_fixtures.items():
                run(module, "--out", str(Path(args.out) / name))
    run("equiv_reference.golden", "--out", str(Path(args.out) / "golden"))
    run("equiv_reference.manifest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
