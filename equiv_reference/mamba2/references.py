"""The Mamba-2 family's reference runners, as equiv/mamba2/family.py names them:

    transformers   transformers `Mamba2ForCausalLM`, torch fallback path (transformers_runner.py)
    mamba_ssm      mamba_ssm `MambaLMHeadModel`, Triton kernels on CUDA (mamba_ssm_runner.py)

The float64 oracle of either is transformers' model in float64 (`load_oracle`): mamba_ssm's Triton
kernels have no float64 path, and the two models compute the same math. Asking either for float64
returns that oracle; its provenance names the reference it stands for.
"""

from __future__ import annotations

from pathlib import Path

import torch

from equiv.references import ReferenceUnavailable


def _threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def transformers(checkpoint_dir: str | Path, dtype: str = "float32", *, threads: int | None = 1,
                 device: str = "cpu"):
    """transformers' torch fallback path, on `device` (it runs on CUDA too)."""
    _threads(threads)
    from equiv_reference.mamba2.transformers_runner import TransformersRunner

    return TransformersRunner(checkpoint_dir, dtype, device=device)


def mamba_ssm(checkpoint_dir: str | Path, dtype: str = "float32", *, threads: int | None = 1,
              device: str = "cpu"):
    """mamba_ssm's kernels, always on CUDA (the default "cpu" means "cuda" here); float64 gives the
    oracle on `device`."""
    _threads(threads)
    if dtype == "float64":
        return load_oracle("mamba_ssm", checkpoint_dir, threads=None)
    if not torch.cuda.is_available():
        raise ReferenceUnavailable(
            "reference 'mamba_ssm': MambaLMHeadModel runs mamba_ssm's Triton/CUDA kernels and needs a "
            f"CUDA GPU; this machine has none (torch {torch.__version__}, torch.cuda.is_available() is "
            "False). Use --reference transformers here, or run on a GPU machine (nox -s gpu)")
    from equiv_reference.mamba2.mamba_ssm_runner import MambaSsmRunner

    return MambaSsmRunner(checkpoint_dir, dtype, device="cuda" if device == "cpu" else device)


class OracleFor:
    """transformers' float64 runner standing in as the oracle of another reference: delegates
    everything, and says in its provenance which reference it is the oracle for."""

    def __init__(self, runner, reference: str):
        self._runner, self._reference = runner, reference

    def __getattr__(self, attr):
        return getattr(self._runner, attr)

    def provenance(self) -> dict:
        return {**self._runner.provenance(), "oracle_for": self._reference,
                "oracle_why": "the float64 oracle of every reference is transformers' Mamba2ForCausalLM in "
                              "float64 (torch fallback, float32 casts lifted): mamba_ssm's Triton kernels "
                              "have no float64 path and MambaLMHeadModel computes the same math"}


def load_oracle(name: str, checkpoint_dir: str | Path, *, threads: int | None = 1, device: str = "cpu"):
    """The float64 oracle for reference `name`: transformers' model in float64, on `device`."""
    if name not in ("transformers", "mamba_ssm"):
        raise ReferenceUnavailable(f"reference: expected one of ['transformers', 'mamba_ssm'], got {name!r}")
    _threads(threads)
    from equiv_reference.mamba2.transformers_runner import TransformersRunner

    runner = TransformersRunner(checkpoint_dir, "float64", device=device)
    return runner if name == "transformers" else OracleFor(runner, name)
