"""Planted numerics defects: a cancelling segsum (row 10, tests/planted_ssd.py) and TF32 matmuls
(row 11); the math is right, the float32 rounding is not. "Row N" is porting bug #N of
docs/porting-bugs.md."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from equiv.mamba2 import model as m
from tests.planted_ssd import ssd_chunked_cumsum_difference
from tests.planting import Defect

f32 = jnp.float32

_linear = m.linear  # the correct function, captured at import


def round_to_tf32(x):
    """Round float32 to TF32 (10 explicit mantissa bits), nearest-even, as a GPU tensor core does."""
    u = jax.lax.bitcast_convert_type(x.astype(f32), jnp.uint32)
    lsb = (u >> 13) & jnp.uint32(1)
    u = (u + jnp.uint32(0xFFF) + lsb) & jnp.uint32(0xFFFFE000)
    return jax.lax.bitcast_convert_type(u, f32)


def linear_tf32(x, w, b=None):
    """Row 11: float32 matmuls run as TF32 (both operands rounded, float32 accumulation)."""
    w = tuple(round_to_tf32(blk) for blk in w) if isinstance(w, (tuple, list)) else round_to_tf32(w)
    x = tuple(map(round_to_tf32, x)) if isinstance(x, tuple) else round_to_tf32(x)
    return _linear(x, w, b)


NUMERICS_DEFECTS = (
    Defect("segsum_cumsum_difference", "10", ((m, "ssd_chunked", ssd_chunked_cumsum_difference),),
           "segsum as a difference of cumulative sums over each chunk"),
    Defect("tf32_matmuls", "11", ((m, "linear", linear_tf32),), "float32 matmuls rounded to TF32"),
)
