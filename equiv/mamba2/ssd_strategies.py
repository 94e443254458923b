"""Hypothesis strategies for the SSD layer (equiv.mamba2.ssd): whole instances drawn together.

Shapes come from a small set of buckets so a jitted form compiles once per bucket, not once per
example (XLA recompiles on every new shape, and on every new set of static arguments). Each bucket
also fixes the *structure* of the call (which optional arguments are present, D's rank, softplus,
the dt_limit values), since those are jit-static too; the buckets together cover every option.
Values are drawn freely: a seed for a numpy generator (fast, whole arrays at once) plus a few
bounded scalars that steer the regime (decay strength from near zero to about -10 per step,
input scale).

Layouts are equiv.mamba2.ssd's (mamba_ssm's `mamba_chunk_scan_combined`):
x, z (b, l, h, p)   dt (b, l, h)   A (h,)   B, C (b, l, g, n)   D (h,) or (h, p)   dt_bias (h,)
initial_states (b, h, p, n).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from equiv.mamba2.ssd import DEFAULT_DT_LIMIT


@dataclass(frozen=True)
class Structure:
    """The jit-static part of a call: which optional arguments are present and how."""

    initial_state: bool = False
    D: str = "none"  # "none", "h" (shape (h,)) or "hp" (shape (h, p))
    z: bool = False
    dt_softplus: bool = False
    dt_bias: bool = False  # only together with dt_softplus (raw dt may then be negative)
    dt_limit: tuple[float, float] = DEFAULT_DT_LIMIT


@dataclass(frozen=True)
class Bucket:
    """Shapes (dimension letters of equiv/__init__.py) and the structure of one jit bucket.

    `split` is the split-prefill offset t (0 < t < l) tested for this bucket: prefix and suffix
    are jit buckets of their own, so there is one per bucket, aligned to chunk in some buckets and
    not in others. `alt_chunk` is the second chunk size of the chunk-size invariance check."""

    name: str
    b: int
    l: int
    h: int
    p: int
    n: int
    g: int
    chunk: int
    structure: Structure
    split: int
    alt_chunk: int

    def __post_init__(self) -> None:
        if self.h % self.g or not 0 < self.split < self.l:
            raise ValueError(f"bucket {self.name}: g must divide h and split lie in (0, l)")

    @property
    def split_aligned(self) -> bool:
        return self.split % self.chunk == 0


# Coverage: l % chunk != 0 (A, C), l < chunk (B), l >> chunk (C), chunk 1 (D); g = 1 (B, C), g = h
# (D), 1 < g < h (A: where tiling and repeat_interleave differ, docs/porting-bugs.md #1); D (h,) and
# (h, p) (#8); dt_limit upper (C) and lower (D) (#4); splits aligned (A, D) and unaligned
# (B, C) (#7). Four buckets: each costs every form a compile per test process.
BUCKETS: tuple[Bucket, ...] = (
    Bucket("A-tail", b=1, l=13, h=4, p=8, n=8, g=2, chunk=4,
           structure=Structure(initial_state=True, D="h", z=True, dt_softplus=True, dt_bias=True),
           split=8, alt_chunk=3),
    Bucket("B-short", b=2, l=5, h=2, p=4, n=4, g=1, chunk=8, structure=Structure(), split=2, alt_chunk=3),
    Bucket("C-long", b=2, l=60, h=4, p=4, n=4, g=1, chunk=8,
           structure=Structure(initial_state=True, D="hp", z=True, dt_softplus=True, dt_bias=True,
                               dt_limit=(0.0, 1.5)), split=19, alt_chunk=7),
    Bucket("D-chunk1", b=1, l=7, h=3, p=2, n=4, g=3, chunk=1,
           structure=Structure(initial_state=True, z=True, dt_softplus=True, dt_limit=(0.05, 2.0)),
           split=3, alt_chunk=4),
)
BUCKETS_BY_NAME = {bk.name: bk for bk in BUCKETS}


@dataclass(frozen=True)
class Regime:
    """The bounded scalars that steer value generation; with the seed they define an instance."""

    seed: int
    log10_decay_max: float  # |A| drawn log-uniformly in [1e-4, 10**log10_decay_max]
    log10_x_scale: float  # x scaled by 10**log10_x_scale
    dt_center: float  # raw dt centre: softplus argument, or log10 of dt without softplus


@dataclass(frozen=True, eq=False)
class SSDInstance:
    """One drawn SSD problem: numpy arrays in equiv.mamba2.ssd's layouts plus the static arguments."""

    bucket: Bucket
    regime: Regime
    x: np.ndarray
    dt: np.ndarray
    A: np.ndarray
    B: np.ndarray
    C: np.ndarray
    D: np.ndarray | None
    z: np.ndarray | None
    dt_bias: np.ndarray | None
    initial_states: np.ndarray | None

    @property
    def chunk_size(self) -> int:
        return self.bucket.chunk

    @property
    def structure(self) -> Structure:
        return self.bucket.structure

    def arrays(self) -> dict[str, np.ndarray | None]:
        """The array arguments by equiv.mamba2.ssd keyword (None where absent)."""
        return {k: getattr(self, k) for k in
                ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")}

    def kwargs(self) -> dict:
        """Keyword arguments for ssd_chunked / ssd_scan / ssd_quadratic (add chunk_size for the
        chunked form): every array plus dt_softplus and dt_limit."""
        return {**self.arrays(), "dt_softplus": self.structure.dt_softplus,
                "dt_limit": self.structure.dt_limit}

    def replace(self, **arrays) -> SSDInstance:
        """A copy with some arrays replaced (shapes must stay in the bucket)."""
        return dataclasses.replace(self, **arrays)

    def __repr__(self) -> str:
        """What a falsifying example prints: the call that rebuilds it (paste into @example)."""
        return f"build_instance({self.bucket.name!r}, {self.regime!r})"

    def _repr_pretty_(self, printer, cycle) -> None:  # hypothesis' printer, instead of the fields
        printer.text(repr(self))


def build_instance(bucket: Bucket | str, regime: Regime) -> SSDInstance:
    """Deterministically build the instance a (bucket, regime) pair names; `@example`s use this."""
    bk = BUCKETS_BY_NAME[bucket] if isinstance(bucket, str) else bucket
    s = bk.structure
    rng = np.random.default_rng(regime.seed)
    f32 = np.float32
    b, l, h, p, n, g = bk.b, bk.l, bk.h, bk.p, bk.n, bk.g

    x = rng.standard_normal((b, l, h, p)) * 10.0 ** regime.log10_x_scale
    # |A| log-uniform per head, from almost no decay to strong decay
    A = -np.exp(rng.uniform(np.log(1e-4), np.log(10.0) * regime.log10_decay_max, size=h))
    if s.dt_softplus:
        # raw dt around dt_center (softplus argument in [-6, 3] -> dt in [2.5e-3, 3]); A * dt
        # then reaches about -10 per step at the strong end of the decay range
        dt = regime.dt_center + rng.standard_normal((b, l, h))
    else:
        dt = 10.0 ** (regime.dt_center + 0.5 * rng.standard_normal((b, l, h)))  # > 0
    dt_bias = rng.uniform(-2.0, 2.0, size=h) if s.dt_bias else None
    D = {"none": None, "h": rng.standard_normal(h), "hp": rng.standard_normal((h, p))}[s.D]
    return SSDInstance(
        bucket=bk, regime=regime,
        x=x.astype(f32), dt=dt.astype(f32), A=A.astype(f32),
        B=rng.standard_normal((b, l, g, n)).astype(f32),
        C=rng.standard_normal((b, l, g, n)).astype(f32),
        D=None if D is None else D.astype(f32),
        z=rng.standard_normal((b, l, h, p)).astype(f32) * 2 if s.z else None,
        dt_bias=None if dt_bias is None else dt_bias.astype(f32),
        initial_states=rng.standard_normal((b, h, p, n)).astype(f32) if s.initial_state else None,
    )


def _bounded(lo: float, hi: float):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


@st.composite
def regimes(draw, softplus: bool) -> Regime:
    return Regime(
        seed=draw(st.integers(0, 2**32 - 1)),
        log10_decay_max=draw(_bounded(-3.0, np.log10(16.0))),
        log10_x_scale=draw(_bounded(-2.0, 2.0)),
        dt_center=draw(_bounded(-6.0, 3.0) if softplus else _bounded(-3.0, 0.3)),
    )


@st.composite
def ssd_instances(draw, buckets: tuple[Bucket, ...] = BUCKETS) -> SSDInstance:
    """A whole SSD instance: a bucket (shapes and structure) and freely drawn values."""
    bk = draw(st.sampled_from(buckets))
    return build_instance(bk, draw(regimes(bk.structure.dt_softplus)))
