"""Mamba-3 config: the frozen dataclass the port and the oracle are built from, and its validation.

Read strictly from a checkpoint's config.json by `config_file.load_config` (mamba_ssm's
`MambaLMHeadModel` dialect with `ssm_cfg.layer` "Mamba3", `config_mamba_ssm`; docs/mamba3-layout.md
says why that layout). Every field is type- and range-checked at construction, and all problems of
one config come in one `ConfigError`. The derived sizes follow mamba_ssm 2.3.2.post1's
`Mamba3.__init__` exactly (modules/mamba3.py).
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass

from equiv.errors import ConfigError
from equiv.io.json_reader import int_problem, is_real, show

FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.401298464324817e-45  # the smallest float32 above 0 (a subnormal)

INT_FIELDS = ("vocab_size", "d_model", "n_layers", "d_state", "expand", "headdim", "ngroups", "mimo_rank",
              "chunk_size")
BOOL_FIELDS = ("is_outproj_norm", "is_mimo", "residual_in_fp32", "fused_add_norm", "tie_embeddings")
ROPE_FRACTIONS = (0.5, 1.0)  # Mamba3.__init__ asserts one of these
MODEL_TYPES = ("mamba3",)


@dataclass(frozen=True, kw_only=True)
class Mamba3Config:
    """Attributes:
    vocab_size: rows of the embedding (v, already padded to pad_vocab_size_multiple). d_model: width
    (d). n_layers: blocks. d_state: n, the B/C width per group and rank. expand: d_inner (e) =
    expand * d_model. headdim: p; nheads (h) = e / p. ngroups: g, B/C groups (h % g == 0; mamba_ssm
    calls them num_bc_heads). rope_fraction: 0.5 or 1.0, the fraction of n that rotates (a =
    num_rope_angles pairs). A_floor: A = min(-softplus(dd_A), -A_floor). is_outproj_norm: a gated
    RMSNorm (per headdim group) instead of the plain silu(z) gate. is_mimo / mimo_rank: MIMO with
    rank R (mamba_ssm forces R = 1 without MIMO; so does this config: mimo_rank must be 1 then).
    chunk_size: the prefill's chunk length (the kernels' and this port's). norm_eps: the block and
    final RMSNorms' epsilon (mamba_ssm's 1e-5). residual_in_fp32: keep the residual stream in
    float32. fused_add_norm: mamba_ssm's fused add + RMSNorm, which normalises the (float32)
    residual itself; without it the residual is rounded to the model dtype first (the two differ in
    bfloat16 only). tie_embeddings: lm_head = embedding. eos_token_id / pad_token_id: for generation.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    d_state: int = 128
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    rope_fraction: float = 0.5
    A_floor: float = 1e-4
    is_outproj_norm: bool = False
    is_mimo: bool = False
    mimo_rank: int = 1
    chunk_size: int = 64
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    fused_add_norm: bool = True
    tie_embeddings: bool = True
    model_type: str = "mamba3"
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        for name in (*INT_FIELDS, "eos_token_id", "pad_token_id"):  # numpy ints from Python callers
            v = getattr(self, name)
            if isinstance(v, numbers.Integral) and not isinstance(v, bool) and type(v) is not int:
                object.__setattr__(self, name, int(v))
        problems = [p for name in INT_FIELDS if (p := int_problem(name, getattr(self, name)))]
        problems += [f"{name}: expected true or false, got {show(getattr(self, name))}"
                     for name in BOOL_FIELDS if not isinstance(getattr(self, name), bool)]
        for name in ("eos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if v is not None and (p := int_problem(name, v, lo=0)):
                problems.append(p + " or null")
        for name in ("norm_eps", "A_floor"):
            if not is_real(getattr(self, name)):
                problems.append(f"{name}: expected a number, got {show(getattr(self, name))}")
        if not (is_real(self.rope_fraction) and float(self.rope_fraction) in ROPE_FRACTIONS):
            problems.append(f"rope_fraction: expected 0.5 or 1.0 (all mamba_ssm's Mamba3 accepts), "
                            f"got {show(self.rope_fraction)}")
        if not (isinstance(self.model_type, str) and self.model_type in MODEL_TYPES):
            problems.append(f"model_type: expected one of {MODEL_TYPES}, got {show(self.model_type)}")
        if problems:
            raise ConfigError("config: " + "; ".join(problems))
        # Normalise (still inside construction): the config is a static jit argument, so it must
        # hash, and 1 vs 1.0 must not make two configs (and two compilations).
        for name in ("norm_eps", "A_floor", "rope_fraction"):
            object.__setattr__(self, name, float(getattr(self, name)))
        self._check_consistent()

    def _check_consistent(self) -> None:
        problems = []
        if not FLOAT32_TINY <= self.norm_eps <= FLOAT32_MAX:  # NaN fails too
            problems.append(f"norm_eps: expected a finite value > 0 that float32 holds "
                            f"(in [{FLOAT32_TINY:.3g}, {FLOAT32_MAX:.4g}]), got {self.norm_eps}")
        if not 0.0 <= self.A_floor <= FLOAT32_MAX:
            problems.append(f"A_floor: expected a finite value >= 0 that float32 holds, got {self.A_floor}")
        if self.d_inner > 2**31 - 1:
            problems.append(f"expand x d_model (d_inner): expected at most 2**31 - 1, got {self.d_inner}")
        elif self.d_inner % self.headdim:
            problems.append(f"headdim: expected a divisor of d_inner = expand x d_model = {self.d_inner}, "
                            f"got {self.headdim}")
        elif self.nheads % self.ngroups:
            problems.append(f"ngroups: expected a divisor of nheads = {self.nheads}, got {self.ngroups}")
        if self.num_rope_angles < 1:
            problems.append(f"d_state: expected at least one rotated pair (d_state x rope_fraction >= 2), "
                            f"got d_state {self.d_state} with rope_fraction {self.rope_fraction}")
        if not self.is_mimo and self.mimo_rank != 1:
            problems.append(f"mimo_rank: expected 1 without MIMO (mamba_ssm uses rank 1 then), "
                            f"got {self.mimo_rank} with is_mimo false")
        for name in ("eos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if v is not None and not (0 <= v < self.vocab_size):
                problems.append(f"{name}: expected an id in [0, vocab_size={self.vocab_size}), got {v}")
        if problems:
            raise ConfigError("config contradicts itself: " + "; ".join(problems))

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def rank(self) -> int:
        """R: mimo_rank with MIMO, 1 without."""
        return self.mimo_rank if self.is_mimo else 1

    @property
    def num_rope_angles(self) -> int:
        """a: the rotated pairs. mamba_ssm: int(d_state x rope_fraction), made even, halved."""
        split = int(self.d_state * self.rope_fraction)
        return (split - split % 2) // 2

    @property
    def rotate_pairwise(self) -> bool:
        """Which components form a rotated pair: SISO rotates (2i, 2i+1) (mamba_ssm's Triton SISO
        kernel); MIMO rotates (i, i + n/2) (its TileLang kernel and `rotate_pairwise=not is_mimo`
        in `Mamba3.step`). i < a in both; the other components pass through."""
        return not self.is_mimo

    @property
    def bc_dim(self) -> int:
        """The width of B (and of C) in in_proj's output: R x g x n, laid out (r g n)."""
        return self.rank * self.ngroups * self.d_state

    @property
    def in_proj_dim(self) -> int:
        """z | x | B | C | dd_dt | dd_A | trap | angle."""
        return 2 * self.d_inner + 2 * self.bc_dim + 3 * self.nheads + self.num_rope_angles

    @property
    def in_proj_splits(self) -> tuple[int, ...]:
        e, bc, h = self.d_inner, self.bc_dim, self.nheads
        return (e, e, bc, bc, h, h, h, self.num_rope_angles)

    @property
    def decode_lengths(self) -> tuple[int, ...]:
        """Prompt lengths where a Mamba-3 forward changes regime (port protocol v1): 2, where the
        trapezoid's previous-token term first appears, and the chunk boundary."""
        return tuple(sorted({2, self.chunk_size}))

    @classmethod
    def tiny(cls, **overrides) -> Mamba3Config:
        """A 2-layer SISO model small enough for unit tests (chunk 8, so 3 chunks fit in 24 tokens)."""
        base = dict(vocab_size=96, d_model=32, n_layers=2, d_state=16, headdim=16, ngroups=2, chunk_size=8)
        return cls(**(base | overrides))

    def replace(self, **changes) -> Mamba3Config:
        return dataclasses.replace(self, **changes)
