"""Load mamba_ssm's pure-torch references on a machine without its CUDA extension.

mamba_ssm 2.3.2.post1 on a CPU-only torch installs only from source, and `import mamba_ssm` then
fails: its `__init__` imports `selective_scan_interface`, which needs the compiled
`selective_scan_cuda`. The three pure-torch references we want live in submodules that need only
torch, einops and triton (triton's `@jit` kernels are defined, never launched):

    ssd_minimal_discrete        mamba_ssm/modules/ssd_minimal.py            (chunked SSD, Listing 1)
    selective_state_update_ref  mamba_ssm/ops/triton/selective_state_update.py   (one decode step)
    rms_norm_ref                mamba_ssm/ops/triton/layernorm_gated.py      (gated RMSNorm)

`load_mamba_ssm_refs` registers a bare package object named `mamba_ssm` (right `__path__`, no
`__init__` run), imports the three submodules through it, then puts sys.modules back exactly as it
found it for every `mamba_ssm*` name. The functions keep working afterwards: each holds its own
module globals.

Why sys.modules must be restored (verified with transformers 5.23, see tests/test_ssd_references.py
`test_loader_leaves_transformers_on_its_torch_fallback`): transformers' Mamba-2 module decorates
its SSD functions with `use_kernel_func_from_hub_with_fallback(..., "mamba_ssm")`, which at *import
time* of `transformers.models.mamba2.modeling_mamba2` runs `importlib.import_module("mamba_ssm")`
and, if that succeeds, binds `mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined` (a
Triton kernel) instead of its torch fallback. With the bare package left registered, that import
succeeds and a CPU forward crashes inside Triton. With sys.modules restored, the real
`import mamba_ssm` runs its `__init__`, fails on `selective_scan_cuda`, and transformers keeps the
torch path. The binding is fixed once per process, when transformers first imports the module.

Install (no CUDA, torch already in the environment; MAMBA_SKIP_CUDA_BUILD is required with a CPU
torch, whose `torch.version.cuda` is None and breaks setup.py's CUDA version check):

    pip install triton einops
    MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE \
        pip install --no-build-isolation --no-deps mamba-ssm==2.3.2.post1
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass

INSTALL_COMMAND = (
    "pip install triton einops && MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE "
    "pip install --no-build-isolation --no-deps mamba-ssm==2.3.2.post1"
)
PACKAGE = "mamba_ssm"
_SUBMODULES = {
    "ssd_minimal_discrete": "mamba_ssm.modules.ssd_minimal",
    "selective_state_update_ref": "mamba_ssm.ops.triton.selective_state_update",
    "rms_norm_ref": "mamba_ssm.ops.triton.layernorm_gated",
}


class MambaSsmUnavailable(ImportError):
    """mamba_ssm (or a dependency of its pure-torch references) is not installed."""


@dataclass(frozen=True)
class MambaSsmRefs:
    """mamba_ssm's pure-torch reference functions and the version they came from."""

    ssd_minimal_discrete: Callable
    selective_state_update_ref: Callable
    rms_norm_ref: Callable
    version: str


def _owned(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def bare_package(spec) -> types.ModuleType:
    """The mamba_ssm package object as `import` would make it, without running its __init__."""
    bare = types.ModuleType(PACKAGE)
    bare.__path__, bare.__spec__, bare.__file__, bare.__package__ = (
        list(spec.submodule_search_locations), spec, spec.origin, PACKAGE)
    return bare


def restore_modules(before: dict[str, types.ModuleType], owned=_owned) -> None:
    """Put every entry of sys.modules that `owned` claims (default: `mamba_ssm*`) back as it was
    in `before`; drop the attributes our imports set on modules that were already there
    (transformers' failed `import mamba_ssm` leaves a few, e.g. `mamba_ssm.ops.triton`)."""
    added = [k for k in list(sys.modules) if owned(k) and k not in before]
    for name in added:
        module = sys.modules.pop(name)
        parent_name, _, child = name.rpartition(".")
        parent = before.get(parent_name)
        if parent is not None and getattr(parent, child, None) is module:
            delattr(parent, child)
    sys.modules.update(before)


def _load() -> MambaSsmRefs:
    spec = importlib.util.find_spec(PACKAGE)  # finds, never executes, a top-level package
    if spec is None or not spec.submodule_search_locations:
        raise MambaSsmUnavailable(f"mamba_ssm is not installed; install it with: {INSTALL_COMMAND}")
    try:
        version = importlib.metadata.version("mamba-ssm")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    before = {k: v for k, v in sys.modules.items() if _owned(k)}
    if PACKAGE not in before:
        sys.modules[PACKAGE] = bare_package(spec)
    try:
        funcs = {fn: getattr(importlib.import_module(mod), fn) for fn, mod in _SUBMODULES.items()}
    except ImportError as e:
        raise MambaSsmUnavailable(
            f"mamba_ssm {version} is installed but its pure-torch references failed to import "
            f"({type(e).__name__}: {e}); they need torch, einops and triton: {INSTALL_COMMAND}") from e
    finally:
        restore_modules(before)
    return MambaSsmRefs(version=version, **funcs)


_CACHE: list[MambaSsmRefs] = []


def load_mamba_ssm_refs() -> MambaSsmRefs:
    """mamba_ssm's pure-torch references, importable without its CUDA extension.

    Leaves sys.modules as it found it for every `mamba_ssm*` name (see the module docstring for
    why). Raises MambaSsmUnavailable (an ImportError) naming the install command when the package
    or one of its dependencies is missing. Loaded once per process."""
    if not _CACHE:
        _CACHE.append(_load())
    return _CACHE[0]


def mamba_ssm_installed() -> bool:
    """Whether mamba_ssm and what its pure-torch references import are installed, without importing
    any of them (cheap enough for a pytest skip condition at collection)."""
    return all(importlib.util.find_spec(m) is not None for m in (PACKAGE, "torch", "einops", "triton"))
