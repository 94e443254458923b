"""Hypothesis strategies for the Mamba-3 SSM (equiv.mamba3.ssm): whole instances.

As for the other families' properties, shapes come from a few buckets so each jitted form compiles
once per bucket, not once per example; a bucket also fixes the jit-static structure (SISO or MIMO
and its rank, the rope fraction, an initial state or none) and the chunk sizes and split offset its
properties use. Values are drawn freely: a numpy seed plus bounded scalars that steer the regime.

Layouts are equiv.mamba3.ssm's: x (b, l, h, p), dt, A, trap (b, l, h), B, C (b, l, R, h, n),
angle (b, l, a), D (h,), mimo_x (h, R, p) or None, state: State or None.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from equiv.mamba3.oracle import State


@dataclass(frozen=True)
class Bucket:
    """Shapes and jit-static structure of one bucket. `rank` 0 is SISO (R = 1, pairs (2i, 2i+1), no
    mimo_x); >= 1 is MIMO of that rank (pairs (i, i + n/2), mimo_x present). `rope` is the rope
    fraction (a = n x rope / 2 angles). `split` (0 < split < l) is the split-prefill offset;
    `chunk` and `alt_chunk` the chunk sizes the chunked form is drawn at."""

    name: str
    b: int
    l: int
    h: int
    p: int
    n: int
    rank: int
    rope: float
    chunk: int
    alt_chunk: int
    split: int
    initial_state: bool

    def __post_init__(self) -> None:
        if not 0 < self.split < self.l or min(self.chunk, self.alt_chunk) < 1:
            raise ValueError(f"bucket {self.name}: split must lie in (0, l) and chunks be >= 1")

    @property
    def chunks(self) -> tuple[int, int]:
        return (self.chunk, self.alt_chunk)

    @property
    def mimo(self) -> bool:
        return self.rank > 0

    @property
    def R(self) -> int:
        return max(self.rank, 1)

    @property
    def angles(self) -> int:
        return int(self.n * self.rope) // 2

    @property
    def pairwise(self) -> bool:
        return not self.mimo


# Coverage: l % chunk != 0 (A at 3, C at 7), l < chunk (B: 6 < 8), many chunks (C: 6 of 4), chunk 1
# (D); SISO (A) and MIMO of rank 1 (D), 2 (B) and 4 (C); rope fraction 0.5 (A, C) and 1.0 (B, D);
# an initial state (A, C, D: the carried angle, state, k and v) and none (B); the split on a chunk
# boundary (A, D) and inside a chunk (B, C). Each split halves l, so the prefix and the rest share
# one executable per form. b x h >= 6 independent head sequences in every bucket: a state or a y
# dominated by a few shared roundings (one tanh per position and angle, one angle increment and one
# decay per head) makes the ratio of two float32 errors a ratio of few samples, heavy-tailed
# (measured: with b x h = 1, a correct form reached 4.2x on the last state against the float32
# recurrence, every form alike; with the earlier buckets, b x h from 1 to 4, and the pooled
# reference of equiv.mamba3.ssm_numpy, the sequential split prefill reached 2.05x on B-short
# (b x h = 4) where correct numpy float32 variants of the recurrence measured 0.69x to 1.50x).
BUCKETS: tuple[Bucket, ...] = (
    Bucket("A-siso", b=2, l=16, h=4, p=4, n=8, rank=0, rope=0.5, chunk=4, alt_chunk=3, split=8,
           initial_state=True),
    Bucket("B-short", b=3, l=6, h=2, p=2, n=8, rank=2, rope=1.0, chunk=8, alt_chunk=4, split=3,
           initial_state=False),
    Bucket("C-long", b=2, l=24, h=3, p=2, n=8, rank=4, rope=0.5, chunk=4, alt_chunk=7, split=12,
           initial_state=True),
    Bucket("D-chunk1", b=2, l=8, h=4, p=3, n=4, rank=1, rope=1.0, chunk=1, alt_chunk=3, split=4,
           initial_state=True),
)
BUCKETS_BY_NAME = {bk.name: bk for bk in BUCKETS}

LOG10_DT = (-3.5, 0.5)
LOG10_DECAY = (-3.0, 1.5)
LOG10_FLOOR = (-4.0, 0.5)
FLOORED = (0.0, 1.0)
LOG10_ANGLE = (-1.0, 1.0)
LOG10_X_SCALE = (-2.0, 2.0)
"""Ranges of the regime's scalars. dt is 10**(log10_dt + 0.5 N(0,1)) (~1e-4 to ~10). The raw
decay rate is softplus of N(log10_decay-scaled) values, so |A| spans ~1e-3 to ~30 per unit dt:
A dt from ~1e-7 (weak decay, the state kept) to hundreds (strong: exp underflows, the state is
forgotten). A = min(-|A|, -A_floor) with A_floor 10**log10_floor (1e-4, mamba_ssm's default, to
~3); `floored` is the fraction of positions whose raw rate is pushed below the floor (A exactly at
the floor there). The raw angle is N(0, 10**log10_angle): tanh saturates above ~3, so the
rotation per step runs from ~0.1 pi dt to pi dt."""


@dataclass(frozen=True)
class Regime:
    """The bounded scalars that steer value generation; with the seed they define an instance."""

    seed: int
    log10_dt: float
    log10_decay: float
    log10_floor: float
    floored: float
    log10_angle: float
    log10_x_scale: float


@dataclass(frozen=True, eq=False)
class SSMInstance:
    """One drawn Mamba-3 SSM problem: numpy float32 arrays in equiv.mamba3.ssm's layouts."""

    bucket: Bucket
    regime: Regime
    x: np.ndarray
    dt: np.ndarray
    A: np.ndarray
    trap: np.ndarray
    B: np.ndarray
    C: np.ndarray
    angle: np.ndarray
    D: np.ndarray
    mimo_x: np.ndarray | None
    state: State | None

    def kwargs(self) -> dict:
        """The array arguments of the SSM by keyword (None where absent), pairing included."""
        names = ("x", "dt", "A", "trap", "B", "C", "angle", "D", "mimo_x", "state")
        return {k: getattr(self, k) for k in names} | {"pairwise": self.bucket.pairwise}

    def replace(self, **arrays) -> SSMInstance:
        return dataclasses.replace(self, **arrays)

    def __repr__(self) -> str:
        """What a falsifying example prints: the call that rebuilds it."""
        return f"build_instance({self.bucket.name!r}, {self.regime!r})"

    def _repr_pretty_(self, printer, cycle) -> None:  # hypothesis' printer, instead of the fields
        printer.text(repr(self))


