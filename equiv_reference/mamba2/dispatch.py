"""Which of transformers' Mamba-2 functions run: the import with the kernel packages hidden, and
the call-time recorder that runs each dispatched function's torch body and counts it
(equiv_reference/provenance.py has the family-agnostic lookups it builds on)."""

from __future__ import annotations

import importlib
import inspect
import sys

from equiv_reference.provenance import (
    KERNEL_PACKAGES,
    bound_implementation,
    dispatched_names,
    kernel_packages_hidden,
    package_installed,
    reference_changed,
    torch_body,
)

DISPATCHED = {  # modeling_mamba2 function -> what it computes (the provenance key)
    "mamba2_chunk_scan": "chunk_scan",
    "causal_conv1d_fn": "conv",
    "causal_conv1d_update": "conv_update",
    "mamba2_selective_state_update": "state_update",
    "mamba2_split_conv1d_scan_combined": "fused_training_path",
    "causal_conv1d_forward": "conv_forward",  # 5.25: the conv with its cache read/update
    "mamba2_scan_forward": "scan_forward",  # 5.25: chunked or recurrent SSM with its cache
}
REQUIRED = ("mamba2_chunk_scan", "causal_conv1d_fn", "causal_conv1d_update", "mamba2_selective_state_update")
"""Present in every supported release; the runners call or expect these."""

MODULE = "transformers.models.mamba2.modeling_mamba2"
_IMPORT_RECORD: dict = {}


_IMPORT_RECORD: dict = {}


def import_modeling_mamba2():
    """transformers' Mamba-2 module, imported with the kernel packages hidden if this is the first
    import in the process. Records what the import saw (for `import_record()`)."""
    if MODULE not in sys.modules:
        installed = {p: package_installed(p) for p in KERNEL_PACKAGES}
        try:
            with kernel_packages_hidden():
                mm = importlib.import_module(MODULE)
        except ImportError as e:
            raise reference_changed(f"cannot import {MODULE} ({e})") from None
        _IMPORT_RECORD.update(first_import="equiv_reference.mamba2.dispatch (kernel packages hidden)",
                              kernel_packages_installed=installed)
    else:
        mm = sys.modules[MODULE]
        _IMPORT_RECORD.setdefault("first_import", "elsewhere in the process, before the reference loaded")
        _IMPORT_RECORD.setdefault("kernel_packages_installed",
                                  {p: package_installed(p) for p in KERNEL_PACKAGES})
    return mm


def import_record() -> dict:
    return dict(_IMPORT_RECORD)



class DispatchRecorder:
    """Context manager: while active, each dispatched modeling_mamba2 function runs its torch body
    and is counted. `record()` -> {chunk_scan: {...}, conv: {...}, ...} for the provenance."""

    def __init__(self, mm):
        self.mm = mm
        self.names = dispatched_names(mm, REQUIRED)
        self.bodies = {name: torch_body(mm, name) for name in self.names}
        self.calls = dict.fromkeys(self.names, 0)
        self.bound = {name: bound_implementation(getattr(mm, name)) for name in self.names}
        self._saved: dict = {}
        self._calls_at_enter = dict(self.calls)

    def torch_body(self, name: str):
        """The undecorated torch function behind modeling_mamba2.<name>."""
        return self.bodies[name][0]

    def _shim(self, name):
        body = self.torch_body(name)
        params = inspect.signature(body).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())

        def shim(*args, **kwargs):
            self.calls[name] += 1
            # the dispatcher drops kwargs its implementation does not accept; do the same
            kwargs = kwargs if takes_any else {k: v for k, v in kwargs.items() if k in params}
            return body(*args, **kwargs)

        return shim

    def __enter__(self):
        self._calls_at_enter = dict(self.calls)
        for name in self.names:
            self._saved[name] = getattr(self.mm, name)
            setattr(self.mm, name, self._shim(name))
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(self.mm, name, fn)
        self._saved.clear()
        return False

    def require_called(self, *names: str, what: str) -> None:
        """After `what` ran (in the last `with` block), each of `names` must have run at least once
        in it: otherwise the model took a path around the functions this recorder controls, and
        its output is not the torch path."""
        missing = [n for n in names if self.calls.get(n, 0) == self._calls_at_enter.get(n, 0)]
        if missing:
            raise reference_changed(f"{what} never called modeling_mamba2.{missing[0]}: the model runs "
                                    "code this suite does not control")

    def record(self) -> dict:
        out = {}
        for name in self.names:
            bound = self.bound[name]
            why = ("transformers bound its torch body (kernel packages hidden at import)"
                   if bound == "torch fallback"
                   else f"bound to {bound}; bypassed at call time")
            out[DISPATCHED.get(name, name)] = {
                "function": f"modeling_mamba2.{name}",
                "ran": "torch fallback" if self.calls[name] else "not called",
                "calls": self.calls[name], "bound_at_import": bound, "why": why,
                "torch_body": self.bodies[name][1],
                **({} if name in DISPATCHED else {"note": "dispatched function unknown to the tested "
                                                          "releases; its torch body ran"})}
        return out
