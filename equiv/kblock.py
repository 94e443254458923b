"""K-blocked projection weights: how the built-in ports hold their long-K matmul weights.

On CPU the projections are stored as K-blocks of 256 rows, contracted one block at a time and
summed in order: XLA:CPU's float32 dot accumulates long contractions less accurately than torch's
(RMS error vs float64, XLA / torch: 1.67x at K=512, 2.76x at K=1536, 3.2x at K=2048), enough to
fail the error budget on deeper models although every op is right; blocks of 256 measure 0.8-1.15x
torch's error. The blocks are separate arrays made once at load: slicing one weight inside the
jitted graph makes XLA copy it (5x slower per decode step). On GPU the dot is cuBLAS's, whose
float32 accumulation at precision "highest" stays within budget whole (docs/gpu.md, section 2),
and blocks would only add launches: weights stay whole there. Each family's `linear` contracts a
weight given either way.
"""

from __future__ import annotations

import jax

MATMUL_K_BLOCK = 256
SPLIT_BACKENDS = ("cpu",)


def split_k(w, block: int = MATMUL_K_BLOCK) -> tuple:
    """A (k, o) weight as a tuple of (<=block, o) row blocks."""
    return tuple(w[start:start + block] for start in range(0, w.shape[0], block))


def with_split_projections(params: dict, keys) -> dict:
    """The per-layer weights named in `keys` as K-block tuples."""
    layers = [{k: split_k(v) if k in keys else v for k, v in lp.items()} for lp in params["layers"]]
    return params | {"layers": layers}


def for_backend(params: dict, keys, backend: str | None = None) -> dict:
    """`params` laid out for `backend` (default: JAX's default backend): split on CPU, whole elsewhere."""
    split = (backend or jax.default_backend()) in SPLIT_BACKENDS
    return with_split_projections(params, keys) if split else params