def _softplus(v):
    return np.logaddexp(0.0, v)


def build_instance(bucket: Bucket | str, regime: Regime) -> SSMInstance:
    """Deterministically build the instance a (bucket, regime) pair names; explicit examples use this."""
    bk = BUCKETS_BY_NAME[bucket] if isinstance(bucket, str) else bucket
    rng = np.random.default_rng(regime.seed)
    f32 = np.float32
    b, l, h, p, n, R, a = bk.b, bk.l, bk.h, bk.p, bk.n, bk.R, bk.angles
    floor = 10.0 ** regime.log10_floor
    rate = _softplus(rng.standard_normal((b, l, h)) * 3) * 10.0 ** regime.log10_decay
    rate = np.where(rng.uniform(size=(b, l, h)) < regime.floored, rate * 1e-3, rate)  # below the floor
    A = np.minimum(-rate, -floor)
    state = None
    if bk.initial_state:
        state = State(angle=rng.uniform(-10, 10, (b, h, a)).astype(f32),
                      ssm=rng.standard_normal((b, h, p, n)).astype(f32),
                      k=rng.standard_normal((b, R, h, n)).astype(f32),
                      v=(rng.standard_normal((b, h, p)) * 10.0 ** regime.log10_x_scale).astype(f32))
    return SSMInstance(
        bucket=bk, regime=regime,
        x=(rng.standard_normal((b, l, h, p)) * 10.0 ** regime.log10_x_scale).astype(f32),
        dt=(10.0 ** (regime.log10_dt + 0.5 * rng.standard_normal((b, l, h)))).astype(f32),
        A=A.astype(f32),
        trap=(1 / (1 + np.exp(-2 * rng.standard_normal((b, l, h))))).astype(f32),
        B=(1 + rng.standard_normal((b, l, R, h, n))).astype(f32),
        C=(1 + rng.standard_normal((b, l, R, h, n))).astype(f32),
        angle=(rng.standard_normal((b, l, a)) * 10.0 ** regime.log10_angle).astype(f32),
        D=rng.standard_normal(h).astype(f32),
        mimo_x=(1 / R + 0.5 * rng.standard_normal((h, R, p))).astype(f32) if bk.mimo else None,
        state=state,
    )


def _bounded(lo: float, hi: float):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


@st.composite
def regimes(draw) -> Regime:
    return Regime(seed=draw(st.integers(0, 2**32 - 1)), log10_dt=draw(_bounded(*LOG10_DT)),
                  log10_decay=draw(_bounded(*LOG10_DECAY)), log10_floor=draw(_bounded(*LOG10_FLOOR)),
                  floored=draw(_bounded(*FLOORED)), log10_angle=draw(_bounded(*LOG10_ANGLE)),
                  log10_x_scale=draw(_bounded(*LOG10_X_SCALE)))


@st.composite
def ssm_instances(draw, buckets: tuple[Bucket, ...] = BUCKETS) -> SSMInstance:
    """A whole Mamba-3 SSM instance: a bucket (shapes and structure) and freely drawn values."""
    return build_instance(draw(st.sampled_from(buckets)), draw(regimes()))


@st.composite
def instances_and_chunks(draw, buckets: tuple[Bucket, ...] = BUCKETS) -> tuple[SSMInstance, int]:
    """An instance and one of its bucket's chunk sizes."""
    inst = draw(ssm_instances(buckets))
    return inst, draw(st.sampled_from(inst.bucket.chunks), label="chunk")


__all__ = ["BUCKETS", "BUCKETS_BY_NAME", "Bucket", "Regime", "SSMInstance", "build_instance",
           "instances_and_chunks", "regimes", "ssm_instances"]
