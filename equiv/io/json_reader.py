"""Strict JSON reading for checkpoint metadata: one small JSON object from a file
(`read_json_object`), then typed values from it (`JsonReader`), every problem named by its key.
"""

from __future__ import annotations

import re
from pathlib import Path

from equiv.errors import ConfigError, bare_or_quoted, quote_path
from equiv.io.bounded import json_type, read_json

MAX_SIZE = 2**31 - 1
"""Largest accepted size or id: XLA indexes with int32, and token ids are cast to int32."""
MAX_CONFIG_BYTES = 16 * 2**20
"""A config.json larger than this is not a config (and is not read into memory)."""
# what transformers' PreTrainedConfig accepts as a dtype (it does getattr(torch, name))
_TORCH_FLOAT_NAMES = {"float16", "bfloat16", "float32", "float64", "half", "float", "double"}

UNKNOWN_ATTRS = ("expected only attributes the port maps or knows to be harmless, got unrecognised "
                 "ones that may change the numerics: ")


# ---------------------------------------------------------------------------------------------
# Value checks (for the config readers of every family): each returns a problem string (naming the
# key, what was expected, what came) or None.


def show(v) -> str:
    """A config value in a message: repr-style (control characters escaped), shortened in the
    middle, with its Python type."""
    try:
        text = repr(v)
    except ValueError:  # an int past the digit limit
        text = f"<{type(v).__name__} too large to print>"
    if len(text) > 60:
        text = f"{text[:28]}...{text[-28:]}"
    return f"{text} ({type(v).__name__})"


def is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def int_problem(name: str, v, lo: int = 1, hi: int = MAX_SIZE) -> str | None:
    # bool is an int subclass and 64.0 == 64: both are refused, a config must say what it means
    if type(v) is not int or not lo <= v <= hi:
        return f"{name}: expected an integer in [{lo}, {hi}], got {show(v)}"
    return None


def unknown_keys(raw: dict, known: set, prefix: str = "") -> list[str]:
    """The keys of `raw` not in `known`, sorted, for a message (a hostile one quoted)."""
    return [bare_or_quoted(prefix + k) for k in sorted(str(k) for k in set(raw) - known)]


def _json_float(v, floats_only: bool = False) -> float:
    """A JSON number, or transformers' (>= 5) encoding of a non-finite one: {"__float__": "Infinity"}.
    `floats_only` refuses JSON integers, as transformers' strict `Mamba2Config` does for its floats."""
    if isinstance(v, dict) and set(v) == {"__float__"} and v["__float__"] in ("Infinity", "-Infinity", "NaN"):
        return float(v["__float__"].replace("Infinity", "inf"))
    if not (isinstance(v, float) if floats_only else is_real(v)):
        raise TypeError(v)
    return float(v)


def _is_label_map(v, keys_int: bool) -> bool:
    """transformers' id2label (int-like keys, str values) or label2id (values all int or all str).
    {"__float__": ...} is no map: transformers decodes it to a float."""
    if not isinstance(v, dict) or set(v) == {"__float__"}:
        return False
    if keys_int:
        return (all(re.fullmatch(r"\s*[-+]?\d+\s*", k) for k in v)
                and all(isinstance(x, str) for x in v.values()))
    return all(type(x) is int for x in v.values()) or all(isinstance(x, str) for x in v.values())


class JsonReader:
    """Reads typed values from one JSON object, collecting every problem (named `prefix + key`)."""

    def __init__(self, raw: dict, prefix: str = "", floats_only: bool = False):
        self.raw, self.prefix, self.problems, self.floats_only = raw, prefix, [], floats_only
        self.number = "a float (transformers refuses integers here)" if floats_only else "a number"

    def _bad(self, key, what, v):
        self.problems.append(f"{self.prefix}{key}: expected {what}, got {show(v)}")

    def int(self, key, default, lo=1):
        v = self.raw.get(key, default)
        if p := int_problem(self.prefix + key, v, lo=lo):
            self.problems.append(p)
            return default
        return v

    def bool(self, key, default):
        v = self.raw.get(key, default)
        if not isinstance(v, bool):
            self._bad(key, "true or false", v)
            return default
        return v

    def float(self, key, default):
        v = self.raw.get(key, default)
        try:
            return _json_float(v, self.floats_only)
        except TypeError:
            self._bad(key, self.number, v)
            return default

    def pair(self, key, default):
        v = self.raw.get(key, default)
        try:
            if not isinstance(v, (list, tuple)) or len(v) != 2:
                raise TypeError(v)
            return tuple(_json_float(x, self.floats_only) for x in v)
        except TypeError:
            self._bad(key, f"a pair [lo, hi], each {self.number}", v)
            return default

    def token(self, key, default, vocab, lists=True):
        """An id, a list of ids (the first is used; only where `lists`), or null. Ids outside the
        vocabulary never come out of the model, so they are dropped (None) rather than refused."""
        v = self.raw.get(key, default)
        ids = v if isinstance(v, list) and lists else [v]
        if v is None or ids == []:
            return None
        if any(type(i) is not int for i in ids):
            self._bad(key, "a token id, a list of token ids, or null" if lists else "a token id or null", v)
            return None
        return ids[0] if type(vocab) is int and 0 <= ids[0] < vocab else None

    def check_types(self, kinds: dict) -> None:
        """Type-check attributes whose value we ignore but a strict reader (transformers) does not."""
        for key, kind in kinds.items():
            if key not in self.raw:
                continue
            v = self.raw[key]
            if kind == "float":
                self.float(key, None)
            elif kind == "bool":
                self.bool(key, None)
            elif kind == "token":
                self.token(key, None, None, lists=False)
            elif kind == "int_or_str" and not (type(v) is int or isinstance(v, str)):
                self._bad(key, "an integer or a string", v)
            elif kind == "id2label" and not (v is None or _is_label_map(v, keys_int=True)):
                self._bad(key, 'null or an object {"0": "label", ...}', v)
            elif kind == "label2id" and not (v is None or _is_label_map(v, keys_int=False)):
                self._bad(key, 'null or an object {"label": 0, ...} (ids all ints or all strings)', v)
            elif kind == "torch_dtype" and not (v is None or isinstance(v, str) and v in _TORCH_FLOAT_NAMES):
                names = ", ".join(sorted(_TORCH_FLOAT_NAMES))
                self._bad(key, f"null or a torch float dtype name ({names})", v)

    def choice(self, key, default, allowed):
        v = self.raw.get(key, default)
        if not any(type(v) is type(a) and v == a for a in allowed):
            want = " or ".join(map(repr, allowed))
            return f"{self.prefix}{key}: expected {want} (all the port implements), got {show(v)}"
        return None


def read_json_object(path: Path, what: str, error=ConfigError, max_bytes: int = MAX_CONFIG_BYTES) -> dict:
    """A small JSON file holding one object, read through the bounded reader (equiv/io/bounded.py),
    with every failure as `error` naming the file: missing, not a regular file, a symlink loop,
    too large, not UTF-8, not JSON, duplicate keys, nesting too deep, an integer too long to
    convert, not an object."""
    raw = read_json(path, f"a {what}", max_bytes, error)
    if not isinstance(raw, dict):
        raise error(f"{quote_path(path)}: expected a JSON object, got {json_type(raw)}")
    return raw
