"""The Mamba-3 family's reference runners, by the name a family description would give them:

    mamba_ssm   mamba_ssm 2.3.2.post1's Mamba3 mixer in its MambaLMHeadModel layout, on its Triton
                SISO / TileLang MIMO prefill and CuTe decode kernels (runner.py); a CUDA GPU
    oracle      the project's numpy Mamba-3 (equiv/mamba3/oracle.py, oracle_runner.py): float64 is
                the oracle, float32 a float32 run of the same code; any machine, no torch

mamba_ssm offers no float64 (its kernels compute in bfloat16/float32): its float64 counterpart is
`oracle(checkpoint_dir, "float64")`. On a machine without CUDA, `mamba_ssm` fails in one line; the
CPU tests build Mamba3SsmRunner(device="cpu", interpreter_adaptations=True) themselves.
"""

from __future__ import annotations

from pathlib import Path


def mamba_ssm(checkpoint_dir: str | Path, dtype: str = "float32", *, threads: int | None = 1,
              device: str = "cuda"):
    """mamba_ssm's Mamba3 on `device`; `threads` sets torch's intra-op threads (None: unchanged)."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    from equiv_reference.mamba3.runner import Mamba3SsmRunner

    return Mamba3SsmRunner(checkpoint_dir, dtype, device=device)


def oracle(checkpoint_dir: str | Path, dtype: str = "float64", *, threads: int | None = 1,
           device: str = "cpu"):
    """The numpy oracle in `dtype` (float64 or float32). numpy only: `threads` and `device` are accepted
    for the common signature; a device other than 'cpu' is refused."""
    from equiv_reference.mamba3.oracle_runner import Mamba3OracleRunner, OracleRunnerError

    if device != "cpu":
        raise OracleRunnerError(f"device: the numpy oracle runs on the CPU only, got {device!r}")
    return Mamba3OracleRunner(checkpoint_dir, dtype)
