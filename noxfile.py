"""nox sessions for ssm-equiv. `nox -s equivalence` is the main job; `nox -s tests` is CI's.

Every session installs exact versions: equiv/tested_versions.toml is the one source, turned here
into a pip constraints file (.nox/constraints/*.txt), so a new release on the package index never
changes a verdict. It pins the CPU build of torch (an unpinned torch pulls a multi-GB CUDA build)
and the newest supported transformers; `nox -s references` runs the main job against every
supported transformers release and the newest the index serves. Posargs pass through.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["tests", "lint"]
nox.options.error_on_external_run = True

ROOT = Path(__file__).parent
sys.path.insert(0, str(ROOT))
from equiv import tested_versions  # noqa: E402 - stdlib-only module (equiv/__init__ imports nothing)

SUPPORTED = tested_versions.supported_transformers()


def constraints(transformers: str | None = None) -> tuple[str, str]:
    """('-c', path) of a pip constraints file from equiv/tested_versions.toml: the verdict pins and
    tools, plus `transformers` (default: the newest supported) with its pinned dependencies; ""
    leaves transformers and its dependencies free (the matrix's "newest" leg)."""
    name = "free" if transformers == "" else (transformers or SUPPORTED[-1])
    path = ROOT / ".nox" / "constraints" / f"transformers-{name}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tested_versions.constraints(transformers))
    return "-c", str(path)


def install_project(session: nox.Session, *extras: str, transformers: str | None = None) -> None:
    spec = f".[{','.join(extras)}]" if extras else "."
    session.install(*constraints(transformers), "-e", spec)


def install_mamba_ssm(session: nox.Session, transformers: str | None = None) -> None:
    """mamba_ssm's pure-torch references on a CPU machine. Its PyPI release is a source
    distribution: MAMBA_FORCE_BUILD skips the prebuilt-wheel download (which fails offline), and it
    must build against the torch already installed (--no-build-isolation). Without CUDA only its
    Python files are usable; equiv_reference/mamba_ssm_refs.py imports them without its __init__."""
    c = constraints(transformers)
    session.install(*c, "einops", "triton", "setuptools", "wheel", "packaging", "ninja")
    session.install(*c, "--no-build-isolation", "--no-deps", "mamba-ssm",
                    env={"MAMBA_FORCE_BUILD": "TRUE", "MAMBA_SKIP_CUDA_BUILD": "TRUE"})


@nox.session(python="3.11")
def equivalence(session: nox.Session) -> None:
    """The main job: every bundled fixture through the layer-wise diff, the greedy decode match and
    the SSD duality properties; prints a summary, writes equivalence-report/, exits non-zero on any
    failure. `--golden` compares against fixtures/golden/ instead of running torch, and installs
    neither torch nor transformers."""
    golden = "--golden" in session.posargs
    if golden:
        install_project(session, "report")
    else:
        install_project(session, "reference", "report")
        install_mamba_ssm(session)
    session.run("equiv", "check", "--out", "equivalence-report", *session.posargs)


def install_chromium_in_ci(session: nox.Session) -> None:
    """Debian's chromium, for the test that renders the HTML report in a real headless browser
    (tests/test_report_browser.py), on a CI machine (CI set) where apt-get runs as root and no
    chromium is installed. Elsewhere, or if apt fails, that test skips and says why."""
    if (os.environ.get("CI") and shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0
            and not Path("/usr/bin/chromium").exists()):
        session.log("installing Debian's chromium for the browser test of the HTML report")
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
            session.run(*cmd, external=True, success_codes=range(256),
                        env={"DEBIAN_FRONTEND": "noninteractive"})


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    """The test suite (pytest + hypothesis, ci profile), fanned out over the machine's cores."""
    install_chromium_in_ci(session)
    install_project(session, "reference", "test", "report", "mamba2-jax", "mamba3-jax")
    install_mamba_ssm(session)
    workers = os.environ.get("SSM_EQUIV_WORKERS", "2")
    session.run("pytest", "-n", workers, *session.posargs)


@nox.session(python="3.11", default=False)
def references(session: nox.Session) -> None:
    """The reference version matrix: for each supported transformers release (each pinned exactly)
    and the newest the index serves, the reference-runner tests and the main job on one tiny and the
    trained fixture, then one table (references-report/matrix.md). `nox -s references -- 5.24.0`
    runs chosen legs ("newest" is one). Everything but transformers stays on the pins."""
    legs = session.posargs or [*SUPPORTED, "newest"]
    unknown = [leg for leg in legs if leg != "newest" and leg not in SUPPORTED]
    if unknown:
        session.log(f"note: {unknown} not in equiv/tested_versions.toml's supported list; running anyway")
    install_project(session, "test", "report", transformers="")
    session.install(*constraints(""), "torch", "einops")
    install_mamba_ssm(session, transformers="")
    out = ROOT / "references-report"
    matrix = ("python", "-m", "equiv_reference.version_matrix")
    for leg in legs:
        # a clean leg: transformers and what only some releases pull in (kernels from 5.25)
        session.run("python", "-m", "pip", "uninstall", "-q", "-y", "transformers", "kernels")
        if leg == "newest":
            session.install(*constraints(""), "--upgrade", "transformers")
        else:
            session.install(*constraints(leg), f"transformers=={leg}")
        session.run(*matrix, "leg", "--label", leg, "--out", str(out), success_codes=[0, 1])
    session.run(*matrix, "table", "--out", str(out), "--labels", *legs)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff over the project."""
    session.install(*constraints(), "ruff")
    session.run("ruff", "check", "equiv", "equiv_reference", "tests", "noxfile.py", *session.posargs)


@nox.session(python="3.11", default=False)
def fixtures(session: nox.Session) -> None:
    """Regenerate fixtures/ (every family's tiny checkpoints, golden reference outputs, manifest) with
    fixed seeds. Trained checkpoints are only retrained with `-- --retrain` (Mamba-2's about 12
    minutes on 2 cores, Mamba-1's about 4)."""
    install_project(session, "reference", "test")
    session.run("python", "-m", "equiv_reference.build_fixtures", *session.posargs)


@nox.session(python="3.11", default=False)
def bench(session: nox.Session) -> None:
    """Prefill tokens/s and decode ms/token of this port against transformers and mamba2-jax 1.1.2 on
    a 130m-shaped model, one run, same machine. Prints figures; asserts nothing."""
    install_project(session, "reference", "mamba2-jax")
    session.run("python", "-m", "equiv_reference.mamba2.bench", *session.posargs)


@nox.session(python=False, default=False)
def gpu(session: nox.Session) -> None:
    """On a GPU machine whose Python already has CUDA torch and CUDA jax: the equivalence checks
    against mamba_ssm's Triton kernels and the GPU benchmark, in the current environment."""
    session.run("python", "-m", "equiv_reference.mamba2.gpu_run", *session.posargs)


@nox.session(name="gpu-bench", python=False, default=False)
def gpu_bench(session: nox.Session) -> None:
    """On a GPU machine whose Python already has CUDA jax, CUDA torch and mamba_ssm: the same-run
    benchmark of the port and mamba_ssm (130m and 2.7b shapes, bf16 and fp32, prefill tok/s with
    MFU, decode ms/token with HBM utilisation, ratios to mamba_ssm); posargs go to the script
    (equiv_reference/mamba2/gpu_bench.py), e.g. `-- --models 2.7b --dtypes bfloat16`."""
    session.run("python", "-m", "equiv_reference.mamba2.gpu_bench", *session.posargs)
