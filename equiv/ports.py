"""The port protocol (version 1): what any JAX implementation provides to be verified, and the
registry.

A port is a factory: `port.load(checkpoint_dir, dtype)` returns a `LoadedModel`. Everything the
harness exchanges with it is numpy (int32 token ids, float arrays keyed by canonical tap name), so
the harness knows neither the framework nor the architecture: what it needs to plan inputs comes
from the loaded model itself (`vocab_size`, `decode_lengths`), never from a config object it would
have to understand. `check_loaded_model` validates a model right after it loads and names, in one
line, every member that is missing or malformed.

Padding: `mask` is None or (b, l) of 0/1, 1 for real tokens; sequences are LEFT-padded (zeros
first). A port must give every real position what the reference gives it (for a Mamba-2 port:
padded positions are zeroed before the conv and the SSD, so a padded row equals the sequence alone
up to what the reference itself leaks; docs/porting-bugs.md #6). Outputs at padded positions are
never compared.

Ports are named by their family (equiv/families.py: `builtin` is the family's own port, e.g.
`mamba2-jax` an adapter) or given as `module:attr`, where attr is a Port instance, or a class /
zero-argument callable returning one.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from equiv.errors import EquivError, first_line, quote


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


PROTOCOL_VERSION = 1


@runtime_checkable
class LoadedModel(Protocol):
    tap_names: list[str]  # canonical names in execution order, 'logits' last
    vocab_size: int  # token ids it accepts are [0, vocab_size): the harness draws inputs from it
    decode_lengths: tuple[int, ...]
    """Prompt lengths at which the port's algorithm changes regime (a Mamba-2 port: its SSD chunk
    size; any port: its conv width); the decode plan's prompts straddle each (n-1, n, n+1)."""

    def info(self) -> PortInfo: ...

    def forward(self, ids: np.ndarray, mask: np.ndarray | None = None,
                taps: bool = True) -> dict[str, np.ndarray]:
        """Full forward. Returns {tap: array}; always contains 'logits' (b, l, v)."""

    def forward_isolated(self, ids: np.ndarray, mask: np.ndarray | None,
                         inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Optional. Each tap computed from *given* values of the taps it depends on (the
        reference's own, so an early small error is not mistaken for a later bug). May raise
        TapUnavailable; a model without it has every tap unavailable in isolated mode."""

    def step_logits(self, ids: np.ndarray, mask: np.ndarray | None, prompt_len: int) -> np.ndarray:
        """Teacher-forced decode: prefill ids[:, :prompt_len], then one decode_step per remaining
        token. Returns (b, l - prompt_len + 1, v) logits: the prediction after the prompt and after
        each fed token."""

    def generate(self, prompt: np.ndarray, mask: np.ndarray | None, max_new_tokens: int,
                 eos_id: int | None = None) -> GenerateResult: ...

    # Optional, and every port should provide it (not declared here, so a model without it still
    # satisfies isinstance checks): `memory_estimate(batch, seq_len) -> int`, the bytes its largest
    # forward of (batch, seq_len) tokens holds at its peak (activations, taps, the algorithm's
    # intermediates), and `memory_detail(batch, seq_len) -> str`, what dominates that figure. The
    # harness checks the estimate against the machine's memory before anything of that size is
    # allocated (equiv/memory.py), so a size too large for the machine is one line, not an
    # allocation failure deep in XLA or torch. Without it only the logits the harness itself holds
    # bound the run. The built-in Mamba-2 port's is equiv/mamba2/footprint.py.


MEMBERS = {  # what each use of a loaded model needs, and what it is (for the one-line error)
    "layer-wise diff": {
        "tap_names": "a list of canonical tap names ending with 'logits'",
        "vocab_size": "an int >= 1 (token ids it accepts are [0, vocab_size))",
        "info": "a method () -> equiv.ports.PortInfo",
        "forward": "a method (ids, mask, taps) -> {tap: ndarray}",
    },
    "decode match": {
        "decode_lengths": "a tuple of ints >= 1 (prompt lengths where its algorithm changes regime)",
        "step_logits": "a method (ids, mask, prompt_len) -> (b, l - prompt_len + 1, v) logits",
        "generate": "a method (prompt, mask, max_new_tokens, eos_id) -> equiv.ports.GenerateResult",
    },
}


def _malformed(model, member: str) -> bool:
    value = getattr(model, member, None)
    if value is None:
        return True
    if member == "vocab_size":
        return isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1
    if member == "decode_lengths":
        return (not isinstance(value, tuple | list) or not value
                or not all(isinstance(n, int | np.integer) and not isinstance(n, bool) and n >= 1
                           for n in value))
    if member == "tap_names":
        return not isinstance(value, list | tuple) or not value or value[-1] != "logits"
    return not callable(value)


def check_loaded_model(model, port_name: str, uses=("layer-wise diff",)) -> None:
    """Raise one PortError naming every member `uses` need that the model lacks or has malformed."""
    problems = [f"{member} ({what})" for use in uses for member, what in MEMBERS[use].items()
                if _malformed(model, member)]
    if problems:
        shown = type(model.__dict__.get("_inner", model) if hasattr(model, "__dict__") else model).__name__
        raise PortError(f"port {quote(port_name)}: its loaded model ({shown}) does not follow "
                        f"the port protocol v{PROTOCOL_VERSION} (equiv/ports.py) for the "
                        f"{' and '.join(uses)}: expected " + "; ".join(problems))


@runtime_checkable
class Port(Protocol):
    name: str

    def load(self, checkpoint_dir: Path, dtype: str = "float32") -> LoadedModel: ...


def port_names(family=None) -> list[str]:
    """Registered port names: those of `family` (a Family), or of every family."""
    from equiv.families import all_families

    fams = [family] if family is not None else all_families()
    return sorted({name for f in fams for name in f.ports})


def _registered(spec: str, family):
    """(target 'module:attr', hint) for a registered name, in `family` (or, without one, the
    only family that has it); None when `spec` names no registered port."""
    from equiv.families import all_families

    if family is not None:
        if spec in family.ports:
            return family.ports[spec]
        owners = [f.title for f in all_families() if spec in f.ports]
        if owners:
            raise PortError(f"port {quote(spec)}: expected a port for {family.title} checkpoints "
                            f"({', '.join(sorted(family.ports))} or 'module:attr'), got one for "
                            f"{' and '.join(owners)} checkpoints")
        return None
    owners = [f for f in all_families() if spec in f.ports]
    if len(owners) > 1:
        raise PortError(f"port {quote(spec)}: every family has one; expected a checkpoint to choose the "
                        f"family ({', '.join(f.name for f in owners)})")
    return owners[0].ports[spec] if owners else None


def resolve_port(spec: str, family=None) -> Port:
    """A registered name (`builtin`: the family's own port) or `module:attr` -> a Port instance.
    `family` (an equiv.families.Family) picks among same-named ports. Errors name what was expected.
    A `module:attr` plug-in comes back wrapped (equiv/plugins.py): every call into it is checked."""
    from equiv.plugins import PLUGIN_EXCEPTIONS, CheckedPort, call, member

    target = _registered(spec, family) or spec
    if ":" not in target:
        raise PortError(f"port: expected one of {port_names(family)} or 'module:attr', got {quote(spec)}")
    module_name, attr = target.split(":", 1)
    who = f"port {quote(spec)}"
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        hint = (f" (install the optional extra: pip install 'ssm-equiv[{spec}]')"
                if target != spec and spec != "builtin" else "")
        raise PortError(f"{who}: cannot import module {quote(module_name)}: {first_line(e, 200)}"
                        f"{hint}") from None
    except PLUGIN_EXCEPTIONS as e:  # importing runs the plug-in's module code
        raise PortError(f"{who}: importing {quote(module_name)} raised {type(e).__name__}: "
                        f"{first_line(e, 200)}") from None
    obj = member(who, module, attr)
    if obj is None:
        raise PortError(f"{who}: module {quote(module_name)} has no attribute {quote(attr)}")
    plugin = target == spec  # given as module:attr, not registered by a family: not our code
    if isinstance(obj, type) or (callable(obj) and not _is_port(who, obj)):
        obj = call(who, f"calling {attr}()", obj)
    if not _is_port(who, obj):
        raise PortError(f"{who}: expected an object with .name and .load(checkpoint_dir, dtype), "
                        f"got {type(obj).__name__}")
    return CheckedPort(who, obj, spec) if plugin else obj


def _is_port(who: str, obj) -> bool:
    """The Port protocol, each member read guarded (a hostile __getattr__ is not a traceback)."""
    from equiv.plugins import member

    return member(who, obj, "name") is not None and callable(member(who, obj, "load"))
