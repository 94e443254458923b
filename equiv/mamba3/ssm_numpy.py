"""The budget's references for the Mamba-3 SSM properties, in plain numpy (no torch): the float64
oracle and the float32 reference are the same sequential recurrence of equiv/mamba3/oracle.py,
run in float64 and in float32.

The float32 reference is therefore the project's own recurrence rounded at every operation, not
mamba_ssm's kernels: those need a GPU (Triton, TileLang, CuTe), and its pure-torch step reference
(`selective_state_update_fused_ref_v2`) computes the same recurrence; a torch float32 reference can
be passed to the properties in this object's place (the `SSMReferences` protocol of
equiv.mamba3.ssm_harness).

`kw` is SSMInstance.kwargs() (equiv.mamba3.ssm_strategies), possibly time-sliced or with arrays
replaced. Every function returns (y (b, l, R, h, p), State, theta (b, l, h, a)) in its precision.
"""

from __future__ import annotations

import numpy as np

import equiv
from equiv.mamba3.oracle import ssm

FORMS = ("chunked", "sequential", "step")


class NumpySSMReferences:
    """The float64 oracle and the float32 reference of every form (one recurrence: the forms differ
    in how the port computes, not in what)."""

    name = "numpy"

    def oracle(self, kw: dict):
        return ssm(**kw, dtype=np.float64)

    def reference(self, form: str, kw: dict):
        if form not in FORMS:
            raise ValueError(f"form: expected one of {FORMS}, got {form!r}")
        return ssm(**kw, dtype=np.float32)

    def provenance(self) -> dict:
        return {
            "name": self.name,
            "oracle": "equiv.mamba3.oracle.ssm (sequential recurrence, numpy float64)",
            "reference": "equiv.mamba3.oracle.ssm run in numpy float32 (the same recurrence, rounded at "
                         "every operation), for every form",
            "numpy": np.__version__,
            "equiv": equiv.__version__,
        }

    def __repr__(self) -> str:
        return "NumpySSMReferences()"


__all__ = ["FORMS", "NumpySSMReferences"]
