"""The torch-body lookup of equiv_reference/provenance.py on synthetic modules shaped like each
transformers wrapper generation (functools.wraps, a callable object with no __wrapped__, a
future one the suite cannot see through), so its behaviour is tested whatever transformers is
installed: the body found is the module's own `def`, the shims count calls and run that body, a
forward that bypasses them is refused, and a broken layout is one ReferenceChanged line naming the
version, the function, the tested range and the pin."""

from __future__ import annotations

import importlib.util
import sys
import textwrap

import pytest
import transformers

from equiv import tested_versions
from equiv.errors import ReferenceChanged
from equiv_reference import provenance as prov
from equiv_reference.mamba2 import dispatch

SOURCE = textwrap.dedent('''
    import functools


    def wraps_decorator(fn):  # 5.23 / 5.24: functools.wraps keeps __wrapped__
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            return ("kernel", fn(*args, **kwargs))
        return wrapped


    def module_decorator(fn):  # 5.25 with `kernels`: an object with no __wrapped__
        class Func:
            def __call__(self, *args, **kwargs):
                return ("kernel", fn(*args, **kwargs))
        return Func()


    @wraps_decorator
    def mamba2_chunk_scan(x, chunk_size=1):
        return x * 2


    @module_decorator
    def causal_conv1d_fn(x, activation=None):
        return helper(x) + 1


    @module_decorator
    def causal_conv1d_update(x):
        return x - 1


    @wraps_decorator
    def mamba2_selective_state_update(x):
        return x + 10


    @module_decorator
    def mamba2_future_fused_path(x):  # a dispatched function no tested release has
        return -x


    def helper(x):
        return x * 100


    def forward(x):  # the model: calls the module globals by name, as modeling_mamba2 does
        return causal_conv1d_fn(mamba2_chunk_scan(x, chunk_size=4, unknown_kwarg=1))
''')


@pytest.fixture
def fake_modeling(tmp_path):
    path = tmp_path / "fake_modeling_mamba2.py"
    path.write_text(SOURCE)
    spec = importlib.util.spec_from_file_location("fake_modeling_mamba2", path)
    mm = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mm
    spec.loader.exec_module(mm)
    yield mm
    sys.modules.pop(spec.name, None)


def test_bodies_found_by_wrapped_or_recompiled_source(fake_modeling):
    mm = fake_modeling
    assert prov.dispatched_names(mm) == ["mamba2_chunk_scan", "causal_conv1d_fn", "causal_conv1d_update",
                                         "mamba2_selective_state_update", "mamba2_future_fused_path"]
    body, how = prov.torch_body(mm, "mamba2_chunk_scan")
    assert how.startswith("__wrapped__") and body(3) == 6
    body, how = prov.torch_body(mm, "causal_conv1d_fn")
    assert how.startswith("recompiled") and body(3) == 301  # its globals are the module's
    assert body.__code__.co_filename == mm.__file__
    assert mm.causal_conv1d_fn(3) == ("kernel", 301)  # the wrapper itself is untouched


def test_recorder_runs_the_bodies_counts_calls_and_restores(fake_modeling):
    mm = fake_modeling
    wrappers = {n: getattr(mm, n) for n in prov.dispatched_names(mm)}
    recorder = dispatch.DispatchRecorder(mm)
    with recorder:
        assert mm.forward(1) == 201  # torch bodies only, the extra kwarg dropped as the dispatcher does
    assert all(getattr(mm, n) is fn for n, fn in wrappers.items())
    record = recorder.record()
    assert record["chunk_scan"]["calls"] == 1 and record["chunk_scan"]["ran"] == "torch fallback"
    assert record["conv"]["calls"] == 1 and record["conv_update"]["ran"] == "not called"
    assert "unknown to the tested releases" in record["mamba2_future_fused_path"]["note"]
    recorder.require_called("mamba2_chunk_scan", what="a forward")
    with recorder:
        mm.helper(1)  # a "forward" that goes around the controlled functions
    with pytest.raises(ReferenceChanged, match="never called modeling_mamba2.mamba2_chunk_scan"):
        recorder.require_called("mamba2_chunk_scan", what="a forward")


def test_a_release_without_a_required_function_is_one_line(tmp_path):
    path = tmp_path / "fake_modeling_new.py"
    path.write_text(SOURCE.replace("def mamba2_chunk_scan(", "def mamba2_chunk_scan_v2("))
    spec = importlib.util.spec_from_file_location("fake_modeling_new", path)
    mm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mm)
    with pytest.raises(ReferenceChanged) as info:
        dispatch.DispatchRecorder(mm)
    message = str(info.value)
    newest = tested_versions.supported_transformers()[-1]
    for fragment in (f"transformers {transformers.__version__}", "mamba2_chunk_scan",
                     tested_versions.transformers_range(), f"pip install 'transformers=={newest}'"):
        assert fragment in message, (fragment, message)
    assert "\n" not in message


def test_installed_transformers_is_in_the_tested_range_and_its_bodies_are_found():
    """The real module: every dispatched function resolves to its def, however it is wrapped."""
    mm = dispatch.import_modeling_mamba2()
    if transformers.__version__ not in tested_versions.supported_transformers():
        pytest.skip(f"transformers {transformers.__version__} is outside the tested set (matrix: newest leg)")
    for name in prov.dispatched_names(mm):
        body, how = prov.torch_body(mm, name)
        assert body.__name__ == name and body.__code__.co_filename == mm.__file__, how


def test_diff_with_a_changed_reference_exits_2_with_one_line(capsys, monkeypatch):
    from equiv.cli import main
    from equiv.fixtures import fixture_dir

    monkeypatch.setattr(dispatch, "REQUIRED", (*dispatch.REQUIRED, "mamba2_scan_in_a_future_release"))
    code = main(["diff", str(fixture_dir("tiny-g2")), "--seq-len", "8", "--batch", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("equiv: error: transformers ") and "mamba2_scan_in_a_future_release" in line
    assert tested_versions.transformers_range() in line
