"""`equiv check`: the main job (see equiv/check.py), as run by `nox -s equivalence`.

    equiv check [CHECKPOINT_DIR ...] [--fixture NAME ...] [--golden] [--port NAME|module:attr]
                [--no-properties] [--allow-not-run] [--property-examples N] [-n N]
                [--out DIR]

With no CHECKPOINT_DIR and no --fixture: every bundled fixture. A CHECKPOINT_DIR is any checkpoint
the port and the reference load, checked the same way (layer-wise diff in both modes, the greedy
decode match), with inputs planned from what the loaded port declares (equiv/ports.py).

Exit codes: 0 everything equivalent, 1 any divergence, 2 usage or input error, 3 a check could not
run (NOT RUN, with its reason; `--allow-not-run` accepts that and exits 0 if the rest passed).
"""

from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("check",
                              help="the main job: every fixture, layer-wise + decode + property suites",
                              description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="*", type=Path, metavar="CHECKPOINT_DIR",
                   help="checkpoint directories to check like a fixture (live reference only)")
    p.add_argument("--fixture", action="append", dest="fixtures", metavar="NAME",
                   help="check only this bundled fixture (repeatable); default with no CHECKPOINT_DIR: "
                        "every bundled fixture")
    p.add_argument("--golden", action="store_true",
                   help="replay recorded reference outputs (fixtures/golden/) instead of running torch")
    p.add_argument("--port", default="builtin",
                   help="a family's port name or module:attr (default: builtin, each family's own port; a "
                        "named port checks its family's fixtures)")
    p.add_argument("--no-properties", action="store_true",
                   help="skip the families' property suites (NOT RUN: exit 3 unless --allow-not-run)")
    p.add_argument("--allow-not-run", action="store_true",
                   help="a check that could not run does not fail the job (it is still reported NOT RUN)")
    p.add_argument("--property-examples", type=int, default=None, metavar="N",
                   help="hypothesis examples per property (default: each suite's own)")
    p.add_argument("-n", "--workers", type=int, default=None, metavar="N",
                   help="check fixtures and property suites in N processes (same results, same report, "
                        "any N; default: the machine's cores, at most 4)")
    p.add_argument("--out", default="equivalence-report",
                   help="report directory (default: equivalence-report)")
    p.set_defaults(func=run_check)


def run_check(args, progress) -> int:
    from equiv.check import default_workers, run_main_job
    from equiv.errors import EquivError

    if args.workers is not None and args.workers < 1:
        raise EquivError(f"--workers: expected a number of processes >= 1, got {args.workers}")
    return run_main_job(args.fixtures, Path(args.out), golden=args.golden, port_spec=args.port,
                        properties=not args.no_properties, progress=progress.stage,
                        workers=default_workers() if args.workers is None else args.workers,
                        allow_not_run=args.allow_not_run, property_examples=args.property_examples,
                        checkpoints=args.checkpoints)
