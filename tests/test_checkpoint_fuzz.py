"""Fuzzing the loading path: a valid tiny checkpoint (the tiny-g2 fixture, in
transformers and in mamba_ssm format) corrupted at every layer: flipped bytes, truncation, edited
safetensors headers (dtype, shape, offsets, entries, header length), edited config.json values (every
known and some unknown keys, values of every JSON type), and edited tensors (removed, added, swapped,
re-typed, reshaped, poisoned). Every case must either load, and then run a forward of the right
shape (finite or NaN-poisoned, never a crash), or raise an EquivError subclass with a one-line
message: any other exception fails the test. The same corruptions go through `equiv diff`, which
must exit 2 with one `equiv: error:` line and no traceback.

Sizes scale with the hypothesis profile of tests/conftest.py (SSM_EQUIV_HYPOTHESIS_PROFILE): with
N = max_examples of the profile (ci 30, thorough 300) the five tests draw 4N + 4N + 3N + 2N + N = 14N
cases (ci 420, thorough 4200). A loaded case whose config the forward has not compiled yet costs a
jit compile (~4 s on the CI machine), so each test runs forwards for at most FORWARD_COMPILES
(config, dtype) pairs (ci 4, thorough 12); loads beyond those are checked for finite params of
the config's shapes (the forward's only precondition), and counted as events.
"""

from __future__ import annotations

import contextlib
import io
import json
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from equiv.errors import EquivError
from equiv.io.safetensors_io import write_safetensors
from equiv.mamba2 import config_mamba_ssm as MS
from equiv.mamba2 import config_transformers as HF
from equiv.mamba2.config_file import load_config
from equiv.mamba2.config_mamba_ssm import config_from_mamba_ssm
from equiv.mamba2.config_transformers import config_from_transformers
from equiv.mamba2.convert import expected_shapes
from equiv.mamba2.port import Mamba2Port
from tests.test_bad_inputs import base_checkpoint, join_header, mamba_ssm_format, split_header

N = settings.default.max_examples
FORWARD_COMPILES = 4 if N <= 30 else 12  # per test: each new (config, dtype) costs a jit compile
FORMATS = ("transformers", "mamba_ssm")
IDS = np.random.default_rng(0).integers(0, 96, (1, 20)).astype(np.int32)  # crosses the 16-token chunk


def _profile(factor: int):
    return settings(max_examples=factor * N, suppress_health_check=[HealthCheck.too_slow])


class Bases(dict):
    """{format: (config dict, tensors, safetensors path)}; a short repr for hypothesis' reports."""

    def __repr__(self):
        return f"<tiny-g2 checkpoints in {sorted(self)} format>"


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> Bases:
    """The valid checkpoints every case corrupts."""
    root = tmp_path_factory.mktemp("fuzz-base")
    out = Bases()
    for fmt in FORMATS:
        config, tensors = base_checkpoint()
        if fmt == "mamba_ssm":
            config, tensors = mamba_ssm_format(config, tensors)
        write_safetensors(root / f"{fmt}.safetensors", tensors)
        out[fmt] = (config, tensors, root / f"{fmt}.safetensors")
    return out


# ---------------------------------------------------------------------------------------------
# the outcome every case must have

_compiled: dict[str, set] = {}  # test -> the (config, dtype) pairs it ran a forward for


def check_outcome(ckpt: Path, dtype: str = "float32", test: str = "") -> str:
    """Load through the port; a load must run a forward of the right shape, a refusal must be one
    EquivError line. Anything else propagates (and fails the test). Returns the outcome, for events."""
    try:
        model = Mamba2Port().load(ckpt, dtype)
    except EquivError as e:
        assert "\n" not in str(e) and str(e), repr(e)
        event(f"refused: {type(e).__name__}")
        return "refused"
    cfg, params = model.cfg, model.params
    shapes = expected_shapes(cfg)
    assert len(params["layers"]) == cfg.n_layers and params["embed"].shape == (cfg.vocab_size, cfg.d_model)
    for lp in params["layers"]:
        assert set(lp) == set(shapes)
        assert all(np.isfinite(np.asarray(a, np.float32)).all() for a in lp.values())
    seen = _compiled.setdefault(test, set())
    if (cfg, dtype) in seen or len(seen) < FORWARD_COMPILES:
        seen.add((cfg, dtype))
        logits = model.forward(IDS, taps=False)["logits"]
        assert logits.shape == (1, IDS.shape[1], cfg.vocab_size) and logits.dtype == np.float32
        event("loaded: forward finite" if np.isfinite(logits).all() else "loaded: forward non-finite")
    else:
        event("loaded: forward skipped (compile budget)")
    return "loaded"


