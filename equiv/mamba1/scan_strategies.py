"""Hypothesis strategies for Mamba-1's selective scan (equiv.mamba1.scan): whole instances.

As for the SSD (equiv.strategies), shapes come from a few buckets so each jitted form compiles once
per bucket, not once per example; a bucket also fixes the jit-static structure (initial state and D
present or not) and the chunk sizes and split offset its properties use. Values are drawn freely: a
numpy seed plus three bounded scalars that steer the regime.

Layouts are equiv.mamba1.scan's: x, dt (b, l, e)   A (e, n)   B, C (b, l, n)   D (e,)
initial_state (b, e, n).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st


@dataclass(frozen=True)
class Bucket:
    """Shapes and jit-static structure of one bucket. `split` (0 < split < l) is the split-prefill
    offset; `chunk` and `alt_chunk` the chunk sizes the chunked form is drawn at."""

    name: str
    b: int
    l: int
    e: int
    n: int
    chunk: int
    alt_chunk: int
    split: int
    initial_state: bool
    D: bool

    def __post_init__(self) -> None:
        if not 0 < self.split < self.l or min(self.chunk, self.alt_chunk) < 1:
            raise ValueError(f"bucket {self.name}: split must lie in (0, l) and chunks be >= 1")

    @property
    def chunks(self) -> tuple[int, int]:
        return (self.chunk, self.alt_chunk)


# Coverage: l % chunk != 0 (A at 3, B at 4, C at 7, D at 3), l < chunk (B: 6 < 8), l >> chunk (C: 15
# chunks of 4), chunk 1 (D), n = 1 (B), e = 1 (D); an initial state and D present (A, C, D) and
# absent (B); the split on a chunk boundary (A, D) and inside a chunk (B, C). Each split halves l,
# so the prefix and the rest share one executable per form.
BUCKETS: tuple[Bucket, ...] = (
    Bucket("A-tail", b=1, l=16, e=4, n=8, chunk=4, alt_chunk=3, split=8, initial_state=True, D=True),
    Bucket("B-short", b=2, l=6, e=3, n=1, chunk=8, alt_chunk=4, split=3, initial_state=False, D=False),
    Bucket("C-long", b=2, l=60, e=3, n=4, chunk=4, alt_chunk=7, split=30, initial_state=True, D=True),
    Bucket("D-chunk1", b=1, l=8, e=1, n=4, chunk=1, alt_chunk=3, split=4, initial_state=True, D=True),
)
BUCKETS_BY_NAME = {bk.name: bk for bk in BUCKETS}

LOG10_DECAY_MAX = (-3.0, float(np.log10(16.0)))
LOG10_X_SCALE = (-2.0, 2.0)
LOG10_DT = (-4.0, 1.0)
"""Ranges of the regime's scalars. |A| is log-uniform in [1e-4, 10**log10_decay_max]: from almost
no decay to 16 per unit dt (Mamba-1's S4D-real init is A = -(1..n)). dt is 10**(log10_dt + 0.5 N(0,1)):
from ~1e-5 (near 0: the state barely moves) to ~30 (softplus of a large dt_proj output). dt |A|
then spans ~1e-9 (weak decay) to several hundred (exp underflows to 0: the state is forgotten)."""


@dataclass(frozen=True)
class Regime:
    """The bounded scalars that steer value generation; with the seed they define an instance."""

    seed: int
    log10_decay_max: float
    log10_x_scale: float
    log10_dt: float


@dataclass(frozen=True, eq=False)
class ScanInstance:
    """One drawn selective-scan problem: numpy float32 arrays in equiv.mamba1.scan's layouts."""

    bucket: Bucket
    regime: Regime
    x: np.ndarray
    dt: np.ndarray
    A: np.ndarray
    B: np.ndarray
    C: np.ndarray
    D: np.ndarray | None
    initial_state: np.ndarray | None

    def kwargs(self) -> dict:
        """The array arguments of selective_scan by keyword (None where absent)."""
        return {k: getattr(self, k) for k in ("x", "dt", "A", "B", "C", "D", "initial_state")}

    def replace(self, **arrays) -> ScanInstance:
        return dataclasses.replace(self, **arrays)

    def __repr__(self) -> str:
        """What a falsifying example prints: the call that rebuilds it."""
        return f"build_instance({self.bucket.name!r}, {self.regime!r})"

    def _repr_pretty_(self, printer, cycle) -> None:  # hypothesis' printer, instead of the fields
        printer.text(repr(self))


def build_instance(bucket: Bucket | str, regime: Regime) -> ScanInstance:
    """Deterministically build the instance a (bucket, regime) pair names; explicit examples use this."""
    bk = BUCKETS_BY_NAME[bucket] if isinstance(bucket, str) else bucket
    rng = np.random.default_rng(regime.seed)
    f32 = np.float32
    b, l, e, n = bk.b, bk.l, bk.e, bk.n
    x = rng.standard_normal((b, l, e)) * 10.0 ** regime.log10_x_scale
    dt = 10.0 ** (regime.log10_dt + 0.5 * rng.standard_normal((b, l, e)))
    A = -np.exp(rng.uniform(np.log(1e-4), np.log(10.0) * regime.log10_decay_max, size=(e, n)))
    return ScanInstance(
        bucket=bk, regime=regime,
        x=x.astype(f32), dt=dt.astype(f32), A=A.astype(f32),
        B=rng.standard_normal((b, l, n)).astype(f32),
        C=rng.standard_normal((b, l, n)).astype(f32),
        D=rng.standard_normal(e).astype(f32) if bk.D else None,
        initial_state=rng.standard_normal((b, e, n)).astype(f32) if bk.initial_state else None,
    )


def _bounded(lo: float, hi: float):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


@st.composite
def regimes(draw) -> Regime:
    return Regime(seed=draw(st.integers(0, 2**32 - 1)), log10_decay_max=draw(_bounded(*LOG10_DECAY_MAX)),
                  log10_x_scale=draw(_bounded(*LOG10_X_SCALE)), log10_dt=draw(_bounded(*LOG10_DT)))


@st.composite
def scan_instances(draw, buckets: tuple[Bucket, ...] = BUCKETS) -> ScanInstance:
    """A whole selective-scan instance: a bucket (shapes and structure) and freely drawn values."""
    return build_instance(draw(st.sampled_from(buckets)), draw(regimes()))


@st.composite
def instances_and_chunks(draw, buckets: tuple[Bucket, ...] = BUCKETS) -> tuple[ScanInstance, int]:
    """An instance and one of its bucket's chunk sizes."""
    inst = draw(scan_instances(buckets))
    return inst, draw(st.sampled_from(inst.bucket.chunks), label="chunk")


__all__ = ["BUCKETS", "BUCKETS_BY_NAME", "Bucket", "Regime", "ScanInstance", "build_instance",
           "instances_and_chunks", "regimes", "scan_instances"]
