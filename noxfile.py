"""nox sessions for ssm-equiv. `nox -s equivalence` is the main job; `nox -s tests` is CI's.

Every session installs the project with the extras it needs, constrained by constraints.txt (which
pins the CPU build of torch: an unpinned torch pulls a multi-GB CUDA build). Versions and extras come
from pyproject.toml; posargs pass through.
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["tests", "lint"]
nox.options.error_on_external_run = True

ROOT = Path(__file__).parent
CONSTRAINTS = ("-c", str(ROOT / "constraints.txt"))
MAMBA_SSM = "mamba-ssm==2.3.2.post1"
MAMBA2_JAX = "mamba2-jax==1.1.2"


def install_project(session: nox.Session, *extras: str) -> None:
    spec = f".[{','.join(extras)}]" if extras else "."
    session.install(*CONSTRAINTS, "-e", spec)


def install_mamba_ssm(session: nox.Session) -> None:
    """mamba_ssm's pure-torch references on a CPU machine. Its PyPI release is a source
    distribution: MAMBA_FORCE_BUILD skips the prebuilt-wheel download (which fails offline), and it
    must build against the torch already installed (--no-build-isolation). Without CUDA only its
    Python files are usable; equiv_reference/mamba_ssm_refs.py imports them without its __init__."""
    session.install(*CONSTRAINTS, "einops", "triton", "setuptools", "wheel", "packaging", "ninja")
    session.install("--no-build-isolation", "--no-deps", MAMBA_SSM,
                    env={"MAMBA_FORCE_BUILD": "TRUE", "MAMBA_SKIP_CUDA_BUILD": "TRUE"})


@nox.session(python="3.11")
def equivalence(session: nox.Session) -> None:
    """The main job: every bundled fixture through the layer-wise diff, the greedy decode match and
    the SSD duality properties; prints a summary, writes equivalence-report/, exits non-zero on any
    failure. `--golden` compares against fixtures/golden/ instead of running torch."""
    golden = "--golden" in session.posargs
    if golden:
        install_project(session, "test", "report")
    else:
        install_project(session, "reference", "test", "report")
        install_mamba_ssm(session)
    session.run("equiv", "check", "--out", "equivalence-report", *session.posargs)


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    """The test suite (pytest + hypothesis, ci profile), fanned out over the machine's cores."""
    install_project(session, "reference", "test", "report", "mamba2-jax")
    install_mamba_ssm(session)
    workers = os.environ.get("SSM_EQUIV_WORKERS", "2")
    session.run("pytest", "-n", workers, *session.posargs)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff over the project."""
    session.install(*CONSTRAINTS, "ruff")
    session.run("ruff", "check", "equiv", "equiv_reference", "tests", "noxfile.py", *session.posargs)


@nox.session(python="3.11", default=False)
def fixtures(session: nox.Session) -> None:
    """Regenerate fixtures/ (tiny checkpoints, golden reference outputs, manifest) with fixed seeds.
    The trained checkpoint is only retrained with `-- --retrain` (about 12 minutes on 2 cores)."""
    install_project(session, "reference", "test")
    session.run("python", "-m", "equiv_reference.make_fixtures", "--out", "fixtures")
    if "--retrain" in session.posargs:
        session.run("python", "-m", "equiv_reference.train_byte_model", "--out", "fixtures/trained-bytes")
    session.run("python", "-m", "equiv_reference.golden", "--out", "fixtures/golden")
    session.run("python", "-m", "equiv_reference.manifest")


@nox.session(python="3.11", default=False)
def bench(session: nox.Session) -> None:
    """Prefill tokens/s and decode ms/token of this port against transformers and mamba2-jax 1.1.2 on
    a 130m-shaped model, one run, same machine. Prints figures; asserts nothing."""
    install_project(session, "reference", "mamba2-jax")
    session.run("python", "-m", "equiv_reference.bench", *session.posargs)


@nox.session(python=False, default=False)
def gpu(session: nox.Session) -> None:
    """On a GPU machine whose Python already has CUDA torch and CUDA jax: the equivalence checks
    against mamba_ssm's Triton kernels and the GPU benchmark, in the current environment."""
    session.run("python", "-m", "equiv_reference.gpu_run", *session.posargs)
