"""Bad arguments to the SSD forms raise equiv.errors.ShapeError naming the dimension, what was
expected and what came, before anything is traced."""

from __future__ import annotations

import numpy as np
import pytest

from equiv.errors import EquivError, ShapeError
from equiv.mamba2 import ssd

B_, L, H, P, N, G = 2, 6, 4, 3, 5, 2


def args(**over):
    rng = np.random.default_rng(0)
    f32 = np.float32
    a = dict(
        x=rng.standard_normal((B_, L, H, P)).astype(f32),
        dt=rng.uniform(0.1, 1.0, (B_, L, H)).astype(f32),
        A=-rng.uniform(0.5, 2.0, H).astype(f32),
        B=rng.standard_normal((B_, L, G, N)).astype(f32),
        C=rng.standard_normal((B_, L, G, N)).astype(f32),
    )
    a.update(over)
    return a


SEQUENCE_FORMS = {
    "chunked": lambda **a: ssd.ssd_chunked(chunk_size=4, **a),
    "scan": ssd.ssd_scan,
    "quadratic": ssd.ssd_quadratic,
}


def step_args(**over):
    a = args()
    s = dict(state=np.zeros((B_, H, P, N), np.float32), x=a["x"][:, 0], dt=a["dt"][:, 0], A=a["A"],
             B=a["B"][:, 0], C=a["C"][:, 0])
    s.update(over)
    return s


def raises_naming(fn, *fragments, **kwargs):
    with pytest.raises(ShapeError) as info:
        fn(**kwargs)
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in the message: {msg}"
    assert isinstance(info.value, (EquivError, ValueError))
    return msg


@pytest.mark.parametrize("form", SEQUENCE_FORMS)
def test_groups_must_divide_heads(form):
    rng = np.random.default_rng(1)
    bad = rng.standard_normal((B_, L, 3, N)).astype(np.float32)
    raises_naming(SEQUENCE_FORMS[form], "g (n_groups) must divide h (heads)", "g=3", "h=4",
                  **args(B=bad, C=bad))


@pytest.mark.parametrize("chunk_size", [0, -1, 2.0, "4", True, None])
def test_chunk_size_must_be_a_positive_int(chunk_size):
    raises_naming(ssd.ssd_chunked, "chunk_size: expected an int >= 1", f"got {chunk_size!r}",
                  chunk_size=chunk_size, **args())


@pytest.mark.parametrize("form", SEQUENCE_FORMS)
@pytest.mark.parametrize(("name", "shape", "fragments"), [
    ("dt", (B_, L, H + 1), ["dt: expected shape (b, l, h) = (2, 6, 4)", "got (2, 6, 5)"]),
    ("A", (H, 1), ["A: expected shape (h) = (4,)", "got (4, 1)"]),
    ("C", (B_, L, G, N + 1), ["C: expected shape (b, l, g, n) = (2, 6, 2, 5)", "got (2, 6, 2, 6)"]),
    ("B", (B_, L - 1, G, N), ["B: expected shape (b, l, g, n) = (2, 6, 2, 5)", "got (2, 5, 2, 5)"]),
    ("z", (B_, L, H, P + 1), ["z: expected shape (b, l, h, p) = (2, 6, 4, 3)", "got (2, 6, 4, 4)"]),
    ("D", (P, H), ["D: expected shape (h,) = (4,) or (h, p) = (4, 3)", "got (3, 4)"]),
    ("dt_bias", (H + 2,), ["dt_bias: expected shape (h) = (4,)", "got (6,)"]),
    ("initial_states", (B_, H, P, N + 1),
     ["initial_states: expected shape (b, h, p, n) = (2, 4, 3, 5)", "got (2, 4, 3, 6)"]),
])
def test_mismatched_shapes_name_dimension_expected_and_got(form, name, shape, fragments):
    bad = np.zeros(shape, np.float32)
    raises_naming(SEQUENCE_FORMS[form], *fragments, **args(**{name: bad}))


