"""The Mamba-2 CPU benchmark's contenders (equiv_reference/mamba2/bench.py) build and run on a tiny
fixture: every timed callable of mamba2-jax and the built-in port answers once, so a moved import
or a changed adapter fails here, not in the middle of a bench run."""

from __future__ import annotations

import jax
import numpy as np
import pytest

pytest.importorskip("mamba2_jax")

from equiv.fixtures import fixture_dir  # noqa: E402
from equiv_reference.mamba2 import bench  # noqa: E402


def test_mamba2_jax_contenders_build_and_answer_on_a_tiny_fixture():
    path = fixture_dir("tiny-g1")  # mamba2-jax runs n_groups=1 only
    ids = np.random.default_rng(0).integers(0, 64, (1, 32)).astype(np.int32)
    contenders = bench.mamba2_jax_contenders(path, ids, ids[:, :16])
    assert {c.kind for c in contenders} == {"prefill", "generate", "prefill16"}
    for c in contenders:
        assert c.impl == "mamba2-jax"
        with jax.numpy_rank_promotion("allow"):  # mamba2-jax's own code broadcasts implicitly
            c.fn()  # raises if the adapter or the package moved


def test_builtin_contenders_build_and_answer_on_a_tiny_fixture():
    path = fixture_dir("tiny-g2")
    ids = np.random.default_rng(0).integers(0, 64, (1, 32)).astype(np.int32)
    contenders = bench.builtin_contenders(path, ids, ids[:, :16])
    assert contenders and {c.impl for c in contenders} == {"builtin"}
    for c in contenders:
        c.fn()
