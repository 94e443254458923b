"""The torch side's references object for the selective-scan properties (equiv.mamba1.scan_properties):
mamba_ssm's pure-torch `selective_scan_ref` and `selective_state_update_ref`, in equiv.mamba1.scan's
layouts.

- float32 whole-sequence reference (the "sequential", "associative" and "chunked" forms):
  `selective_scan_ref`. It has no initial state (it starts from zeros; mamba_ssm continues from a
  state only through the decode step), so for an instance with one the reference is the step below
  run over the sequence, the same float32 recurrence from that state.
- float32 step reference: `selective_state_update_ref`, token by token.
- float64 oracle: `selective_state_update_ref` token by token in float64. `selective_scan_ref` cannot
  be the oracle: it casts u, delta, B and C to float32 (`.float()`), and with a float64 A its state
  is float64 and its readout einsum then fails on the mixed dtypes.

Layouts: ours are x, dt (b, l, e), A (e, n), B, C (b, l, n), D (e,), state (b, e, n);
selective_scan_ref takes u, delta (b, e, l), A (e, n), B, C (b, n, l) and returns out (b, e, l) and
last_state (b, e, n); selective_state_update_ref takes state (b, e, n) (updated in place), x, dt
(b, e), A (e, n), B, C (b, n), D (e,).

`selective_scan_ref` lives in mamba_ssm/ops/selective_scan_interface.py, which imports the compiled
`selective_scan_cuda` at module level. Without the CUDA build (this CPU machine) `load_selective_scan_ref`
imports it through the bare package of equiv_reference.mamba_ssm_refs with an empty stand-in
module for `selective_scan_cuda` (only the kernels' wrappers call it, never selective_scan_ref),
then puts sys.modules back as it found it, for the reason that module's docstring gives.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Callable

import numpy as np
import torch

import equiv
from equiv_reference.mamba_ssm_refs import (
    INSTALL_COMMAND,
    PACKAGE,
    MambaSsmUnavailable,
    bare_package,
    load_mamba_ssm_refs,
    restore_modules,
)

CUDA_EXTENSION = "selective_scan_cuda"
SCAN_MODULE = "mamba_ssm.ops.selective_scan_interface"


def _owned(name: str) -> bool:
    return name in (PACKAGE, CUDA_EXTENSION) or name.startswith(PACKAGE + ".")


def _load_selective_scan_ref() -> Callable:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MambaSsmUnavailable(f"mamba_ssm is not installed; install it with: {INSTALL_COMMAND}")
    before = {k: v for k, v in sys.modules.items() if _owned(k)}
    if PACKAGE not in before:
        sys.modules[PACKAGE] = bare_package(spec)
    if CUDA_EXTENSION not in before and importlib.util.find_spec(CUDA_EXTENSION) is None:
        sys.modules[CUDA_EXTENSION] = types.ModuleType(CUDA_EXTENSION)  # never called by the reference
    try:
        return importlib.import_module(SCAN_MODULE).selective_scan_ref
    except ImportError as e:
        raise MambaSsmUnavailable(f"mamba_ssm's {SCAN_MODULE} failed to import ({type(e).__name__}: {e}); "
                                  f"it needs torch, einops and triton: {INSTALL_COMMAND}") from e
    finally:
        restore_modules(before, owned=_owned)


_CACHE: list[Callable] = []


def load_selective_scan_ref() -> Callable:
    """mamba_ssm's `selective_scan_ref`, importable without its CUDA extension; loaded once per
    process, sys.modules left as found for every `mamba_ssm*` name and `selective_scan_cuda`."""
    if not _CACHE:
        _CACHE.append(_load_selective_scan_ref())
    return _CACHE[0]


def _t(a, dtype):
    return None if a is None else torch.as_tensor(np.asarray(a)).to(dtype)


def selective_scan_ref(x, dt, A, B, C, D=None) -> tuple[np.ndarray, np.ndarray]:
    """mamba_ssm `selective_scan_ref` in float32 from a zero state, in our layouts: (y, last_state)."""
    ref = load_selective_scan_ref()
    f32 = torch.float32
    u, delta = (_t(a, f32).transpose(1, 2) for a in (x, dt))  # b e l
    Bt, Ct = (_t(a, f32).transpose(1, 2) for a in (B, C))  # b n l
    y, last = ref(u, delta, _t(A, f32), Bt, Ct, D=_t(D, f32), return_last_state=True)
    return y.transpose(1, 2).numpy(), last.numpy()


def selective_state_update_loop(x, dt, A, B, C, D=None, initial_state=None, dtype=torch.float32):
    """mamba_ssm `selective_state_update_ref` token by token in `dtype` (float32: the decode
    reference; float64: the oracle). Returns (y (b, l, e), last_state (b, e, n))."""
    ref = load_mamba_ssm_refs().selective_state_update_ref
    x, dt, A, B, C, D, h0 = (_t(a, dtype) for a in (x, dt, A, B, C, D, initial_state))
    b, l, e = x.shape
    state = torch.zeros(b, e, A.shape[1], dtype=dtype) if h0 is None else h0.clone()
    ys = [ref(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D=D) for t in range(l)]  # state in place
    return torch.stack(ys, dim=1).numpy(), state.numpy()


class TorchScanReferences:
    """The budget from mamba_ssm's pure-torch references (the role of
    equiv_reference.mamba2.ssd_references.TorchSSDReferences). Construct it after choosing torch's
    thread count. `kw` is ScanInstance.kwargs(): x, dt, A, B, C, D, initial_state (numpy)."""

    name = "torch"

    def oracle(self, kw: dict) -> tuple[np.ndarray, np.ndarray]:
        return selective_state_update_loop(**kw, dtype=torch.float64)

    def reference(self, form: str, kw: dict) -> tuple[np.ndarray, np.ndarray]:
        if form not in ("sequential", "associative", "chunked", "step"):
            raise ValueError(f"form: expected sequential, associative, chunked or step, got {form!r}")
        if form == "step" or kw.get("initial_state") is not None:
            return selective_state_update_loop(**kw)
        return selective_scan_ref(**{k: v for k, v in kw.items() if k != "initial_state"})

    def provenance(self) -> dict:
        try:
            version = load_mamba_ssm_refs().version
        except Exception as exc:  # reported, not fatal: the calls raise it
            version = f"unavailable ({type(exc).__name__}: {exc})"
        return {
            "name": self.name,
            "oracle": "mamba_ssm selective_state_update_ref token by token, torch float64",
            "scan": "mamba_ssm selective_scan_ref, torch float32 (from a zero state; with an initial "
                    "state, selective_state_update_ref token by token)",
            "step": "mamba_ssm selective_state_update_ref token by token, torch float32",
            "mamba_ssm": version,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "equiv": equiv.__version__,
        }

    def __repr__(self) -> str:
        return "TorchScanReferences()"


__all__ = ["TorchScanReferences", "load_selective_scan_ref", "selective_scan_ref",
           "selective_state_update_loop"]