def test_every_mismatch_is_reported_at_once():
    msg = raises_naming(ssd.ssd_scan, "dt:", "A:", **args(dt=np.zeros((B_, L, 1), np.float32),
                                                         A=np.zeros((2,), np.float32)))
    assert msg.count("expected") >= 2


@pytest.mark.parametrize("form", SEQUENCE_FORMS)
def test_wrong_rank_of_x(form):
    raises_naming(SEQUENCE_FORMS[form], "x: expected rank 4 (b, l, h, p)", "got shape (6, 4, 3)",
                  **args(x=np.zeros((L, H, P), np.float32)))


@pytest.mark.parametrize("form", SEQUENCE_FORMS)
@pytest.mark.parametrize("name", ["B", "C", "z"])
def test_mismatched_dtypes(form, name):
    a = args()
    a["z"] = np.zeros_like(a["x"])
    a[name] = a["B" if name in "BC" else "x"].astype(np.float16)
    raises_naming(SEQUENCE_FORMS[form], f"{name}: expected dtype float32 (x's dtype)", "got float16", **a)


@pytest.mark.parametrize("form", SEQUENCE_FORMS)
@pytest.mark.parametrize("name", ["x", "dt", "A"])
def test_integer_inputs(form, name):
    a = args()
    a[name] = a[name].astype(np.int32)
    raises_naming(SEQUENCE_FORMS[form], f"{name}: expected a floating dtype", "got int32", **a)


@pytest.mark.parametrize("form", SEQUENCE_FORMS)
def test_empty_sequence(form):
    a = args(x=np.zeros((B_, 0, H, P), np.float32), dt=np.zeros((B_, 0, H), np.float32),
             B=np.zeros((B_, 0, G, N), np.float32), C=np.zeros((B_, 0, G, N), np.float32))
    raises_naming(SEQUENCE_FORMS[form], "l (length) >= 1", "got l=0", **a)


@pytest.mark.parametrize(("name", "value", "fragments"), [
    ("state", np.zeros((B_, H, P, N + 1), np.float32),
     ["state: expected shape (b, h, p, n) = (2, 4, 3, 5)", "got (2, 4, 3, 6)"]),
    ("dt", np.zeros((B_, H, 1), np.float32), ["dt: expected shape (b, h) = (2, 4)", "got (2, 4, 1)"]),
    ("x", np.zeros((B_, 1, H, P), np.float32), ["x: expected rank 3 (b, h, p)", "got shape (2, 1, 4, 3)"]),
    ("D", np.zeros((H, P, 1), np.float32), ["D: expected shape (h,) = (4,) or (h, p) = (4, 3)"]),
    ("B", np.zeros((B_, G, N), np.int32), ["B: expected a floating dtype, got int32"]),
])
def test_step_errors(name, value, fragments):
    raises_naming(ssd.ssd_step, *fragments, **step_args(**{name: value}))


@pytest.mark.parametrize(("name", "value", "fragments"), [
    ("state", np.zeros((B_, H, P + 1, N), np.float32),
     ["state: expected shape (b, h, p, n) = (2, 4, 3, 5)", "got (2, 4, 4, 5)"]),
    ("C", np.zeros((B_, 3, N), np.float32), ["g (n_groups) must divide h (heads)", "g=3", "h=4"]),
    ("C", np.zeros((B_, N), np.float32), ["C: expected rank 3 (b, g, n)", "got shape (2, 5)"]),
    ("z", np.zeros((B_, H), np.float32), ["z: expected shape (b, h, p) = (2, 4, 3)", "got (2, 4)"]),
])
def test_readout_errors(name, value, fragments):
    a = step_args()
    kw = dict(state=a["state"], x=a["x"], C=a["C"])
    kw[name] = value
    raises_naming(ssd.ssd_readout, *fragments, **kw)
