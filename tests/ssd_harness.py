"""The SSD tests' harness: the package's (equiv.mamba2.ssd_harness: jitted forms, run_form, run_steps,
run_readout, time_slice, check_budget, assert_close_by_budget) plus the torch references.

The pytest suite sets its budget from torch (equiv_reference.mamba2.ssd_references.TorchSSDReferences:
transformers' chunk scan and the torch recurrence), as before the properties moved into the
package; `equiv check` uses the same properties with whichever references are available.
"""

from __future__ import annotations

import functools

from equiv.mamba2.ssd_harness import (  # noqa: F401 - re-exported for the tests
    FORMS,
    JITTED,
    TIME_ARRAYS,
    assert_close_by_budget,
    check_budget,
    run_form,
    run_readout,
    run_steps,
    time_slice,
)

# ---------------------------------------------------------------------------------------------
# torch side (imported lazily: torch and transformers cost seconds to import)


@functools.cache
def oracles():
    """equiv_reference.mamba2.ssd_oracles, with torch on one thread (xdist runs one worker per core, and these
    tensors are too small for intra-op threads to pay)."""
    import torch

    torch.set_num_threads(1)
    from equiv_reference.mamba2 import ssd_oracles

    return ssd_oracles


@functools.cache
def references():
    """The torch references object the property tests run with (one torch thread, as `oracles`)."""
    oracles()
    from equiv_reference.mamba2.ssd_references import TorchSSDReferences

    return TorchSSDReferences()


def oracle(kw: dict):
    """The float64 sequential recurrence: the ground truth."""
    return references().oracle(kw)


def torch_reference(form: str, kw: dict, chunk_size: int | None = None):
    """The torch float32 counterpart of an equiv.mamba2.ssd form, whose own error sets the budget
    (TorchSSDReferences.reference says which)."""
    return references().reference(form, kw, chunk_size)
