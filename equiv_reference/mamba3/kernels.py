"""mamba_ssm 2.3.2.post1's Mamba-3 code and kernels, imported without the package's CUDA `__init__`,
with the kernel entry points the Mamba3 module calls and the adaptations that let them run (or
fail in one line) where they cannot run as shipped.

What Mamba3 (modules/mamba3.py) dispatches to, bound at its import:

    mamba3_siso_combined             Triton SISO prefill (angle_dt_fwd + mamba3_siso_fwd); any GPU
    mamba3_mimo_combined             TileLang MIMO prefill; None when tilelang does not import
    apply_rotary_qk_inference_fwd    Triton rotary step (decode); any GPU
    mamba3_step_fn                   CuTe DSL decode step; None without nvidia-cutlass-dsl/quack

`load_mamba3()` imports them through a bare `mamba_ssm` package (as equiv_reference/mamba_ssm_refs.py
does) and puts sys.modules back. A missing kernel (None) is replaced in the module's globals by a
stub that raises `KernelUnavailable` naming it and why, so a Mamba3 layer can still be built and
loaded (its __init__ asserts the MIMO kernel exists) and fails in one line only when that kernel
would run.

Triton's interpreter (TRITON_INTERPRET=1, the CPU tests) cannot run these kernels as shipped, for
three reasons measured with triton 3.9.0; `interpreter_adaptations()` lists what each adaptation
changes, and a runner applies them only when asked and records them:

* `autotune`: every Mamba-3 kernel is autotuned over several configs, and benchmarking needs a GPU
  driver ("0 active drivers"). The interpreter gets the first config (launch shape only: the
  interpreter's arithmetic does not depend on it).
* `ptx`: `cos_approx`, `sin_approx` (mamba3_siso_fwd) and `tanh_approx` (angle_dt) are PTX inline
  asm (`cos.approx.f32`, ...), which the interpreter refuses ("inline_asm not supported"). They are
  replaced by tl.cos, tl.sin and 2 sigmoid(2x) - 1 (the rotary step kernel's own tanh).
* `float32_inputs`: mamba3_siso_combined casts Q, K, V, Trap, Angles and Z to bfloat16 before the
  kernel, and the interpreter computes bfloat16 tl.dot wrongly (a 16x16 bf16 tl.dot was off by 3e10).
  The wrapper is rerun without those casts: the kernel then computes in float32, which the GPU
  never does (a float32 model still feeds it bfloat16 there).

So on CPU the SISO prefill is the kernel's algorithm in float32 with exact transcendentals, not the
GPU's numerics; the CuTe step, which has no CPU form at all, can be replaced by mamba_ssm's own
pure-torch reference of it (`selective_state_update_fused_ref_v2`, float32), also recorded.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import sys
import types
from dataclasses import dataclass, field

import triton
import triton.language as tl

from equiv.errors import EquivError
from equiv_reference.mamba_ssm_refs import PACKAGE, bare_package, restore_modules

MAMBA3_MODULE = "mamba_ssm.modules.mamba3"
SISO_COMBINED = "mamba_ssm.ops.triton.mamba3.mamba3_siso_combined"
SISO_FWD = "mamba_ssm.ops.triton.mamba3.mamba3_siso_fwd"
ANGLE_DT = "mamba_ssm.ops.triton.mamba3.angle_dt"
ROTARY_STEP = "mamba_ssm.ops.triton.mamba3.mamba3_mimo_rotary_step"
CUTE_STEP = "mamba_ssm.ops.cute.mamba3.mamba3_step_fn"
TILELANG_MIMO = "mamba_ssm.ops.tilelang.mamba3.mamba3_mimo"
KERNEL_GLOBALS = {  # Mamba3's module global -> what it is (provenance names these)
    "mamba3_siso_combined": "Triton SISO prefill (angle_dt_fwd + mamba3_siso_fwd)",
    "mamba3_mimo_combined": "TileLang MIMO prefill (mamba3_mimo)",
    "apply_rotary_qk_inference_fwd": "Triton rotary step (rotary_qk_inference_kernel)",
    "mamba3_step_fn": "CuTe DSL decode step (Mamba3Step)",
}
MODULES = {"mamba3": MAMBA3_MODULE, "block": "mamba_ssm.modules.block",
           "layer_norm": "mamba_ssm.ops.triton.layer_norm", "generation": "mamba_ssm.utils.generation",
           "siso_combined": SISO_COMBINED, "siso_fwd": SISO_FWD, "angle_dt": ANGLE_DT,
           "rotary_step": ROTARY_STEP, "layernorm_gated": "mamba_ssm.ops.triton.layernorm_gated"}


class Mamba3Unavailable(ImportError):
    """mamba_ssm's Mamba-3 code (or what it imports: torch, einops, triton, transformers) is missing."""