# ---------------------------------------------------------------------------------------------
# strategies: each draws one whole corrupted checkpoint

WEIRD_JSON = st.one_of(
    st.integers(-3, 300), st.sampled_from([0, -1, 2**31, 2**63, 10**30]), st.booleans(), st.none(),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e-5, 0.5, 16.0, 1e300]),
    st.text(max_size=6), st.sampled_from(["inf", "silu", "mamba2", "Mamba2", "auto", "64"]),
    st.lists(st.one_of(st.integers(-2, 100), st.floats(0, 2)), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(0, 3), max_size=2),
    st.sampled_from([{"__float__": "Infinity"}, {"__float__": "NaN"}, {"__float__": "oops"}, [], {}]),
)
UNKNOWN_KEYS = ["rope_theta", "num_attention_heads", "D_has_hdim", "ssm_cfg"]
TRANSFORMERS_KEYS = sorted(set(HF._HF_MAPPED) | set(HF._HF_REQUIRED) | HF._HF_HARMLESS) + UNKNOWN_KEYS
MAMBA_SSM_KEYS = (sorted(MS._MS_TOP) + [f"ssm_cfg.{k}" for k in sorted(MS._MS_SSM)]
                  + ["ssm_cfg.dt_scale", "n_groups"])


@st.composite
def config_edits(draw, fmt: str | None = None) -> tuple[str, list]:
    """(format, [(key, value or DELETE)]): values near the originals or of any JSON type."""
    fmt = fmt or draw(st.sampled_from(FORMATS))
    keys = TRANSFORMERS_KEYS if fmt == "transformers" else MAMBA_SSM_KEYS
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(keys))
        value = draw(st.one_of(WEIRD_JSON, st.just("DELETE"),
                               st.integers(1, 4).map(lambda k, key=key: ("SCALE", k))))
        edits.append((key, value))
    return fmt, edits


def apply_config_edits(config: dict, edits: list) -> dict:
    config = json.loads(json.dumps(config))
    for key, value in edits:
        in_ssm = key.startswith("ssm_cfg.")
        target, name = (config.setdefault("ssm_cfg", {}), key[8:]) if in_ssm else (config, key)
        if not isinstance(target, dict):
            continue
        if value == "DELETE":
            target.pop(name, None)
        elif isinstance(value, tuple):  # a plausible edit: the original value scaled (ints stay ints)
            old = target.get(name)
            target[name] = old * value[1] if type(old) in (int, float) else old
        else:  # a copy: sampled_from hands out the same [] and {} objects to every draw
            target[name] = json.loads(json.dumps(value))
    return config


@st.composite
def byte_edits(draw, blob_len: int, header_len: int) -> list:
    """Raw file edits: flips (biased to the header), truncation, appended junk."""
    ops = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "flip_header", "truncate", "append", "header_len"]))
        if kind == "flip":
            ops.append(("flip", draw(st.integers(0, blob_len - 1)), draw(st.integers(1, 255))))
        elif kind == "flip_header":
            ops.append(("flip", draw(st.integers(0, header_len + 7)), draw(st.integers(1, 255))))
        elif kind == "truncate":
            ops.append(("truncate", draw(st.integers(0, blob_len - 1))))
        elif kind == "append":
            ops.append(("append", draw(st.binary(min_size=1, max_size=16))))
        else:
            n = draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(0, header_len + 64)))
            ops.append(("header_len", n))
    return ops


def apply_byte_edits(blob: bytes, ops: list) -> bytes:
    b = bytearray(blob)
    for op in ops:
        if op[0] == "flip" and op[1] < len(b):
            b[op[1]] ^= op[2]
        elif op[0] == "truncate":
            del b[op[1]:]
        elif op[0] == "append":
            b += op[1]
        elif op[0] == "header_len" and len(b) >= 8:
            b[:8] = struct.pack("<Q", op[1])
    return bytes(b)


