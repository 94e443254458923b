"""Which transformers Mamba-2 code actually runs, and the environment it runs in.

transformers routes five to seven of Mamba-2's functions through a kernel dispatcher, and the
wrapper has changed shape between releases: 5.23/5.24 use `functools.wraps` wrappers from
`integrations.hub_kernels.use_kernel_func_from_hub_with_fallback`, which bind mamba_ssm /
causal_conv1d kernels instead of the torch body when those packages import at the first import of
`modeling_mamba2`; with the `kernels` package installed (a dependency from 5.25), each function is
an `nn.Module` instance with no `__wrapped__`, and 5.25 adds `causal_conv1d_forward` and
`mamba2_scan_forward` (the conv and the scan with their cache handling). On a CPU machine with
mamba_ssm installed a bound kernel crashes the forward (docs/porting-bugs.md #12). This module controls
it in three places:

1. import: `import_modeling_mamba2()` imports the module with both kernel packages made
   unimportable (a meta-path blocker, their `sys.modules` entries hidden for the duration);
2. call time: `DispatchRecorder` swaps every decorated module-level function for a shim that
   calls its undecorated torch body and counts the call, so "what actually ran" is recorded, not
   inferred, and a kernel bound by an earlier import elsewhere is still bypassed. Which functions
   are dispatched is read from the module's source (its decorated top-level `def`s), not from a
   list of one release; the torch body is found by the `__wrapped__` protocol where the wrapper
   keeps it, else recompiled from the module's own source without its decorators (same code,
   same file and line numbers). Either way it is checked to be the `def` of that name in
   modeling_mamba2's file. When neither works, `ReferenceChanged` says so in one line;
3. report: `environment()` lists versions, matmul precision flags, threads and device.

No library source is edited: the swaps are restored when the `with` block ends.
"""

from __future__ import annotations

import ast
import functools
import importlib.abc
import importlib.util
import inspect
import platform
import sys
from contextlib import contextmanager

import torch

from equiv import tested_versions
from equiv.errors import ReferenceChanged

KERNEL_PACKAGES = ("mamba_ssm", "causal_conv1d")
"""Packages whose importability makes transformers bind kernels instead of its torch bodies."""

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


def reference_changed(what: str) -> ReferenceChanged:
    """One line: the version, what broke, the tested range and the way out."""
    import transformers

    newest = tested_versions.supported_transformers()[-1]
    return ReferenceChanged(
        f"transformers {transformers.__version__}: {what}; ssm-equiv is tested with transformers "
        f"{tested_versions.transformers_range()}: pin it (pip install 'transformers=={newest}') "
        "or run `nox -s references` to see which releases work")


class _BlockKernelPackages(importlib.abc.MetaPathFinder):
    """Makes the kernel packages unimportable: transformers' binding catches the ImportError and
    keeps its torch body."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in KERNEL_PACKAGES:
            raise ModuleNotFoundError(f"{fullname} hidden by equiv_reference.provenance: the reference "
                                      "runs transformers' torch fallback path", name=fullname)
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
        try:
            with kernel_packages_hidden():
                mm = importlib.import_module(MODULE)
        except ImportError as e:
            raise reference_changed(f"cannot import {MODULE} ({e})") from None
        _IMPORT_RECORD.update(first_import="equiv_reference.provenance (kernel packages hidden)",
                              kernel_packages_installed=installed)
    else:
        mm = sys.modules[MODULE]
        _IMPORT_RECORD.setdefault("first_import", "elsewhere in the process, before the reference loaded")
        _IMPORT_RECORD.setdefault("kernel_packages_installed", {p: _installed(p) for p in KERNEL_PACKAGES})
    return mm


def import_record() -> dict:
    return dict(_IMPORT_RECORD)


# ---------------------------------------------------------------------------------------------
# the torch bodies behind the dispatch wrappers


@functools.cache  # parsed once per module object (kept by the process anyway)
def _module_ast(mm) -> dict[str, ast.FunctionDef]:
    """Top-level `def`s of modeling_mamba2's source that carry decorators: the dispatched ones."""
    try:
        tree = ast.parse(inspect.getsource(mm), filename=mm.__file__)
    except (OSError, TypeError, SyntaxError) as e:
        raise reference_changed(f"cannot read the source of {MODULE} ({e})") from None
    return {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef) and n.decorator_list}


