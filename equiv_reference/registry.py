"""Reference runners by name: what `equiv diff --reference NAME` and the main job load.

    transformers   transformers `Mamba2ForCausalLM`, torch fallback path
                   (equiv_reference/transformers_runner.py)
    mamba_ssm      mamba_ssm `MambaLMHeadModel`, Triton kernels on CUDA (equiv_reference/mamba_ssm_runner.py)

The float64 oracle of either is transformers' model in float64 (`load_oracle`): mamba_ssm's Triton
kernels have no float64 path, and the two models compute the same math. `load_reference(NAME, dir,
"float64")` returns that oracle for either name, so every caller that builds "the reference in
float64" (equiv diff, the main job) gets it; its provenance names the reference it stands for.
"""

from __future__ import annotations

from pathlib import Path

from equiv.errors import EquivError

REFERENCES = ("transformers", "mamba_ssm")
DTYPES = ("float32", "float64", "bfloat16")

DEFAULT_THREADS = 1
"""torch intra-op threads for the reference. Measured on the 2-core CI machine while other jobs
ran: a tiny-g2 decode step took 0.27 s with 2 threads and 7 ms with 1 (OpenMP workers spinning on
an oversubscribed box); the fixtures are far too small for threads to pay. Recorded in provenance."""


class ReferenceUnavailable(EquivError):
    """The named reference cannot run here (unknown name, or it needs hardware this machine lacks)."""


def load_reference(name: str, checkpoint_dir: str | Path, dtype: str = "float32", *,
                   threads: int | None = DEFAULT_THREADS, device: str = "cpu"):
    """A runner with run / step_logits / generate / provenance (see transformers_runner.py).
    `threads` sets torch's intra-op thread count (process-wide); None leaves it alone. `device` is
    a torch device for the transformers runner (its torch fallback path runs on CUDA too); mamba_ssm
    always runs on CUDA (the default "cpu" means "cuda" there). float64 gives `load_oracle(name)`."""
    if name not in REFERENCES:
        raise ReferenceUnavailable(f"reference: expected one of {list(REFERENCES)}, got {name!r}")
    if dtype not in DTYPES:
        raise ReferenceUnavailable(f"reference dtype: expected one of {list(DTYPES)}, got {dtype!r}")
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    if name == "mamba_ssm":
        if dtype == "float64":
            return load_oracle(name, checkpoint_dir, threads=None)
        if not torch.cuda.is_available():
            raise ReferenceUnavailable(
                "reference 'mamba_ssm': MambaLMHeadModel runs mamba_ssm's Triton/CUDA kernels and needs a "
                f"CUDA GPU; this machine has none (torch {torch.__version__}, torch.cuda.is_available() is "
                "False). Use --reference transformers here, or run on a GPU machine (nox -s gpu)")
        from equiv_reference.mamba_ssm_runner import MambaSsmRunner

        return MambaSsmRunner(checkpoint_dir, dtype, device="cuda" if device == "cpu" else device)
    from equiv_reference.transformers_runner import TransformersRunner

    return TransformersRunner(checkpoint_dir, dtype, device=device)


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


def load_oracle(name: str, checkpoint_dir: str | Path, *, threads: int | None = DEFAULT_THREADS,
                device: str = "cpu"):
    """The float64 oracle for reference `name`: transformers' model in float64, on `device`."""
    if name not in REFERENCES:
        raise ReferenceUnavailable(f"reference: expected one of {list(REFERENCES)}, got {name!r}")
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    from equiv_reference.transformers_runner import TransformersRunner

    runner = TransformersRunner(checkpoint_dir, "float64", device=device)
    return runner if name == "transformers" else OracleFor(runner, name)