SHAPES = st.one_of(st.lists(st.integers(0, 300), max_size=4), st.sampled_from([[2**40, 2**40], [0, 2**62]]),
                   st.lists(st.integers(-5, 5), min_size=1, max_size=3), WEIRD_JSON)
OFFSETS = st.one_of(st.lists(st.integers(-10, 300_000), min_size=2, max_size=2),
                    st.tuples(st.integers(0, 300_000), st.integers(0, 2**70)).map(list), WEIRD_JSON)
DTYPES = st.one_of(
    st.sampled_from(["F32", "F16", "BF16", "F64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "f32"]), WEIRD_JSON)


@st.composite
def header_edits(draw, names: list) -> list:
    ops = []
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(names))
        kind = draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop_field", "drop", "add",
                                     "metadata", "swap_offsets"]))
        if kind in ("dtype", "shape", "data_offsets"):
            ops.append((kind, name, draw({"dtype": DTYPES, "shape": SHAPES, "data_offsets": OFFSETS}[kind])))
        elif kind == "drop_field":
            ops.append((kind, name, draw(st.sampled_from(["dtype", "shape", "data_offsets"]))))
        elif kind == "add":
            ops.append((kind, draw(st.text(min_size=1, max_size=12)),
                        {"dtype": draw(DTYPES), "shape": draw(SHAPES), "data_offsets": draw(OFFSETS)}))
        elif kind == "swap_offsets":
            ops.append((kind, name, draw(st.sampled_from(names))))
        else:
            ops.append((kind, name, draw(WEIRD_JSON)))
    return ops


def apply_header_edits(header: dict, ops: list) -> dict:
    header = json.loads(json.dumps(header))
    for kind, name, value in json.loads(json.dumps(ops)):  # copies of the shared sampled_from objects
        if name not in header and kind != "add":
            continue
        if kind in ("dtype", "shape", "data_offsets"):
            header[name][kind] = value
        elif kind == "drop_field":
            header[name].pop(value, None)
        elif kind == "drop":
            header.pop(name)
        elif kind == "add":
            header[name] = value
        elif kind == "metadata":
            header["__metadata__"] = value
        elif kind == "swap_offsets" and value in header:  # a field dropped earlier stays dropped
            a, b = header[name].get("data_offsets"), header[value].get("data_offsets")
            header[name]["data_offsets"], header[value]["data_offsets"] = b, a
    return header


NEW_DTYPES = [np.float16, np.float64, np.int32, np.uint8, bool, "bfloat16"]


@st.composite
def tensor_edits(draw, names: list) -> list:
    ops = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["remove", "add", "swap", "dtype", "reshape", "poison", "scale", "scalar",
                                     "tied_head"]))
        name = draw(st.sampled_from(names))
        if kind == "add":
            ops.append((kind, draw(st.sampled_from(names + ["extra", "backbone.layers.2.norm.weight"])),
                        draw(st.lists(st.integers(0, 5), max_size=3))))
        elif kind == "swap":
            ops.append((kind, name, draw(st.sampled_from(names))))
        elif kind == "dtype":
            ops.append((kind, name, draw(st.sampled_from(range(len(NEW_DTYPES))))))
        elif kind == "poison":
            ops.append((kind, name, draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e30, 3e38]))))
        elif kind == "scale":
            ops.append((kind, name, draw(st.sampled_from([0.0, -1.0, 1e-30, 1e10]))))
        else:
            ops.append((kind, name, None))
    return ops


