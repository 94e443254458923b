"""Which transformers Mamba-2 code actually runs, and the environment it runs in.

transformers 5.23 binds each of Mamba-2's five kernel-or-torch functions once, when
`transformers.models.mamba2.modeling_mamba2` is first imported:
`integrations.hub_kernels.use_kernel_func_from_hub_with_fallback` tries `import mamba_ssm` /
`import causal_conv1d` and, if that works, binds their Triton/CUDA kernels instead of the torch
bodies. On a CPU machine with mamba_ssm installed that binding crashes the forward (known-bugs.md
row 12). This module controls it in three places:

1. import: `import_modeling_mamba2()` imports the module with both packages made unimportable (a
   meta-path blocker, and their `sys.modules` entries hidden for the duration);
2. call time: `DispatchRecorder` swaps the module's five globals for shims while a runner calls the
   model, each shim calling the torch fallback (`__wrapped__`, the undecorated torch body) and
   counting the call, so "what actually ran" is recorded, not inferred, and a kernel bound by an
   earlier import elsewhere in the process is still bypassed (and that fact recorded);
3. report: `environment()` lists versions, matmul precision flags, threads and device.

No library source is edited: the swaps are restored when the `with` block ends.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import inspect
import platform
import sys
from contextlib import contextmanager

import torch

KERNEL_PACKAGES = ("mamba_ssm", "causal_conv1d")
"""Packages whose importability makes transformers bind kernels instead of its torch bodies."""

DISPATCHED = {  # modeling_mamba2 global -> what it computes (the provenance key)
    "mamba2_chunk_scan": "chunk_scan",
    "causal_conv1d_fn": "conv",
    "causal_conv1d_update": "conv_update",
    "mamba2_selective_state_update": "state_update",
    "mamba2_split_conv1d_scan_combined": "fused_training_path",
}

MODULE = "transformers.models.mamba2.modeling_mamba2"
_IMPORT_RECORD: dict = {}


class _BlockKernelPackages(importlib.abc.MetaPathFinder):
    """Makes the kernel packages unimportable: transformers' binding catches the ImportError and
    keeps its torch body."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in KERNEL_PACKAGES:
            raise ModuleNotFoundError(f"{fullname} hidden by equiv_reference.provenance: the reference runs "
                                      "transformers' torch fallback path", name=fullname)
        return None


@contextmanager
def kernel_packages_hidden():
    """Within the block, `import mamba_ssm` / `import causal_conv1d` (and submodules) fail."""
    hidden = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] in KERNEL_PACKAGES}
    blocker = _BlockKernelPackages()
    sys.meta_path.insert(0, blocker)
    try:
        yield
    finally:
        sys.meta_path.remove(blocker)
        sys.modules.update(hidden)


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a half-registered package object has no usable spec
        return package in sys.modules


def import_modeling_mamba2():
    """transformers' Mamba-2 module, imported with the kernel packages hidden if this is the first
    import in the process. Records what the import saw (for `import_record()`)."""
    if MODULE not in sys.modules:
        installed = {p: _installed(p) for p in KERNEL_PACKAGES}
        with kernel_packages_hidden():
            mm = importlib.import_module(MODULE)
        _IMPORT_RECORD.update(first_import="equiv_reference.provenance (kernel packages hidden)",
                              kernel_packages_installed=installed)
    else:
        mm = sys.modules[MODULE]
        _IMPORT_RECORD.setdefault("first_import", "elsewhere in the process, before the reference loaded")
        _IMPORT_RECORD.setdefault("kernel_packages_installed", {p: _installed(p) for p in KERNEL_PACKAGES})
    return mm


def import_record() -> dict:
    return dict(_IMPORT_RECORD)


def bound_implementation(fn) -> str:
    """What a `use_kernel_func_from_hub_with_fallback` wrapper is bound to: 'torch fallback' or the
    kernel's qualified name. Reads the wrapper's closure (`implementation`, `is_new_implementation`)."""
    try:
        closure = inspect.getclosurevars(fn).nonlocals
    except TypeError:
        return "unknown (not a Python function)"
    if "is_new_implementation" not in closure:
        return "unknown (not a use_kernel_func_from_hub_with_fallback wrapper)"
    if not closure["is_new_implementation"]:
        return "torch fallback"
    impl = closure.get("implementation")
    return f"kernel {getattr(impl, '__module__', '?')}.{getattr(impl, '__qualname__', '?')}"


class DispatchRecorder:
    """Context manager: while active, each dispatched modeling_mamba2 function runs its torch body
    and is counted. `record()` -> {chunk_scan: {...}, conv: {...}, ...} for the provenance."""

    def __init__(self, mm):
        self.mm = mm
        self.calls = dict.fromkeys(DISPATCHED, 0)
        self.bound = {name: bound_implementation(getattr(mm, name)) for name in DISPATCHED}
        self._wrappers = {name: getattr(mm, name) for name in DISPATCHED}
        self._saved: dict = {}

    def torch_body(self, name: str):
        """The undecorated torch function behind modeling_mamba2.<name>."""
        body = getattr(self._wrappers[name], "__wrapped__", None)
        if body is None:
            raise RuntimeError(f"modeling_mamba2.{name} has no __wrapped__ torch body: transformers "
                               "changed how it binds kernels; update equiv_reference/provenance.py")
        return body

    def _shim(self, name):
        torch_body = self.torch_body(name)
        accepted = set(inspect.signature(torch_body).parameters)
        takes_any = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(torch_body).parameters.values())

        def shim(*args, **kwargs):
            self.calls[name] += 1
            # the wrapper drops kwargs its implementation does not accept; do the same
            kwargs = kwargs if takes_any else {k: v for k, v in kwargs.items() if k in accepted}
            return torch_body(*args, **kwargs)

        return shim

    def __enter__(self):
        for name in DISPATCHED:
            self._saved[name] = getattr(self.mm, name)
            setattr(self.mm, name, self._shim(name))
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(self.mm, name, fn)
        self._saved.clear()
        return False

    def record(self) -> dict:
        out = {}
        for name, key in DISPATCHED.items():
            bound = self.bound[name]
            why = ("transformers bound its torch body (kernel packages hidden at import)"
                   if bound == "torch fallback"
                   else f"bound to {bound} by an earlier import; bypassed at call time")
            out[key] = {"function": f"modeling_mamba2.{name}",
                        "ran": "torch fallback" if self.calls[name] else "not called",
                        "calls": self.calls[name], "bound_at_import": bound, "why": why}
        return out


def versions() -> dict:
    import numpy
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "numpy": numpy.__version__}
    try:  # version metadata only: importing mamba_ssm itself is what this module avoids
        from importlib.metadata import PackageNotFoundError, version

        out["mamba_ssm"] = version("mamba_ssm")
    except PackageNotFoundError:
        out["mamba_ssm"] = None
    return out


def environment(device: str) -> dict:
    """Everything outside the model that changes float results."""
    return {
        "device": device,
        "torch_float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "torch_num_threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cuda_available": torch.cuda.is_available(),
    }
