"""Reference runners by name: what `equiv diff --reference NAME` and the main job load.

    transformers   transformers `Mamba2ForCausalLM`, torch fallback path (reference/transformers_runner.py)
    mamba_ssm      mamba_ssm `MambaLMHeadModel` with its Triton/CUDA kernels: needs a CUDA GPU
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
    a torch device for the transformers runner (its torch fallback path runs on CUDA too)."""
    if name not in REFERENCES:
        raise ReferenceUnavailable(f"reference: expected one of {list(REFERENCES)}, got {name!r}")
    if dtype not in DTYPES:
        raise ReferenceUnavailable(f"reference dtype: expected one of {list(DTYPES)}, got {dtype!r}")
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    if name == "mamba_ssm":
        if not torch.cuda.is_available():
            raise ReferenceUnavailable(
                "reference 'mamba_ssm': MambaLMHeadModel runs mamba_ssm's Triton/CUDA kernels and needs a "
                f"CUDA GPU; this machine has none (torch {torch.__version__}, torch.cuda.is_available() is "
                "False). Use --reference transformers here, or run on a GPU machine (nox -s gpu)")
        raise ReferenceUnavailable(
            "reference 'mamba_ssm': the MambaLMHeadModel runner is not implemented yet; use --reference "
            "transformers (its kernels are exercised at the SSD level by reference/gpu_run.py)")
    from reference.transformers_runner import TransformersRunner

    return TransformersRunner(checkpoint_dir, dtype, device=device)
