"""What the planted-defect ports of the Mamba-1 and Mamba-3 families share: fresh jits of the port's
entry points, and swapping broken functions in wherever the originals are referenced for the
duration of each protocol call."""

from __future__ import annotations

import contextlib
import functools
import types
from collections import Counter

import jax


def rejit(jitted, static):
    """A fresh jit of a clone of `jitted`'s Python function (same code and globals, a new object)."""
    f = jitted.__wrapped__
    clone = types.FunctionType(f.__code__, f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    clone.__kwdefaults__ = f.__kwdefaults__
    return jax.jit(clone, static_argnames=static)


class Swapping:
    """Mixed in before a family's LoadedModel: `_swaps` {(home module, attribute): replacement} is
    applied in every module of `_modules` that references the original, around each protocol call;
    `traced` counts the calls of each broken function (made through `counted`)."""

    _modules: tuple = ()

    def set_swaps(self, overrides, entry_points) -> None:
        """overrides: (home, attr, broken fn); entry_points: (home, name, static argnames) re-jitted."""
        self.traced: Counter = Counter()
        self._swaps = {(home, attr): self.counted(attr, fn) for home, attr, fn in overrides}
        self._swaps |= {(home, name): rejit(getattr(home, name), static)
                        for home, name, static in entry_points}

    def counted(self, name, fn):
        @functools.wraps(fn)
        def broken(*args, **kwargs):
            self.traced[name] += 1
            return fn(*args, **kwargs)
        return broken

    @contextlib.contextmanager
    def _planted(self):
        swaps = [(mod, attr, new) for (home, attr), new in self._swaps.items()
                 for mod in self._modules if getattr(mod, attr, None) is getattr(home, attr)]
        saved = [(mod, attr, getattr(mod, attr)) for mod, attr, _ in swaps]
        try:
            for mod, attr, new in swaps:
                setattr(mod, attr, new)
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
