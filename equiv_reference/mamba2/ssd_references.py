"""The torch side's references object for the SSD properties (equiv.mamba2.ssd_harness.SSDReferences).

The float64 oracle is the torch sequential recurrence (`ssd_oracle_fp64`); the float32 counterpart
of each equiv.mamba2.ssd form is the torch code it was checked against: chunked -> transformers'
`mamba2_chunk_scan` torch fallback at the same chunk size; quadratic -> the same at one chunk of
the whole length (its diagonal block is the quadratic form); scan and step -> the recurrence in
float32 (what `selective_state_update` does token by token).
"""

from __future__ import annotations

import numpy as np
import torch

import equiv
from equiv_reference.mamba2 import ssd_oracles


class TorchSSDReferences:
    """The budget from torch: what the pytest suite uses. Construct it after choosing torch's
    thread count (the test harness sets one thread per xdist worker)."""

    name = "torch"

    def oracle(self, kw: dict) -> tuple[np.ndarray, np.ndarray]:
        return ssd_oracles.ssd_oracle_fp64(**kw)

    def reference(self, form: str, kw: dict, chunk_size: int | None = None):
        if form == "chunked":
            return ssd_oracles.transformers_chunk_scan(**kw, chunk_size=chunk_size)
        if form == "quadratic":
            return ssd_oracles.transformers_chunk_scan(**kw, chunk_size=kw["x"].shape[1])
        if form in ("scan", "step"):
            return ssd_oracles.ssd_oracle_fp64(**kw, dtype=torch.float32)
        raise ValueError(f"form: expected chunked, quadratic, scan or step, got {form!r}")

    def provenance(self) -> dict:
        """What computed the budget. The chunk scan's binding (its torch fallback, or a kernel
        transformers bound at import) is reported as transformers_chunk_scan_provenance says, or
        as the error it raised."""
        try:
            chunk_scan = ssd_oracles.transformers_chunk_scan_provenance()
        except Exception as exc:  # reported, not fatal: the calls check it
            chunk_scan = {"error": f"{type(exc).__name__}: {exc}"}
        return {
            "name": self.name,
            "oracle": "equiv_reference.mamba2.ssd_oracles.ssd_oracle_fp64 (sequential recurrence, "
                      "torch float64)",
            "chunked": "equiv_reference.mamba2.ssd_oracles.transformers_chunk_scan (transformers' "
                       "mamba2_chunk_scan, torch float32)",
            "sequential": "equiv_reference.mamba2.ssd_oracles.ssd_oracle_fp64(dtype=torch.float32)",
            "transformers_chunk_scan": chunk_scan,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "equiv": equiv.__version__,
        }

    def __repr__(self) -> str:
        return "TorchSSDReferences()"


__all__ = ["TorchSSDReferences"]
