"""Make a float64 run of transformers' Mamba-2 really float64.

transformers 5.23 casts to float32 inside the model whatever the model dtype is (measured on a
float64 forward of tiny-g2, 2 layers, 11 sites):

    Mamba2RMSNorm.forward            hidden_states.to(torch.float32)           (every block norm, norm_f)
    MambaRMSNormGated.forward        hidden_states / gate .to(torch.float32)   (gated norm)
    Mamba2Block.forward              residual.to(torch.float32)                (residual_in_fp32)
    Mamba2Mixer.forward              A = -torch.exp(self.A_log.float())
    mamba2_chunk_scan                hidden_states / B / C / dt .float()       (the whole SSD)
    Mamba2ForCausalLM.forward        logits ... .float()

so `model.double()` gives an "oracle" whose norms and SSD carry float32 rounding: the float32
reference's error measured against it is underestimated and the error budget (docs/architecture.md) breaks.
`Float64Lift` is a TorchFunctionMode that, while active, turns every float64 -> float32 cast into a
no-op (`Tensor.float`, `Tensor.to(float32 / a float32 tensor)`), so the library's own code runs
end to end in float64. Casts of other dtypes are untouched. The sites it lifted are recorded for the
provenance (function name and line in the library).
"""

from __future__ import annotations

import sys
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode

_F64, _F32 = torch.float64, torch.float32


def _lift_to_args(args, kwargs):
    """`.to(...)` arguments with a float32 target replaced by float64; None if there is none."""
    lifted, changed = list(args), False
    for i, a in enumerate(lifted[1:], start=1):
        if a is _F32:
            lifted[i], changed = _F64, True
        elif isinstance(a, torch.Tensor) and a.dtype is _F32:  # .to(other): other's device, our dtype
            lifted[i], changed = a.device, True
            kwargs = {**kwargs, "dtype": _F64}
    if kwargs.get("dtype") is _F32:
        kwargs, changed = {**kwargs, "dtype": _F64}, True
    return (tuple(lifted), kwargs) if changed else None


class Float64Lift(TorchFunctionMode):
    """While active, float64 tensors are never cast down to float32. `sites` counts each lifted
    cast by `function:line` of its caller."""

    def __init__(self):
        super().__init__()
        self.sites: Counter = Counter()

    def _note(self):
        f = sys._getframe(2)  # 0: _note, 1: __torch_function__, 2: the library line casting
        self.sites[f"{f.f_code.co_name}:{f.f_lineno}"] += 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if args and isinstance(args[0], torch.Tensor) and args[0].dtype is _F64:
            if func is torch.Tensor.float:
                self._note()
                return args[0]
            if func is torch.Tensor.to:
                lifted = _lift_to_args(args, kwargs)
                if lifted is not None:
                    self._note()
                    args, kwargs = lifted
        return func(*args, **kwargs)
