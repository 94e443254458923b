"""What every torch reference runner does to capture canonical taps: resolve a tap map to the
model's modules (for forward hooks) and hand tensors back as numpy."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A detached host copy; bfloat16 widened to float32 (numpy has no bfloat16)."""
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy().copy()


def tap_modules(model: torch.nn.Module, tap_map, n_layers: int) -> Iterator[tuple[str, torch.nn.Module, str]]:
    """(tap name, module, kind) for each (tap, module path, kind) of `tap_map`, with "{i}" in a tap
    expanded over the layers."""
    named = dict(model.named_modules())
    for tap, path, kind in tap_map:
        for i in range(n_layers) if "{i}" in tap else [None]:
            yield tap.format(i=i), named[path.format(i=i)], kind
