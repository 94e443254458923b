"""What a family provides to be verified layer by layer, and what the driver calls.

A family names two factories in `Family.streaming` ('module:attr' strings, imported when used):

    "port":      factory(checkpoint_dir, dtype, *, reader) -> StreamedSide   (its built-in port)
    "reference": factory(checkpoint_dir, dtype, *, reader, threads, device) -> StreamedSide
                 (its default reference; dtype "float64" gives the oracle)

`reader` is an equiv.io.layer_reader.TensorIndex the sides of one process share (it keeps the last
layer it read, so a layer is read from disk once for all three sides); a side on another host
builds its own.

A side is a list of stages in execution order (the embedding, each layer, the head). Each stage
reads its own weights when loaded and holds them until the loaded stage is dropped, so one stage of
one side is resident at a time. What a stage hands to the next (hidden state, padding mask) is the
side's 'carry', opaque to the driver: the driver never holds a model, only per-stage callables, so
a stage may run in another process or on another host given its carry.

All taps are numpy, keyed by the canonical names of the family's tap list.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from equiv.errors import EquivError


class LoadedStage(Protocol):
    """One stage with its weights resident."""

    def forward(self, carry: Any, mask: np.ndarray | None) -> tuple[Any, dict[str, np.ndarray]]:
        """The stage on its side's own carry -> (the next stage's carry, this stage's taps). The
        embedding stage's carry is the (b, l) int32 token ids."""

    def forward_isolated(self, ids: np.ndarray, mask: np.ndarray | None,
                         fed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Port only (optional): each tap of this stage from the oracle's inputs to it. `fed` holds the
        oracle's taps of this stage and of the stage before, in the compared dtype (as float32).
        May raise equiv.ports.TapUnavailable."""

    def decode(self, prefill: Any, steps: list, mask: np.ndarray | None) -> tuple[Any, list]:
        """Teacher-forced cached decode through this stage: the prompt's carry and one carry per
        decode step, in order, through a cache this stage keeps to itself -> the same for the next
        stage. The embedding stage gets the prompt ids (b, P) and each step's ids (b,); the head
        returns logits: (b, v) for the prompt's last position and for each step. `mask` is the
        prompt's padding mask (b, P) or None (decode tokens are never padding)."""


class Stage(Protocol):
    label: str  # for progress lines: "embedding", "layer 17/64", "head"
    tap_names: tuple[str, ...]  # the taps it produces, in execution order

    def load(self) -> LoadedStage: ...


@runtime_checkable
class StreamedSide(Protocol):
    stages: list  # of Stage, in execution order
    tap_names: list[str]  # every stage's, in order


def check_sides(port, reference, oracle) -> None:
    """The three sides have stages, in the same number and order (layer i of one side is layer i of
    the others), each with the members the driver calls."""
    for what, side in (("port", port), ("reference", reference), ("oracle", oracle)):
        missing = [m for m in ("stages", "tap_names") if not hasattr(side, m)]
        if missing or not side.stages:
            raise EquivError(f"streamed {what}: expected a side with stages and tap_names, got "
                             f"{type(side).__name__} without {missing or ['any stage']}")
        bad = [type(s).__name__ for s in side.stages if not callable(getattr(s, "load", None))]
        if bad:
            raise EquivError(f"streamed {what}: expected stages with load(), got {bad[0]}")
    labels = [[s.label for s in side.stages] for side in (port, reference, oracle)]
    if not labels[0] == labels[1] == labels[2]:
        raise EquivError(f"streamed sides: expected the same stages on every side, got port "
                         f"{labels[0][:4]}..., reference {labels[1][:4]}..., oracle {labels[2][:4]}... "
                         f"({len(labels[0])}, {len(labels[1])}, {len(labels[2])} stages)")
