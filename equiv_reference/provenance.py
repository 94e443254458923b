"""Which transformers code actually runs, and the environment it runs in: the family-agnostic part.

transformers routes some of an SSM's functions (Mamba-2: its conv and SSD; Mamba-1: its conv and
selective scan) through a kernel dispatcher whose wrapper has changed shape between releases:
5.23/5.24 use `functools.wraps` wrappers from
`integrations.hub_kernels.use_kernel_func_from_hub_with_fallback`, which bind mamba_ssm /
causal_conv1d kernels instead of the torch body when those packages import at the first import of
the modeling module; with the `kernels` package installed (a dependency from 5.25), each function
is an `nn.Module` instance with no `__wrapped__`. On a CPU machine with mamba_ssm installed a
bound kernel crashes the forward (docs/porting-bugs.md #12). The families control it with what is
here:

1. import: `kernel_packages_hidden()` makes both kernel packages unimportable (a meta-path
   blocker, their `sys.modules` entries hidden) while a modeling module is first imported;
2. call time: `dispatched_names` reads which functions are dispatched from the module's source
   (its decorated top-level `def`s), not from a list of one release; `torch_body` finds each one's
   torch body through the `__wrapped__` protocol where the wrapper keeps it, else recompiles it from
   the module's own source without its decorators (same code, same file and line numbers), and
   checks it is the `def` of that name in the module's file. When neither works,
   `reference_changed` says so in one line. Each family's recorder (equiv_reference/mamba2/
   dispatch.py) swaps the functions for counting shims around those bodies while the model runs;
3. report: `versions()` and `environment()` list versions, matmul precision flags, threads and
   device.

No library source is edited: every swap is restored when its `with` block ends.
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


def package_installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a half-registered package object has no usable spec
        return package in sys.modules


# ---------------------------------------------------------------------------------------------
# the torch bodies behind the dispatch wrappers


@functools.cache  # parsed once per module object (kept by the process anyway)
def _module_ast(mm) -> dict[str, ast.FunctionDef]:
    """Top-level `def`s of a transformers modeling module's source that carry decorators: the
    functions its kernel dispatcher wraps."""
    try:
        tree = ast.parse(inspect.getsource(mm), filename=mm.__file__)
    except (OSError, TypeError, SyntaxError) as e:
        raise reference_changed(f"cannot read the source of {mm.__name__} ({e})") from None
    return {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef) and n.decorator_list}


def dispatched_names(mm, required=()) -> list[str]:
    """Every decorated top-level function of the module, in source order; each of `required`
    must be among them."""
    names = list(_module_ast(mm))
    missing = [n for n in required if n not in names]
    if missing:
        raise reference_changed(f"{mm.__name__} no longer defines the dispatched function(s) {missing}")
    return names


def _is_the_def(fn, node: ast.FunctionDef, mm) -> bool:
    """fn is the undecorated function `node` defines in the module's file."""
    code = getattr(fn, "__code__", None)
    first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
    return (inspect.isfunction(fn) and fn.__name__ == node.name and code is not None
            and code.co_filename == mm.__file__ and code.co_firstlineno in (node.lineno, first))


@functools.cache  # one lookup per (module, function): every runner shares the bodies
def torch_body(mm, name: str):
    """(the undecorated torch function `<module>.<name>`, how it was found)."""
    node = _module_ast(mm).get(name)
    if node is None:
        raise reference_changed(f"{mm.__name__}.{name} is not a decorated function of its source")
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
        raise reference_changed(f"cannot rebuild the torch body of {mm.__name__}.{name} from its source "
                                f"({type(e).__name__}: {e})") from None
    fn = namespace.get(name)
    if not _is_the_def(fn, node, mm):
        raise reference_changed(f"the torch body of {mm.__name__}.{name} rebuilt from source is not its def")
    return fn, f"recompiled from {mm.__name__.rsplit('.', 1)[-1]}'s source without its decorators"


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
