"""Property tests of the SSD duality in equiv.mamba2.ssd: chunked == scan == quadratic == step, on every
bucket of equiv.mamba2.ssd_strategies, by the error budget against the float64 oracle.

The properties themselves live in the package (equiv/mamba2/ssd_properties.py, where each says what it
checks), so `equiv check` runs the same ones without pytest. Here they run with the torch
references (tests/ssd_harness.py: transformers' chunk scan and the torch recurrence set the
budget) under the hypothesis profile of tests/conftest.py (`ci`: derandomized, 30 examples each;
`thorough`: 10x, random).
"""

from __future__ import annotations

import pytest

from equiv.mamba2 import ssd_properties as P
from tests import ssd_harness as H

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:triton.*")


def _run(name: str) -> None:
    P.hypothesis_test(P.PROPERTIES_BY_NAME[name], H.references())()


def test_forms_agree_within_budget():
    _run("forms_agree_within_budget")


def test_chunk_size_invariance():
    _run("chunk_size_invariance")


def test_split_prefill_equals_one_pass():
    _run("split_prefill_equals_one_pass")


def test_step_by_step_equals_chunked():
    _run("step_by_step_equals_chunked")


def test_readout_of_final_state_is_last_output():
    _run("readout_of_final_state_is_last_output")


def test_linearity_in_x():
    _run("linearity_in_x")


def test_causality_bit_exact():
    _run("causality_bit_exact")


def test_padding_invariance():
    _run("padding_invariance")


def test_bfloat16_inputs():
    _run("bfloat16_inputs")


def test_every_property_has_a_test():
    """A property added to the package runs here too."""
    tests = {name[len("test_"):] for name in globals() if name.startswith("test_")}
    assert set(P.PROPERTIES_BY_NAME) <= tests, set(P.PROPERTIES_BY_NAME) - tests