class KernelUnavailable(EquivError):
    """A Mamba-3 kernel cannot run here (its package is missing, or it needs a GPU)."""


@dataclass
class Mamba3Code:
    """mamba_ssm's Mamba-3 modules (held here, not left in sys.modules) and what was missing."""

    modules: dict[str, types.ModuleType]
    version: str
    missing: dict[str, str] = field(default_factory=dict)  # kernel global -> why it is a stub
    saved: dict[tuple[str, str], object] = field(default_factory=dict)  # (module, attr) -> original

    def __getattr__(self, name):
        try:
            return self.__dict__["modules"][name]
        except KeyError:
            raise AttributeError(name) from None


def _stub(name: str, why: str):
    def unavailable(*args, **kwargs):
        raise KernelUnavailable(f"mamba_ssm's {KERNEL_GLOBALS[name]} ({name}) cannot run here: {why}")

    unavailable.stub_for = name
    return unavailable


def _import_error(module: str) -> str:
    """Why an optional kernel module does not import (its own ImportError, first line)."""
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any failure is the reason, reported not raised
        return f"{module} does not import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return f"{module} imported, but Mamba3 bound None"


def _load() -> Mamba3Code:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise Mamba3Unavailable("mamba_ssm is not installed (pip install mamba-ssm==2.3.2.post1, see "
                                "equiv_reference/mamba_ssm_refs.py for a CPU-only install)")
    try:
        version = importlib.metadata.version("mamba-ssm")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    owned = lambda n: n == PACKAGE or n.startswith(PACKAGE + ".")  # noqa: E731
    before = {k: v for k, v in sys.modules.items() if owned(k)}
    sys.modules[PACKAGE] = bare_package(spec)  # its __init__ imports the CUDA extension
    try:
        mods = {key: importlib.import_module(name) for key, name in MODULES.items()}
        m3 = mods["mamba3"]
        missing = {}
        for name, module in (("mamba3_mimo_combined", TILELANG_MIMO), ("mamba3_step_fn", CUTE_STEP)):
            if getattr(m3, name) is None:
                missing[name] = _import_error(module)
    except ImportError as e:
        raise Mamba3Unavailable(f"mamba_ssm {version}: {MAMBA3_MODULE} failed to import "
                                f"({type(e).__name__}: {e}); it needs torch, einops, triton and "
                                "transformers") from e
    finally:
        restore_modules(before, owned)
    code = Mamba3Code(mods, version, missing)
    for name, why in missing.items():
        setattr(m3, name, _stub(name, why))
    return code


_CACHE: list[Mamba3Code] = []


def load_mamba3() -> Mamba3Code:
    """mamba_ssm's Mamba-3 modules, imported once per process, sys.modules left as found."""
    if not _CACHE:
        _CACHE.append(_load())
    return _CACHE[0]


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------
# the package's pure-torch references


def fused_step_reference(code: Mamba3Code | None = None):
    """mamba_ssm's `selective_state_update_fused_ref_v2` (ops/cute/mamba3/mamba3_step_fn.py), the
    pure-torch reference of the CuTe step. Its file imports cutlass and quack at module level, so
    the one function is compiled from the installed file's source and run with torch alone (the
    package's code, read where it is installed, never a copy)."""
    import torch

    path = importlib.util.find_spec(PACKAGE).submodule_search_locations[0]
    source_path = os.path.join(path, "ops", "cute", "mamba3", "mamba3_step_fn.py")
    with open(source_path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), source_path)
    node = next((n for n in tree.body if isinstance(n, ast.FunctionDef)
                 and n.name == "selective_state_update_fused_ref_v2"), None)
    if node is None:
        raise Mamba3Unavailable(f"{source_path}: expected a def selective_state_update_fused_ref_v2, "
                                "found none (mamba_ssm changed)")
    namespace = {"torch": torch}
    exec(compile(ast.Module([node], []), source_path, "exec"), namespace)  # noqa: S102 - the package's def
    fn = namespace[node.name]
    fn.source = f"{source_path}:{node.lineno}"
    return fn


def rotary_step_reference(code: Mamba3Code | None = None):
    """mamba_ssm's `apply_rotary_qk_inference_reference` (the rotary step kernel's torch reference)."""
    return (code or load_mamba3()).rotary_step.apply_rotary_qk_inference_reference


# ---------------------------------------------------------------------------------------------
# adaptations (each reversible, each recorded by the runner that applies it)


def _autotuners(code: Mamba3Code):
    from triton.runtime.autotuner import Autotuner

    for key in ("siso_fwd", "angle_dt", "layernorm_gated", "layer_norm"):
        mod = code.modules[key]
        for attr, value in vars(mod).items():
            if isinstance(value, Autotuner) and len(value.configs) > 1:
                yield mod, attr, value