def dispatched_names(mm) -> list[str]:
    """Every decorated top-level function of modeling_mamba2, in source order."""
    names = list(_module_ast(mm))
    missing = [n for n in REQUIRED if n not in names]
    if missing:
        raise reference_changed(f"{MODULE} no longer defines the dispatched function(s) {missing}")
    return names


def _is_the_def(fn, node: ast.FunctionDef, mm) -> bool:
    """fn is the undecorated function `node` defines in modeling_mamba2's file."""
    code = getattr(fn, "__code__", None)
    first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
    return (inspect.isfunction(fn) and fn.__name__ == node.name and code is not None
            and code.co_filename == mm.__file__ and code.co_firstlineno in (node.lineno, first))


@functools.cache  # one lookup per (module, function): every runner shares the bodies
def torch_body(mm, name: str):
    """(the undecorated torch function `modeling_mamba2.<name>`, how it was found)."""
    node = _module_ast(mm).get(name)
    if node is None:
        raise reference_changed(f"{MODULE}.{name} is not a decorated function of its source")
    try:
        unwrapped = inspect.unwrap(getattr(mm, name))
    except (AttributeError, ValueError):  # no such attribute, or a __wrapped__ cycle
        unwrapped = None
    if unwrapped is not None and _is_the_def(unwrapped, node, mm):
        return unwrapped, "__wrapped__ (functools.wraps)"
    bare = ast.FunctionDef(**{f: getattr(node, f) for f in node._fields if f != "decorator_list"},
                           decorator_list=[])
    ast.copy_location(bare, node)
    namespace: dict = {}
    try:  # module globals, so the body calls the module's (swapped) functions as the library does
        exec(compile(ast.Module([bare], type_ignores=[]), mm.__file__, "exec"), mm.__dict__, namespace)
    except Exception as e:  # noqa: BLE001 - any failure means the lookup no longer works
        raise reference_changed(f"cannot rebuild the torch body of {MODULE}.{name} from its source "
                                f"({type(e).__name__}: {e})") from None
    fn = namespace.get(name)
    if not _is_the_def(fn, node, mm):
        raise reference_changed(f"the torch body of {MODULE}.{name} rebuilt from source is not its def")
    return fn, "recompiled from modeling_mamba2's source without its decorators"


def bound_implementation(fn) -> str:
    """What a dispatch wrapper would run if called: 'torch fallback', a kernel's name, or
    'unknown (...)'. Informational only: DispatchRecorder calls the torch body whatever this says.
    Reads the wrappers' closures where it can (5.23-5.25: `implementation` /
    `is_new_implementation` of use_kernel_func_from_hub_with_fallback, `func` of kernels' Func)."""
    try:
        if not inspect.isfunction(fn) and hasattr(fn, "kernel_layer_name"):  # kernels' Func module
            if "forward" in getattr(fn, "__dict__", {}):
                return f"kernel (kernelized hub layer {fn.kernel_layer_name})"
            inner = inspect.getclosurevars(type(fn).forward).nonlocals.get("func")
            return bound_implementation(inner) if inner is not None else "unknown (no func in Func.forward)"
        closure = inspect.getclosurevars(fn).nonlocals
    except (TypeError, AttributeError):
        return "unknown (not a Python function)"
    if "is_new_implementation" not in closure:
        return "torch fallback" if not hasattr(fn, "__wrapped__") else "unknown (unrecognised wrapper)"
    if not closure["is_new_implementation"]:
        return "torch fallback"
    impl = closure.get("implementation")
    return f"kernel {getattr(impl, '__module__', '?')}.{getattr(impl, '__qualname__', '?')}"


class DispatchRecorder:
    """Context manager: while active, each dispatched modeling_mamba2 function runs its torch body
    and is counted. `record()` -> {chunk_scan: {...}, conv: {...}, ...} for the provenance."""

    def __init__(self, mm):
        self.mm = mm
        self.names = dispatched_names(mm)
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


def versions() -> dict:
    """The reference side's versions (`untested_versions()` says which are outside the tested set)."""
    from importlib.metadata import PackageNotFoundError, version

    import numpy
    import transformers

    def installed(dist):  # metadata only: importing mamba_ssm itself is what this module avoids
        try:
            return version(dist)
        except PackageNotFoundError:
            return None

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "numpy": numpy.__version__,
           "mamba_ssm": installed("mamba_ssm"), "kernels": installed("kernels")}
    return out


def untested_versions() -> list[str]:
    """The reference side's packages outside equiv/tested_versions.toml (empty when all tested)."""
    return tested_versions.untested({k: v for k, v in versions().items() if k != "python"})


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
