"""The port protocol: what any JAX implementation provides to be verified, and the registry.

A port is a factory: `port.load(checkpoint_dir, dtype)` returns a `LoadedModel`. Everything the
harness exchanges with it is numpy (int32 token ids, float arrays keyed by canonical tap name), so
the harness knows neither the framework nor the architecture. A new SSM variant plugs in as a port,
a reference runner and a tap map; nothing in compare / layerwise / decode / report changes.

Ports are named in the registry (`builtin`, `mamba2-jax`) or given as `module:attr`, where attr is a
Port instance, or a class / zero-argument callable returning one.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from equiv.errors import EquivError


class PortError(EquivError):
    """A port name that cannot be resolved, or a port that does not satisfy the protocol."""


class TapUnavailable(EquivError):
    """Raised by a port for an operation it cannot provide (e.g. isolated mode); the harness marks
    the affected taps 'unavailable' instead of failing."""


@dataclass
class GenerateResult:
    """Greedy generation: `tokens` (b, new) int32, `margins` (b, new) float32 top-1 minus top-2
    logit at each step, `steps` the number of tokens actually produced (EOS may stop early)."""

    tokens: np.ndarray
    margins: np.ndarray
    steps: int


@dataclass
class PortInfo:
    """What a report says about the port that ran."""

    name: str
    version: str
    details: dict = field(default_factory=dict)  # precision settings, backend, anything relevant


@runtime_checkable
class LoadedModel(Protocol):
    tap_names: list[str]  # canonical names in execution order, 'logits' last

    def info(self) -> PortInfo: ...

    def forward(self, ids: np.ndarray, mask: np.ndarray | None = None,
                taps: bool = True) -> dict[str, np.ndarray]:
        """Full forward. Returns {tap: array}; always contains 'logits' (b, l, v)."""

    def forward_isolated(self, ids: np.ndarray, mask: np.ndarray | None,
                         inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each tap computed from *given* values of the taps it depends on (the reference's own,
        so an early small error is not mistaken for a later bug). May raise TapUnavailable."""

    def step_logits(self, ids: np.ndarray, mask: np.ndarray | None, prompt_len: int) -> np.ndarray:
        """Teacher-forced decode: prefill ids[:, :prompt_len], then one decode_step per remaining
        token. Returns (b, l - prompt_len + 1, v) logits: the prediction after the prompt and after
        each fed token."""

    def generate(self, prompt: np.ndarray, mask: np.ndarray | None, max_new_tokens: int,
                 eos_id: int | None = None) -> GenerateResult: ...


@runtime_checkable
class Port(Protocol):
    name: str

    def load(self, checkpoint_dir: Path, dtype: str = "float32") -> LoadedModel: ...


REGISTRY: dict[str, str] = {
    "builtin": "equiv.mamba2.port:Mamba2Port",
    "mamba2-jax": "equiv.adapters.mamba2_jax:Mamba2JaxPort",
}


def resolve_port(spec: str) -> Port:
    """A registry name or `module:attr` -> a Port instance. Errors name what was expected."""
    target = REGISTRY.get(spec, spec)
    if ":" not in target:
        raise PortError(f"port: expected one of {sorted(REGISTRY)} or 'module:attr', got {spec!r}")
    module_name, attr = target.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        hint = (" (install the optional extra: pip install 'ssm-equiv[mamba2-jax]')"
                if spec == "mamba2-jax" else "")
        raise PortError(f"port {spec!r}: cannot import module {module_name!r}: {e}{hint}") from None
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise PortError(f"port {spec!r}: module {module_name!r} has no attribute {attr!r}") from None
    if isinstance(obj, type) or (callable(obj) and not isinstance(obj, Port)):
        try:
            obj = obj()
        except TypeError as e:
            raise PortError(f"port {spec!r}: {attr} must be a Port or take no arguments ({e})") from None
    port = obj
    if not isinstance(port, Port):
        raise PortError(f"port {spec!r}: expected an object with .name and .load(checkpoint_dir, dtype), "
                        f"got {type(port).__name__}")
    return port
