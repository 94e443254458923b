"""The planting machinery for deliberately broken variants of the built-in port (the defects are
in tests/planted_*_defects.py): `PlantedModel` wraps a loaded `Mamba2Model` and, for the duration of
each of its calls, swaps functions of equiv.mamba2.model / equiv.mamba2.ssd for broken ones.

How a variant runs: the port's own code paths (`Mamba2Model.forward`, `forward_isolated`,
`step_logits`, `model.forward` with a cache) run un-jitted, and each sub-op they call
(`block_norm`, `mixer_in_proj`, `mixer_conv`, `mixer_ssm`, ..., `decode_step`) is jitted on its own.
Why: one whole-forward compile costs ~5 s on the 2-core CI box (nearly all of it the SSD), and
there are ~25 variants. Sub-ops a defect does not touch use one shared, correct jit per shape; a
sub-op that calls a broken function gets a fresh jit of a clone (jax caches traces per function
*object*: re-jitting the same function reuses its stale trace, measured), traced under the swap.
`_CALLERS` says which sub-ops call which function; if it is wrong the broken function is reached
while a shared op traces, and that raises instead of poisoning the shared cache. Every broken
function counts its traces (`PlantedModel.traced`), so a test asserts the defect really ran.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections import Counter
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from equiv.mamba2 import generate as gen
from equiv.mamba2 import model as m
from equiv.mamba2 import port as port_module
from equiv.mamba2 import ssd
from equiv.mamba2.port import Mamba2Model

_MODULES = (m, gen, port_module, ssd)  # every module that may hold a reference to a swapped function

# the sub-ops jitted one by one (model function -> static arguments)
OPS = {"block_norm": ("cfg", "spans"), "mixer_in_proj": ("cfg",), "mixer_conv": ("cfg",),
       "mixer_ssm": ("cfg", "chunk_size"), "mixer_gated_norm": ("cfg", "spans"),
       "mixer_out_proj": ("cfg",), "block_residual": ("cfg",), "rms_norm": ("eps", "spans"),
       "lm_logits": ("cfg",), "decode_step": ("cfg",)}
# function a defect may replace -> the sub-ops whose trace calls it (read off equiv/mamba2/model.py)
_CALLERS = {
    "gated_rms_norm": ("mixer_gated_norm", "decode_step"),
    "linear": ("mixer_in_proj", "mixer_out_proj", "lm_logits", "decode_step"),
    "causal_conv": ("mixer_conv", "decode_step"),
    "_ssd_args": ("mixer_ssm", "decode_step"),
    "ssd_chunked": ("mixer_ssm",),
    "ssd_step": ("decode_step",),
}
_ORIGINAL_OPS = {name: getattr(m, name) for name in OPS}
_SHARED: dict[str, object] = {}  # op -> the correct op's jit, shared by every PlantedModel
_TRACING_SHARED: list[str] = []  # shared ops being traced right now (a broken function must not run there)


def _clone(f):
    """A new function object with f's code and globals: jax traces it afresh."""
    g = types.FunctionType(f.__code__, f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    g.__kwdefaults__ = f.__kwdefaults__
    return g


def _shared_op(name):
    if name not in _SHARED:
        jitted = jax.jit(_clone(_ORIGINAL_OPS[name]), static_argnames=OPS[name])

        @functools.wraps(_ORIGINAL_OPS[name])
        def guarded(*args, **kwargs):
            _TRACING_SHARED.append(name)
            try:
                return jitted(*args, **kwargs)
            finally:
                _TRACING_SHARED.pop()

        _SHARED[name] = guarded
    return _SHARED[name]


@dataclass(frozen=True)
class Defect:
    """Attributes: name. row: its number in docs/porting-bugs.md ('' for extras). overrides:
    ((module, attribute, broken function), ...). description: what is wrong, in one line."""

    name: str
    row: str
    overrides: tuple = ()
    description: str = ""


class PlantedModel(Mamba2Model):
    """A `LoadedModel` running `defect` (no overrides: the correct port, through the same path)."""

    def __init__(self, base: Mamba2Model, defect: Defect):
        super().__init__(base.cfg, base.params, base.dtype, base.source, base.format, base.precision)
        self.defect = defect
        self.traced: Counter = Counter()  # broken function name -> times traced
        broken = {attr: self._counted(attr, fn) for _, attr, fn in defect.overrides}
        unknown = sorted(set(broken) - set(OPS) - set(_CALLERS))
        if unknown:
            raise ValueError(f"planted overrides {unknown}: expected a sub-op {sorted(OPS)} or a function "
                             f"listed in _CALLERS {sorted(_CALLERS)}")
        fresh = {op for attr in broken for op in _CALLERS.get(attr, ())} | (set(broken) & set(OPS))
        ops = {}
        for name, static in OPS.items():
            if name not in fresh:
                ops[name] = _shared_op(name)
            else:
                ops[name] = jax.jit(broken[name] if name in broken else _clone(_ORIGINAL_OPS[name]),
                                    static_argnames=static)
        unjitted = lambda f: f.__wrapped__  # noqa: E731  the port's jitted entry points, run eagerly
        # (home module, attribute) -> replacement, swapped wherever the original is referenced
        self._swaps = {(m, name): fn for name, fn in ops.items()}
        self._swaps |= {(home, attr): broken[attr] for home, attr, _ in defect.overrides if attr not in OPS}
        self._swaps |= {
            (port_module, "_forward_jit"): unjitted(port_module._forward_jit),
            (port_module, "_isolated_layer"): unjitted(port_module._isolated_layer),
            (gen, "_prefill"): unjitted(gen._prefill),  # gen.prefill (segments) calls it by name
            (gen, "decode_step_jit"): ops["decode_step"],
            (gen, "decode_loop"): jax.jit(_clone(gen.decode_loop.__wrapped__),
                                          static_argnames=("cfg", "max_new_tokens")),
        }

    def _counted(self, name, fn):
        @functools.wraps(fn)
        def broken(*args, **kwargs):
            if _TRACING_SHARED:
                raise RuntimeError(f"planted {name} reached while tracing the shared correct op "
                                   f"{_TRACING_SHARED[-1]}: list that op under {name!r} in _CALLERS")
            self.traced[name] += 1
            return fn(*args, **kwargs)
        return broken

    @contextlib.contextmanager
    def _planted(self):
        """Swap in the broken functions and the per-op jits wherever the originals are referenced."""
        swaps = [(mod, attr, new) for (home, attr), new in self._swaps.items()
                 for mod in _MODULES if getattr(mod, attr, None) is getattr(home, attr)]
        saved = [(mod, attr, getattr(mod, attr)) for mod, attr, _ in swaps]
        try:
            for mod, attr, new in swaps:
                setattr(mod, attr, new)
            with jax.default_matmul_precision(self.precision):
                yield
        finally:
            for mod, attr, old in reversed(saved):
                setattr(mod, attr, old)

    def forward(self, ids, mask=None, taps=True):
        with self._planted():
            return super().forward(ids, mask, taps)

    def forward_isolated(self, ids, mask, inputs):
        with self._planted():
            return super().forward_isolated(ids, mask, inputs)

    def step_logits(self, ids, mask, prompt_len):
        with self._planted():
            return super().step_logits(ids, mask, prompt_len)

    def generate(self, prompt, mask=None, max_new_tokens=32, eos_id=None):
        with self._planted():
            return super().generate(prompt, mask, max_new_tokens, eos_id)

    def continuation_logits(self, ids, split: int) -> np.ndarray:
        """Chunked prefill: `model.forward(ids[:, :split])`, then `model.forward(ids[:, split:],
        cache=...)` continuing from its cache; the logits of both calls joined, (b, l, v)."""
        ids, _ = self._check(ids, None)
        with self._planted():
            first, cache, _ = m.forward(self.params, self.cfg, jnp.asarray(ids[:, :split]))
            second, _, _ = m.forward(self.params, self.cfg, jnp.asarray(ids[:, split:]), cache=cache)
        return np.concatenate([np.asarray(first), np.asarray(second)], axis=1)