def _set(code: Mamba3Code, mod, attr: str, value) -> None:
    code.saved.setdefault((mod.__name__, attr), getattr(mod, attr))
    setattr(mod, attr, value)


def adapt_for_interpreter(code: Mamba3Code, *, ptx: bool, float32_inputs: bool) -> list[str]:
    """Apply the interpreter adaptations (module docstring); returns their descriptions. The autotune
    one always (nothing runs without it); `ptx` and `float32_inputs` when asked."""
    done = []
    for mod, attr, tuner in _autotuners(code):
        code.saved.setdefault((mod.__name__, attr + ".configs"), list(tuner.configs))
        tuner.configs = tuner.configs[:1]
    done.append(INTERPRETER_ADAPTATIONS["autotune"])
    if ptx:
        _set(code, code.siso_fwd, "cos_approx", cos_exact)
        _set(code, code.siso_fwd, "sin_approx", sin_exact)
        _set(code, code.angle_dt, "tanh_approx", tanh_exact)
        done.append(INTERPRETER_ADAPTATIONS["ptx"])
    if float32_inputs:
        _set(code, code.mamba3, "mamba3_siso_combined", siso_combined_without_bf16_casts(code))
        done.append(INTERPRETER_ADAPTATIONS["float32_inputs"])
    return done


@triton.jit
def cos_exact(x):
    return tl.cos(x)


@triton.jit
def sin_exact(x):
    return tl.sin(x)


@triton.jit
def tanh_exact(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


def siso_combined_without_bf16_casts(code: Mamba3Code):
    """`mamba3_siso_combined` minus its bfloat16 casts: the same autograd Function, same arguments."""
    function = code.siso_combined._Mamba3Function
    params = list(inspect.signature(code.siso_combined.mamba3_siso_combined).parameters)

    def combined_float32(*args, **kwargs):
        a = dict(zip(params, args)) | kwargs
        states = a.get("Input_States") or (None, None, None, None)
        return function.apply(a["Q"], a["K"], a["V"], a["ADT"], a["DT"], a["Trap"], a["Q_bias"], a["K_bias"],
                              a["Angles"], a.get("D"), a.get("Z"), *states, a.get("cu_seqlens"),
                              a.get("chunk_size", 64), a.get("return_final_states", False))

    combined_float32.adaptation = "float32_inputs"
    combined_float32.__wrapped__ = code.siso_combined.mamba3_siso_combined  # its signature, for binding
    return combined_float32


def step_via_torch_reference(code: Mamba3Code):
    """A `mamba3_step_fn` stand-in (same signature, same in-place contract) computing mamba_ssm's
    pure-torch reference of the CuTe step in float32."""
    ref = fused_step_reference(code)

    def step(state, Bstate, Xstate, A, B, C, D, x, dt, trap, xproj, outproj=None, state_out=None, out=None,
             z=None, zproj=None, tile_D=64, num_warps=2):
        y, new_state = ref(state, A, B, C, xproj, x, zproj, z, dt, Bstate, Xstate, trap, D, outproj)
        (state if state_out is None else state_out).copy_(new_state)
        out.copy_(y)

    step.adaptation = "torch_step"
    step.source = ref.source
    return step


def use_torch_step(code: Mamba3Code) -> str:
    _set(code, code.mamba3, "mamba3_step_fn", step_via_torch_reference(code))
    return INTERPRETER_ADAPTATIONS["torch_step"]


def restore(code: Mamba3Code) -> None:
    """Undo every adaptation."""
    for (mod_name, attr), value in code.saved.items():
        mod = next(m for m in code.modules.values() if m.__name__ == mod_name)
        if attr.endswith(".configs"):
            getattr(mod, attr.removesuffix(".configs")).configs = value
        else:
            setattr(mod, attr, value)
    code.saved.clear()


INTERPRETER_ADAPTATIONS = {
    "autotune": "Triton autotuners reduced to their first config (the interpreter cannot benchmark; "
                "launch shape only, no effect on its arithmetic)",
    "ptx": "PTX inline asm cos.approx.f32 / sin.approx.f32 (mamba3_siso_fwd) and tanh.approx.f32 "
           "(angle_dt) replaced by tl.cos / tl.sin / 2 sigmoid(2x) - 1: the interpreter refuses inline "
           "asm; the GPU's approximations are less accurate than these",
    "float32_inputs": "mamba3_siso_combined run without its bfloat16 casts of Q, K, V, Trap, Angles and "
                      "Z: the interpreter computes bfloat16 tl.dot wrongly; the GPU kernel reads them "
                      "in bfloat16, here they stay float32",
    "torch_step": "the CuTe decode step (mamba3_step_fn) replaced by mamba_ssm's pure-torch "
                  "selective_state_update_fused_ref_v2 in float32: the CuTe kernel needs a CUDA GPU and "
                  "nvidia-cutlass-dsl",
}
