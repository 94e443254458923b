"""Plug-ins that misbehave on purpose, for tests/test_hostile_inputs.py. Each is the numpy fake of
tests/fake_port.py with one thing changed, described by a JSON-able spec:

- `{"stage": S, "act": "raise", "exc": T, "message": M}`: the call S raises an exception of type T
  whose message is M (M may carry newlines, escape codes, 10k characters; "unprintable" gives an
  exception whose __str__ itself raises);
- `{"stage": S, "act": "return", "wrong": W}`: the call S returns the wrong thing W;
- `{"stage": "inject", "tap": ..., "positions": [...], "values": [...], "port_only": bool}`: the
  port and the reference (not the float64 oracle) carry the same non-finite values at the same
  positions of one tap (or the port alone: a defect that must still be blamed);
- `{"stage": "zeros"}`: every tap of every side is exactly zero.

A generated module does `Port, reference = build(spec)` (tests/test_hostile_inputs.py writes it),
and is named on the command line as `--port MOD:Port` / `--reference MOD:reference`.
"""

from __future__ import annotations

import numpy as np

from tests.fake_port import FakePort, load_fake_reference


class HostileError(Exception):
    """An exception type no library knows."""


class UnprintableError(Exception):
    def __str__(self):
        raise RuntimeError("__str__ of a hostile exception")


EXCEPTIONS = {t.__name__: t for t in (ValueError, TypeError, KeyError, RuntimeError, ZeroDivisionError,
                                      RecursionError, AttributeError, OSError, NotImplementedError,
                                      MemoryError, SystemExit, GeneratorExit, HostileError, UnprintableError)}


def wrong_value(kind: str, shape=(1, 4)):
    """Something that is not what the harness asked for."""
    b, length = shape
    return {
        "none": None, "int": 42, "str": "logits", "list": [1, 2, 3], "object": object(),
        "dict_of_str": {"logits": "not an array"},
        "wrong_dims": {"logits": np.zeros((b + 1, length + 3, 5), np.float32)},
        "strings": {"logits": np.full((b, length, 2), "x")},
        "object_array": {"logits": np.array([[[object()]] * length] * b, dtype=object)},
        "nonstr_key": {1: np.zeros((b, length, 2), np.float32)},
        "ragged": {"logits": [[1.0], [1.0, 2.0]]},
        "negative": -5, "bool": True, "float": 1.5, "huge": 10**40,
        "dict": {"name": "x"},
    }[kind]


def _raise(spec):
    exc = EXCEPTIONS[spec["exc"]]
    message = spec.get("message", "")
    raise exc() if exc is UnprintableError else exc(message)


def _act(spec, real):
    """A replacement for the method `real`: raise, return the wrong thing, or (no act) call it."""
    def method(*args, **kwargs):
        if spec.get("act") == "raise":
            _raise(spec)
        if spec.get("act") == "return":
            shape = np.shape(args[0]) if args and np.ndim(args[0]) == 2 else (1, 4)
            return wrong_value(spec["wrong"], shape)
        return real(*args, **kwargs)
    return method


def _inject(out: dict, spec) -> dict:
    out = dict(out)
    arr = np.array(out[spec["tap"]], np.float32)
    flat = arr.reshape(-1)
    for pos, value in zip(spec["positions"], spec["values"]):
        flat[pos % flat.size] = float(value)
    out[spec["tap"]] = arr
    return out


class _Model:
    """A FakeModel with one member replaced, or its outputs changed."""

    def __init__(self, inner, spec):
        self._inner, self._spec = inner, spec
        self.tap_names, self.vocab_size = inner.tap_names, inner.vocab_size
        stage = spec["stage"]
        for name in ("info", "forward", "forward_isolated", "memory_estimate"):
            if stage == name:
                setattr(self, name, _act(spec, getattr(inner, name, None)))
        if stage == "vocab_size":
            self.vocab_size = wrong_value(spec["wrong"]) if spec.get("act") == "return" else self.vocab_size

    def __getattr__(self, name):
        if self.__dict__.get("_spec", {}).get("stage") == "getattr" and name == "vocab_size":
            _raise(self._spec)
        return getattr(self._inner, name)

    def info(self):
        return self._inner.info()

    def forward(self, ids, mask=None, taps=True):
        out = self._inner.forward(ids, mask, taps=taps)
        if self._spec["stage"] == "inject":
            return _inject(out, self._spec)
        if self._spec["stage"] == "zeros":
            return {k: np.zeros_like(v) for k, v in out.items()}
        return out

    def forward_isolated(self, ids, mask, inputs):
        return self._inner.forward_isolated(ids, mask, inputs)


class _Runner:
    def __init__(self, inner, spec, dtype):
        self._inner, self._spec, self._dtype = inner, spec, dtype
        for name in ("run", "provenance"):
            if spec["stage"] == name:
                setattr(self, name, _act(spec, getattr(inner, name)))

    def run(self, ids, mask=None):
        out = self._inner.run(ids, mask)
        if self._spec["stage"] == "inject" and not self._spec.get("port_only") and self._dtype != "float64":
            return _inject(out, self._spec)
        if self._spec["stage"] == "zeros":
            return {k: np.zeros_like(v) for k, v in out.items()}
        return out

    def provenance(self):
        return self._inner.provenance()


class _Port:
    def __init__(self, spec):
        self.name, self._spec = "hostile", spec
        if spec["stage"] == "load":
            self.load = _act(spec, None)

    def load(self, checkpoint_dir, dtype="float32"):
        return _Model(FakePort().load(checkpoint_dir, dtype), self._spec)


def build(spec: dict):
    """(Port factory, reference factory) for a generated plug-in module."""
    if spec["stage"] == "import":
        _raise(spec)

    def port():
        if spec["stage"] == "factory":
            return _act(spec, None)()
        return _Port(spec)

    def reference(checkpoint_dir, dtype):
        if spec["stage"] == "factory":
            return _act(spec, None)(checkpoint_dir, dtype)
        if spec["stage"] == "missing_method":
            return object()
        return _Runner(load_fake_reference(checkpoint_dir, dtype), spec, dtype)

    return port, reference