def apply_tensor_edits(tensors: dict, ops: list) -> dict:
    import ml_dtypes

    t = dict(tensors)
    for kind, name, arg in ops:
        if name not in t and kind not in ("add", "tied_head"):
            continue
        if kind == "remove":
            t.pop(name)
        elif kind == "add":
            t[name] = np.ones(arg, np.float32)
        elif kind == "swap" and arg in t:
            t[name], t[arg] = t[arg], t[name]
        elif kind == "dtype":
            dt = NEW_DTYPES[arg]
            with np.errstate(all="ignore"):
                t[name] = t[name].astype(ml_dtypes.bfloat16 if dt == "bfloat16" else dt)
        elif kind == "reshape":
            t[name] = t[name].reshape(-1) if t[name].ndim > 1 else t[name].reshape(1, -1)
        elif kind == "poison":
            with np.errstate(all="ignore"):
                a = t[name].astype(np.float32).copy()
            if a.size:
                a.reshape(-1)[0] = arg
            t[name] = a
        elif kind == "scale":
            with np.errstate(all="ignore"):  # overflow to inf is one of the corruptions
                t[name] = (t[name].astype(np.float32) * np.float32(arg)).astype(np.float32)
        elif kind == "scalar":
            t[name] = np.asarray(t[name].reshape(-1)[:1].reshape(()))
        elif kind == "tied_head":  # a tied head saved next to the embedding, but different
            emb = [v for k, v in t.items() if k.startswith("backbone.embedding")]
            t["lm_head.weight"] = (emb[0] if emb else np.zeros((96, 64), np.float32)) + np.float32(1.0)
    return t


# ---------------------------------------------------------------------------------------------
# the properties


@_profile(4)
@given(data=st.data())
def test_corrupted_safetensors_bytes_load_or_raise_equiv_error(bases, data):
    fmt = data.draw(st.sampled_from(FORMATS))
    config, _, base_file = bases[fmt]
    blob = base_file.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    if data.draw(st.booleans()):
        header, payload = split_header(blob)
        names = sorted(k for k in header if k != "__metadata__")
        blob = join_header(apply_header_edits(header, data.draw(header_edits(names))), payload)
    else:
        blob = apply_byte_edits(blob, data.draw(byte_edits(len(blob), n)))
    with tempfile.TemporaryDirectory() as d:
        ckpt = Path(d)
        (ckpt / "config.json").write_text(json.dumps(config))
        (ckpt / "model.safetensors").write_bytes(blob)
        check_outcome(ckpt, test="bytes")


@_profile(4)
@given(edit=config_edits())
# found by this test: eps beyond float32 overflowed in the forward; transformers' own config class
# refused these where the port accepted them (equiv diff then crashed inside the reference)
@example(edit=("transformers", [("layer_norm_epsilon", 6.184617178868124e47)]))
@example(edit=("transformers", [("torch_dtype", [])]))
@example(edit=("transformers", [("dtype", "")]))
@example(edit=("transformers", [("initializer_range", "abc")]))
@example(edit=("transformers", [("layer_norm_epsilon", 1)]))
@example(edit=("transformers", [("id2label", {"__float__": "Infinity"})]))
def test_edited_config_loads_or_raises_equiv_error(bases, edit):
    fmt, edits = edit
    config, _, base_file = bases[fmt]
    raw = apply_config_edits(config, edits)
    parse = config_from_transformers if fmt == "transformers" else config_from_mamba_ssm
    try:
        parse(raw)
    except EquivError as e:
        assert "\n" not in str(e)
    with tempfile.TemporaryDirectory() as d:
        ckpt = Path(d)
        (ckpt / "config.json").write_text(json.dumps(raw))
        (ckpt / "model.safetensors").symlink_to(base_file)
        if check_outcome(ckpt, test="config") == "loaded" and fmt == "transformers":
            _transformers_accepts_too(ckpt, raw)


def _transformers_accepts_too(ckpt: Path, raw: dict) -> None:
    """What the port accepts, the reference's own config class must accept too: otherwise `equiv
    diff` would pass the port's checks and then fail inside transformers."""
    transformers = pytest.importorskip("transformers")
    transformers.Mamba2Config.from_json_file(ckpt / "config.json")


@_profile(3)
@given(data=st.data())
def test_edited_tensors_load_or_raise_equiv_error(bases, data):
    fmt = data.draw(st.sampled_from(FORMATS))
    config, tensors, _ = bases[fmt]
    tensors = apply_tensor_edits(tensors, data.draw(tensor_edits(sorted(tensors))))
    with tempfile.TemporaryDirectory() as d:
        ckpt = Path(d)
        (ckpt / "config.json").write_text(json.dumps(config))
        write_safetensors(ckpt / "model.safetensors", tensors)
        check_outcome(ckpt, data.draw(st.sampled_from(["float32", "bfloat16"])), "tensors")


