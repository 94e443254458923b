"""pytest plugin (entry point `pytest11: equiv`): lets a port's own test suite call the checks.

    def test_my_port_matches_transformers(equiv_check):
        equiv_check("path/to/checkpoint", port="my_pkg.port:MyPort")

    @pytest.mark.equiv_checkpoint("path/to/checkpoint", port="my_pkg.port:MyPort", mode="isolated")
    def test_marked(equiv_result):
        assert equiv_result.verdict == "equivalent"

A divergence fails the test with the report's terminal table (worst taps, first divergence).
Nothing heavy is imported until a check actually runs.
"""

from __future__ import annotations

import pytest


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "equiv_checkpoint(path, port='builtin', **options): verify a port against a "
        "checkpoint with ssm-equiv; the result is available as the `equiv_result` fixture")


def _check(checkpoint, port="builtin", reference=None, dtype="float32", mode="accumulated",
           seq_len=32, batch=2, seed=0, expect_equivalent=True):
    import numpy as np

    from equiv.families import family_of_checkpoint
    from equiv.layerwise import run_layerwise
    from equiv.ports import check_loaded_model, resolve_port
    from equiv.references import load_reference
    from equiv.report import terminal_table

    fam = family_of_checkpoint(checkpoint)
    model = resolve_port(port, fam).load(checkpoint, dtype)
    check_loaded_model(model, port)
    ids = np.random.default_rng(seed).integers(0, int(model.vocab_size), (batch, seq_len)).astype(np.int32)
    result = run_layerwise(model, load_reference(reference, checkpoint, dtype, family=fam),
                           load_reference(reference, checkpoint, "float64", family=fam), ids, None, mode=mode,
                           dtype=dtype, seed=seed)
    if expect_equivalent and result.verdict != "equivalent":
        pytest.fail(f"ssm-equiv: {port} is not equivalent to {reference or fam.default_reference} on "
                    f"{checkpoint}\n" + terminal_table(result), pytrace=False)
    return result


@pytest.fixture
def equiv_check():
    """A callable: equiv_check(checkpoint, port=..., mode=..., ...) -> LayerwiseResult; fails the
    test with the report summary on divergence (pass expect_equivalent=False to inspect instead)."""
    return _check


@pytest.fixture
def equiv_result(request):
    """The LayerwiseResult of the test's `equiv_checkpoint` marker."""
    marker = request.node.get_closest_marker("equiv_checkpoint")
    if marker is None or not marker.args:
        raise pytest.UsageError("equiv_result needs @pytest.mark.equiv_checkpoint(path, ...) on the test")
    return _check(marker.args[0], **marker.kwargs)
