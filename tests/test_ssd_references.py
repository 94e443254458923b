"""Each JAX SSD form against the torch references (mamba_ssm's pure-torch functions, transformers'
chunk scan), by the error budget against the float64 oracle; the oracle itself cross-checked
against mamba_ssm's chunked reference run in float64; and the mamba_ssm loader's sys.modules
hygiene, on which the transformers reference depends (equiv_reference/mamba_ssm_refs.py)."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
import types

import numpy as np
import pytest
from hypothesis import given

from equiv.mamba2.ssd_strategies import ssd_instances
from equiv_reference.mamba_ssm_refs import (
    MambaSsmUnavailable,
    load_mamba_ssm_refs,
    mamba_ssm_installed,
)
from tests import ssd_harness as H

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:triton.*")

needs_mamba_ssm = pytest.mark.skipif(
    not mamba_ssm_installed(),
    reason="mamba_ssm is not installed (pip install triton einops && MAMBA_SKIP_CUDA_BUILD=TRUE "
           "MAMBA_FORCE_BUILD=TRUE pip install --no-build-isolation --no-deps mamba-ssm==2.3.2.post1)")

ORACLE_CROSSCHECK_RTOL = 1e-10
"""Two float64 algorithms (sequential recurrence, chunked Listing 1) agree to ~1e3 float64 ULPs at
these sizes; 1e-10 of the tensor's scale leaves room for strong decay while still being 10^4 x
below any float32 error, so a mistake in the oracle cannot hide in it."""


def _scale_close(name, a, b, rtol):
    scale = max(float(np.abs(b).max()), 1e-300)
    err = float(np.abs(a - b).max())
    assert err <= rtol * scale, f"{name}: max |a - b| = {err:.3g} > {rtol:g} x scale {scale:.3g}"


@pytest.mark.needs_mamba_ssm
@needs_mamba_ssm
@given(inst=ssd_instances())
def test_chunked_vs_mamba_ssm_minimal(inst):
    """ssd_chunked within budget of mamba_ssm `ssd_minimal_discrete` (float32, same chunk), and the
    sequential float64 oracle equal to `ssd_minimal_discrete` in float64."""
    import torch

    kw, q = inst.kwargs(), inst.chunk_size
    o = H.oracles()
    truth = H.oracle(kw)
    ref = o.mamba_ssm_minimal(**kw, chunk_size=q, dtype=torch.float32)
    H.check_budget("chunked vs mamba_ssm minimal", H.run_form("chunked", kw, q), ref, truth)
    minimal64 = o.mamba_ssm_minimal(**kw, chunk_size=q, dtype=torch.float64)
    _scale_close("oracle vs ssd_minimal_discrete fp64: y", truth[0], minimal64[0], ORACLE_CROSSCHECK_RTOL)
    _scale_close("oracle vs ssd_minimal_discrete fp64: state", truth[1], minimal64[1],
                 ORACLE_CROSSCHECK_RTOL)


@pytest.mark.needs_mamba_ssm
@needs_mamba_ssm
@given(inst=ssd_instances())
def test_step_vs_mamba_ssm_step(inst):
    """ssd_step token by token within budget of mamba_ssm `selective_state_update_ref` token by
    token (float32), and that reference in float64 equal to the oracle."""
    import torch

    kw = inst.kwargs()
    o = H.oracles()
    b, l, h, p = kw["x"].shape
    n = kw["B"].shape[-1]

    def ref_loop(dtype):
        state = kw["initial_states"]
        state = np.zeros((b, h, p, n), np.float32) if state is None else state
        ys = []
        for t in range(l):
            y, state = o.mamba_ssm_step(
                state, kw["x"][:, t], kw["dt"][:, t], kw["A"], kw["B"][:, t], kw["C"][:, t], D=kw["D"],
                z=None if kw["z"] is None else kw["z"][:, t], dt_bias=kw["dt_bias"],
                dt_softplus=kw["dt_softplus"], dt_limit=kw["dt_limit"], dtype=dtype)
            ys.append(y)
        return np.stack(ys, axis=1), state

    truth = H.oracle(kw)
    H.check_budget("step vs mamba_ssm selective_state_update_ref", H.run_steps(kw),
                   ref_loop(torch.float32), truth)
    ref64 = ref_loop(torch.float64)
    _scale_close("oracle vs selective_state_update_ref fp64: y", truth[0], ref64[0], ORACLE_CROSSCHECK_RTOL)
    _scale_close("oracle vs selective_state_update_ref fp64: state", truth[1], ref64[1],
                 ORACLE_CROSSCHECK_RTOL)


@given(inst=ssd_instances())
def test_forms_vs_transformers_chunk_scan(inst):
    """chunked and quadratic within budget of transformers' torch chunk scan, which must be the
    torch fallback (not a kernel bound at import)."""
    kw, q = inst.kwargs(), inst.chunk_size
    o = H.oracles()
    assert o.transformers_chunk_scan_provenance()["torch_fallback"]
    truth = H.oracle(kw)
    for form in ("chunked", "quadratic"):
        H.check_budget(f"{form} vs transformers", H.run_form(form, kw, q),
                       H.torch_reference(form, kw, q), truth)


# ---------------------------------------------------------------------------------------------
# the loader (equiv_reference/mamba_ssm_refs.py)


def _mamba_modules():
    return {k: v for k, v in sys.modules.items() if k == "mamba_ssm" or k.startswith("mamba_ssm.")}


@pytest.mark.needs_mamba_ssm
@needs_mamba_ssm
def test_loader_leaves_sys_modules_as_found():
    """After loading, `import mamba_ssm` behaves as before: on a machine without the CUDA
    extension it still fails, which is what keeps transformers on its torch path."""
    from equiv_reference import mamba_ssm_refs

    before = _mamba_modules()
    refs = mamba_ssm_refs._load()  # uncached: really registers and unregisters the package
    assert _mamba_modules() == before
    assert refs.version == importlib.metadata.version("mamba-ssm")
    assert refs.ssd_minimal_discrete.__module__ == "mamba_ssm.modules.ssd_minimal"
    try:
        importlib.import_module("mamba_ssm")
    except ImportError:
        pass  # no CUDA extension: the state transformers must find
    else:
        pytest.skip("mamba_ssm is fully importable here (CUDA build): the hazard does not apply")
    finally:
        for k in set(_mamba_modules()) - set(before):
            sys.modules.pop(k)


@pytest.mark.needs_mamba_ssm
@needs_mamba_ssm
def test_loader_leaves_transformers_on_its_torch_fallback():
    """transformers' `use_kernel_func_from_hub_with_fallback` binds at decoration time whatever
    `importlib.import_module("mamba_ssm")` returns. With the bare package left registered it
    binds the Triton kernel (the hazard); after our loader it binds the torch function."""
    from transformers.integrations.hub_kernels import use_kernel_func_from_hub_with_fallback

    from equiv_reference.provenance import bound_implementation

    load_mamba_ssm_refs()

    def torch_body(*args, **kwargs):
        return None

    def bound(fn):  # "torch fallback" or "kernel <module>.<qualname>", whatever the wrapper's shape
        return bound_implementation(fn)

    decorate = use_kernel_func_from_hub_with_fallback("mamba_chunk_scan_combined", "mamba_ssm")
    assert bound(decorate(torch_body)) == "torch fallback"

    before = _mamba_modules()
    spec = importlib.util.find_spec("mamba_ssm")
    bare = types.ModuleType("mamba_ssm")
    bare.__path__ = list(spec.submodule_search_locations)
    sys.modules["mamba_ssm"] = bare
    try:
        decorate = use_kernel_func_from_hub_with_fallback("mamba_chunk_scan_combined", "mamba_ssm")
        assert bound(decorate(torch_body)).startswith("kernel mamba_ssm.ops.triton.ssd_combined.")
    finally:
        for k in set(_mamba_modules()) - set(before):
            sys.modules.pop(k)
        sys.modules.update(before)


def test_loader_names_the_install_command_when_missing(monkeypatch):
    from equiv_reference import mamba_ssm_refs

    monkeypatch.setattr(mamba_ssm_refs.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MambaSsmUnavailable, match="MAMBA_SKIP_CUDA_BUILD=TRUE"):
        mamba_ssm_refs._load()
    assert issubclass(MambaSsmUnavailable, ImportError)
