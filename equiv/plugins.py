"""Calling plug-in code (`--port module:attr`, `--reference module:attr`) without trusting it.

Every call into a plug-in goes through `call`, and everything it returns is checked against what
the harness needs (types, and shapes with the right leading dims) before any of it is used: what
it raises or returns wrong is one `PluginError` line naming the plug-in, the call and what came,
never a traceback from deep inside the harness. `CheckedRunner` and `CheckedModel` wrap a
plug-in's reference runner and loaded model with these checks; members the plug-in lacks stay
absent (the harness tests for optional ones such as `forward_isolated`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from equiv.errors import EquivError, ReferenceChanged, clip, first_line, quote
from equiv.ports import GenerateResult, PortInfo, TapUnavailable

# what a plug-in may raise that must still be one line: SystemExit would end the process with the
# plug-in's status, GeneratorExit escapes `except Exception`; KeyboardInterrupt is the user's.
PLUGIN_EXCEPTIONS = (Exception, SystemExit, GeneratorExit)
PASSED_THROUGH = (TapUnavailable, ReferenceChanged)  # documented signals, not failures


class PluginError(EquivError):
    """A plug-in raised, or returned something that is not what the harness needs."""


def _show(value) -> str:
    """What came back, briefly: its type and, for arrays, shape and dtype."""
    if isinstance(value, np.ndarray):
        return f"an array {value.shape} of {value.dtype}"
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a hostile __repr__
        text = "?"
    return f"{type(value).__name__} {clip(text, 30)}"


def call(who: str, what: str, fn, *args, **kwargs):
    """fn(*args, **kwargs), its failure one PluginError line: `who` names the plug-in ("port
    'my.mod:Port'"), `what` the call ("forward(ids (2, 64), mask, taps=True)")."""
    try:
        return fn(*args, **kwargs)
    except PASSED_THROUGH as e:
        raise type(e)(f"{who}: {what}: {first_line(e, 200)}") from e
    except PLUGIN_EXCEPTIONS as e:  # chained: `equiv --debug` shows the plug-in's own traceback
        raise PluginError(f"{who}: {what} raised {type(e).__name__}: {first_line(e, 200)}") from e


def member(who: str, obj, name: str):
    """getattr that survives a hostile __getattr__ / property: None when absent or failing."""
    try:
        return getattr(obj, name, None)
    except PLUGIN_EXCEPTIONS:
        return None


def as_array(who: str, what: str, value, kinds: str = "fiub") -> np.ndarray:
    """`value` as a numpy array of a numeric dtype (kinds: numpy dtype kinds), or one line."""
    try:
        arr = np.asarray(value)
    except PLUGIN_EXCEPTIONS as e:
        raise PluginError(f"{who}: {what}: expected an array, got {_show(value)} that numpy cannot convert "
                          f"({type(e).__name__})") from None
    if arr.dtype.kind not in kinds:
        raise PluginError(f"{who}: {what}: expected a numeric array, got {_show(arr)}")
    return arr


def check_taps(who: str, what: str, out, shape: tuple[int, int], need: tuple[str, ...] = ()) -> dict:
    """{tap name: array (b, l, ...)} as the harness compares them, validated."""
    if not isinstance(out, Mapping):
        raise PluginError(f"{who}: {what}: expected a dict {{tap name: array (b, l, ...)}}, got {_show(out)}")
    taps = {}
    for name, value in out.items():
        if not isinstance(name, str):
            raise PluginError(f"{who}: {what}: expected tap names as strings, got {_show(name)}")
        arr = as_array(who, f"{what}: tap {quote(name)}", value, "fiu")
        if arr.ndim < 2 or arr.shape[:2] != tuple(shape):
            raise PluginError(f"{who}: {what}: tap {quote(name)}: expected shape (b, l, ...) = "
                              f"({shape[0]}, {shape[1]}, ...), got {arr.shape}")
        taps[name] = arr
    missing = [n for n in need if n not in taps]
    if missing:
        raise PluginError(f"{who}: {what}: expected taps {missing}, got {sorted(map(quote, taps))[:8]}")
    if "logits" in taps and taps["logits"].ndim != 3:
        raise PluginError(f"{who}: {what}: tap 'logits': expected (b, l, v), got {taps['logits'].shape}")
    return taps


def check_step_logits(who: str, out, ids, prompt_len: int) -> np.ndarray:
    what = f"step_logits(ids {tuple(ids.shape)}, mask, {prompt_len})"
    arr = as_array(who, what, out, "f")
    b, length = ids.shape
    if arr.ndim != 3 or arr.shape[:2] != (b, length - prompt_len + 1):
        raise PluginError(f"{who}: {what}: expected (b, l - prompt_len + 1, v) = ({b}, "
                          f"{length - prompt_len + 1}, v), got {arr.shape}")
    return arr


def check_generate(who: str, out, prompt, max_new_tokens: int) -> GenerateResult:
    what = f"generate(prompt {tuple(prompt.shape)}, mask, {max_new_tokens})"
    tokens, margins, steps = (member(who, out, k) for k in ("tokens", "margins", "steps"))
    if tokens is None or margins is None or isinstance(steps, bool) or not isinstance(steps, int | np.int_):
        raise PluginError(f"{who}: {what}: expected a GenerateResult (tokens, margins, steps), got "
                          f"{_show(out)}")
    tokens = as_array(who, what + ".tokens", tokens, "iu")
    margins = as_array(who, what + ".margins", margins, "f")
    b, steps = prompt.shape[0], int(steps)
    if not 0 <= steps <= max_new_tokens or tokens.shape != (b, steps) or margins.shape != tokens.shape:
        raise PluginError(f"{who}: {what}: expected steps in [0, {max_new_tokens}] and tokens, margins of "
                          f"shape (b, steps) = ({b}, steps), got steps {steps}, tokens {tokens.shape}, "
                          f"margins {margins.shape}")
    return GenerateResult(tokens.astype(np.int32), margins.astype(np.float32), steps)


def check_provenance(who: str, out) -> dict:
    if not isinstance(out, Mapping) or not all(isinstance(k, str) for k in out):
        raise PluginError(f"{who}: provenance(): expected a dict with string keys, got {_show(out)}")
    return dict(out)


def check_info(who: str, out) -> PortInfo:
    if not isinstance(out, PortInfo) or not isinstance(out.details, dict):
        raise PluginError(f"{who}: info(): expected an equiv.ports.PortInfo, got {_show(out)}")
    return out


def _ids_shape(ids) -> tuple[int, int]:
    shape = np.shape(ids)
    return (shape[0], shape[1]) if len(shape) == 2 else (0, 0)


class CheckedRunner:
    """A plug-in reference runner behind the checks (see the module docstring)."""

    def __init__(self, who: str, inner):
        self._who, self._inner = who, inner
        for name in ("step_logits", "generate", "logits"):
            if not callable(member(who, inner, name)):
                setattr(self, name, None)  # absent stays absent: the harness tests for it

    def run(self, ids, mask=None):
        out = call(self._who, f"run(ids {np.shape(ids)}, mask)", self._inner.run, ids, mask)
        return check_taps(self._who, f"run(ids {np.shape(ids)}, mask)", out, _ids_shape(ids))

    def provenance(self):
        return check_provenance(self._who, call(self._who, "provenance()", self._inner.provenance))

    def step_logits(self, ids, mask, prompt_len):
        out = call(self._who, "step_logits", self._inner.step_logits, ids, mask, prompt_len)
        return check_step_logits(self._who, out, np.asarray(ids), prompt_len)

    def generate(self, prompt, mask, max_new_tokens, eos_id=None):
        out = call(self._who, "generate", self._inner.generate, prompt, mask, max_new_tokens, eos_id)
        return check_generate(self._who, out, np.asarray(prompt), max_new_tokens)

    def logits(self, ids, mask=None):
        out = call(self._who, "logits", self._inner.logits, ids, mask)
        arr = as_array(self._who, "logits(ids, mask)", out, "f")
        if arr.ndim != 3 or arr.shape[:2] != _ids_shape(ids):
            raise PluginError(f"{self._who}: logits(ids, mask): expected (b, l, v), got {arr.shape}")
        return arr


class CheckedModel:
    """A plug-in port's loaded model behind the checks. Plain attributes (tap_names, vocab_size,
    decode_lengths, anything else) are read through, each read guarded."""

    def __init__(self, who: str, inner):
        self._who, self._inner = who, inner
        for name in ("forward_isolated", "memory_estimate", "memory_detail", "step_logits", "generate"):
            if not callable(member(who, inner, name)):
                setattr(self, name, None)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return getattr(self._inner, name)
        except AttributeError:
            raise
        except PLUGIN_EXCEPTIONS as e:
            raise PluginError(f"{self._who}: reading .{name} raised {type(e).__name__}: "
                              f"{first_line(e, 200)}") from None

    def info(self):
        return check_info(self._who, call(self._who, "info()", self._inner.info))

    def forward(self, ids, mask=None, taps=True):
        what = f"forward(ids {np.shape(ids)}, mask, taps={taps})"
        out = call(self._who, what, self._inner.forward, ids, mask, taps=taps)
        return check_taps(self._who, what, out, _ids_shape(ids), need=("logits",))

    def forward_isolated(self, ids, mask, inputs):
        what = f"forward_isolated(ids {np.shape(ids)}, mask, inputs)"
        out = call(self._who, what, self._inner.forward_isolated, ids, mask, inputs)
        return check_taps(self._who, what, out, _ids_shape(ids))

    def memory_estimate(self, batch, seq_len):
        return call(self._who, f"memory_estimate({batch}, {seq_len})", self._inner.memory_estimate,
                    batch, seq_len)

    def memory_detail(self, batch, seq_len):
        return call(self._who, "memory_detail", self._inner.memory_detail, batch, seq_len)

    def step_logits(self, ids, mask, prompt_len):
        out = call(self._who, "step_logits", self._inner.step_logits, ids, mask, prompt_len)
        return check_step_logits(self._who, out, np.asarray(ids), prompt_len)

    def generate(self, prompt, mask, max_new_tokens, eos_id=None):
        out = call(self._who, "generate", self._inner.generate, prompt, mask, max_new_tokens, eos_id)
        return check_generate(self._who, out, np.asarray(prompt), max_new_tokens)


class CheckedPort:
    """A plug-in port: `load` called through `call`, its model wrapped in CheckedModel."""

    def __init__(self, who: str, inner, name: str):
        self._who, self._inner, self.name = who, inner, name

    def load(self, checkpoint_dir, dtype: str = "float32"):
        model = call(self._who, f"load({quote(str(checkpoint_dir))}, {dtype!r})", self._inner.load,
                     checkpoint_dir, dtype)
        if model is None or isinstance(model, str | int | float | bool | bytes | Mapping | list | tuple):
            raise PluginError(f"{self._who}: load(): expected a loaded model (equiv.ports.LoadedModel), got "
                              f"{_show(model)}")
        return CheckedModel(self._who, model)
