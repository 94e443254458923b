"""The reference version matrix behind `nox -s references`: one leg per transformers release.

    python -m equiv_reference.version_matrix leg --label 5.24.0 --out references-report
    python -m equiv_reference.version_matrix table --out references-report

nox installs each release into the session's environment (noxfile.py) and runs `leg` there: the
reference-runner tests and the main job on one tiny fixture and the trained one, each in a
subprocess, their exit codes and the main job's summary.json kept in <out>/<label>/leg.json.
`table` prints one row per leg: the version that ran, whether the runs finished, the verdict, and
whether the dispatch record shows transformers' torch bodies running (chunk scan, conv, decode
step), the proof that the verdict came from the intended code path. It exits non-zero unless every
leg passed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

LEG_FIXTURES = ("tiny-g2", "trained-bytes")
LEG_TESTS = ("tests/test_transformers_runner.py", "tests/test_ssd_references.py")
LEG_SSD_EXAMPLES = 10
"""Per SSD property in each leg: the properties' budget comes from transformers' chunk scan, so
they run against every release, but a leg is a compatibility check, not the full suite."""
DISPATCH_KEYS = ("chunk_scan", "conv", "state_update")
"""The transformers functions whose torch body must have run in a leg's main job."""


def _installed_transformers() -> str:
    from importlib.metadata import version

    return version("transformers")


def dispatch_recorded(summary: dict) -> tuple[bool, str]:
    """(every key in DISPATCH_KEYS ran as 'torch fallback' with calls > 0, a short description),
    from each fixture's reference provenance after all its calls (layer-wise and decode)."""
    seen: dict[str, int] = dict.fromkeys(DISPATCH_KEYS, 0)
    bad = []
    for fx in summary.get("fixtures", []):
        for key, path in ((fx.get("reference") or {}).get("code_paths") or {}).items():
            if key in seen and path.get("calls"):
                if path.get("ran") != "torch fallback":
                    bad.append(f"{key} ran {path.get('ran')}")
                seen[key] += path["calls"]
    missing = [k for k, n in seen.items() if n == 0]
    if bad or missing:
        return False, "; ".join(bad + [f"{k} not recorded" for k in missing])
    return True, ", ".join(f"{k} x{n}" for k, n in seen.items())


def run_leg(label: str, out: Path, workers: int) -> dict:
    leg_dir = out / label
    leg_dir.mkdir(parents=True, exist_ok=True)
    version = _installed_transformers()
    print(f"references: leg {label}: transformers {version} installed", flush=True)
    t0 = time.perf_counter()
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", str(workers)]
    tests = subprocess.run([*pytest, *LEG_TESTS], text=True, capture_output=True)
    tests_line = ([ln for ln in tests.stdout.strip().splitlines() if ln.strip()] or ["(no output)"])[-1]
    print(f"references: leg {label}: reference-runner tests: {tests_line.strip('= ')}", flush=True)
    check_dir = leg_dir / "equivalence-report"
    fixtures = [a for name in LEG_FIXTURES for a in ("--fixture", name)]
    check = subprocess.run([sys.executable, "-m", "equiv.cli", "check", *fixtures, "--out", str(check_dir),
                            "--property-examples", str(LEG_SSD_EXAMPLES)], text=True, capture_output=True)
    summary_path = check_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    recorded, dispatch = dispatch_recorded(summary) if summary else (False, "no summary.json")
    err_tail = [ln for ln in check.stderr.strip().splitlines() if ln.strip()][-1:] if check.returncode else []
    leg = {"label": label, "transformers": version, "tests_returncode": tests.returncode,
           "tests": tests_line.strip("= "), "check_returncode": check.returncode,
           "verdict": summary.get("verdict", "no verdict"), "dispatch_recorded": recorded,
           "dispatch": dispatch, "check_error": err_tail[0][:300] if err_tail else None,
           "seconds": round(time.perf_counter() - t0, 1)}
    leg["passed"] = (tests.returncode == 0 and check.returncode == 0 and recorded
                     and leg["verdict"] == "equivalent")
    (leg_dir / "leg.json").write_text(json.dumps(leg, indent=1))
    (leg_dir / "tests.log").write_text(tests.stdout + tests.stderr)
    (leg_dir / "check.log").write_text(check.stdout + check.stderr)
    print(f"references: leg {label}: main job exit {check.returncode}, verdict {leg['verdict']}, "
          f"dispatch {'recorded' if recorded else 'NOT recorded'} ({leg['seconds']} s)", flush=True)
    return leg


def table(legs: list[dict]) -> str:
    rows = [("leg", "transformers", "runs", "verdict", "dispatch recorded", "")]
    for leg in legs:
        runs = "yes" if leg["tests_returncode"] == 0 and leg["check_returncode"] in (0, 1) else (
            f"no (tests exit {leg['tests_returncode']}, check exit {leg['check_returncode']})")
        rows.append((leg["label"], leg["transformers"], runs, leg["verdict"].upper(),
                     "yes" if leg["dispatch_recorded"] else "NO", "PASS" if leg["passed"] else "FAIL"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    for leg in legs:
        if leg.get("check_error"):
            lines.append(f"{leg['label']}: {leg['check_error']}")
    return "\n".join(lines)


def read_legs(out: Path, labels: list[str] | None) -> list[dict]:
    paths = [out / label / "leg.json" for label in labels] if labels else sorted(out.glob("*/leg.json"))
    return [json.loads(p.read_text()) for p in paths if p.is_file()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m equiv_reference.version_matrix")
    sub = parser.add_subparsers(dest="cmd", required=True)
    leg = sub.add_parser("leg")
    leg.add_argument("--label", required=True)
    leg.add_argument("--out", type=Path, default=Path("references-report"))
    leg.add_argument("-n", "--workers", type=int, default=2)
    tab = sub.add_parser("table")
    tab.add_argument("--out", type=Path, default=Path("references-report"))
    tab.add_argument("--labels", nargs="*", default=None)
    args = parser.parse_args(argv)
    if args.cmd == "leg":
        return 0 if run_leg(args.label, args.out, args.workers)["passed"] else 1
    legs = read_legs(args.out, args.labels)
    text = table(legs)
    print(text)
    (args.out / "matrix.md").write_text("```\n" + text + "\n```\n")
    (args.out / "matrix.json").write_text(json.dumps(legs, indent=1))
    return 0 if legs and all(leg["passed"] for leg in legs) else 1


if __name__ == "__main__":
    sys.exit(main())
