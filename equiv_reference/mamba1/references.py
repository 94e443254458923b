"""The Mamba-1 family's reference runners, as equiv/mamba1/family.py names them:

    transformers   transformers `MambaForCausalLM` / `FalconMambaForCausalLM`, torch path with its
                   sequential selective scan (transformers_runner.py)

Asked for float64 it is the oracle: the same model with every internal float32 cast lifted.
"""

from __future__ import annotations

from pathlib import Path

import torch


def transformers(checkpoint_dir: str | Path, dtype: str = "float32", *, threads: int | None = 1,
                 device: str = "cpu"):
    """transformers' torch path on `device`; `threads` sets torch's intra-op threads (None: unchanged)."""
    if threads is not None:
        torch.set_num_threads(threads)
    from equiv_reference.mamba1.transformers_runner import MambaTransformersRunner

    return MambaTransformersRunner(checkpoint_dir, dtype, device=device)