@_profile(2)
@given(data=st.data())
def test_config_json_text_edits_load_or_raise_equiv_error(bases, data):
    """config.json as bytes: truncated, flipped, duplicated keys, nesting, huge literals."""
    fmt = data.draw(st.sampled_from(FORMATS))
    config, _, base_file = bases[fmt]
    text = json.dumps(config).encode()
    kind = data.draw(st.sampled_from(["truncate", "flip", "duplicate", "nest", "literal"]))
    if kind == "truncate":
        text = text[: data.draw(st.integers(0, len(text) - 1))]
    elif kind == "flip":
        i = data.draw(st.integers(0, len(text) - 1))
        text = text[:i] + bytes([text[i] ^ data.draw(st.integers(1, 255))]) + text[i + 1:]
    elif kind == "duplicate":
        key = data.draw(st.sampled_from(sorted(config)))
        text = text[:-1] + b', "' + key.encode() + b'": ' + json.dumps(data.draw(WEIRD_JSON)).encode() + b"}"
    elif kind == "nest":
        depth = data.draw(st.sampled_from([10, 1000, 100_000]))
        text = text[:-1] + b', "x": ' + b"[" * depth + b"]" * depth + b"}"
    else:  # a literal json.dumps would not write, as some key's value
        key = data.draw(st.sampled_from(sorted(config)))
        literal = data.draw(st.sampled_from([b"NaN", b"-Infinity", b"1e999", b"9" * 5000, b"-0",
                                             b"1.0e-400"]))
        text = json.dumps(config | {key: "__LITERAL__"}).encode().replace(b'"__LITERAL__"', literal)
    with tempfile.TemporaryDirectory() as d:
        ckpt = Path(d)
        (ckpt / "config.json").write_bytes(text)
        (ckpt / "model.safetensors").symlink_to(base_file)
        try:
            load_config(ckpt)
        except EquivError:
            pass
        check_outcome(ckpt, test="text")


@_profile(1)
@given(data=st.data())
def test_cli_diff_on_corrupted_checkpoint_exits_2_with_one_line(bases, data):
    """`equiv diff` on a checkpoint the loader refuses: exit 2, the loader's message as the one
    `equiv: error:` line, no traceback. (A checkpoint the loader accepts would go on to the torch
    reference and a full diff, so such draws end after the load; they are counted as events.)"""
    from equiv.cli import main

    fmt = data.draw(st.sampled_from(FORMATS))
    config, tensors, base_file = bases[fmt]
    kind = data.draw(st.sampled_from(["config", "header", "bytes", "tensors"]))
    with tempfile.TemporaryDirectory() as d:
        ckpt = Path(d)
        if kind == "config":
            _, edits = data.draw(config_edits(fmt))
            config = apply_config_edits(config, edits)
        (ckpt / "config.json").write_text(json.dumps(config))
        blob = base_file.read_bytes()
        if kind == "header":
            header, payload = split_header(blob)
            names = sorted(k for k in header if k != "__metadata__")
            blob = join_header(apply_header_edits(header, data.draw(header_edits(names))), payload)
        elif kind == "bytes":
            blob = apply_byte_edits(blob, data.draw(byte_edits(len(blob), struct.unpack("<Q", blob[:8])[0])))
        if kind == "tensors":
            write_safetensors(ckpt / "model.safetensors",
                              apply_tensor_edits(tensors, data.draw(tensor_edits(sorted(tensors)))))
        else:
            (ckpt / "model.safetensors").write_bytes(blob)
        try:
            Mamba2Port().load(ckpt)
            event("loader accepts: CLI not run")
            return
        except EquivError as e:
            want = str(e)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(["diff", str(ckpt), "--seq-len", "4", "--batch", "1"])
        lines = err.getvalue().splitlines()
        errors = [ln for ln in lines if ln.startswith("equiv: error:")]
        assert rc == 2 and "Traceback" not in err.getvalue() and len(errors) == 1, err.getvalue()
        assert lines[-1] == errors[0] and (want in errors[0] or "config.json" in errors[0]), (want, lines)
        event("CLI exit 2")
