"""Mamba-2 config: the frozen dataclass the port is built from, and its validation.

It is read strictly from a checkpoint's config.json by `config_file.load_config` (transformers
dialect: `config_transformers`, mamba_ssm dialect: `config_mamba_ssm`). Every field is type- and
range-checked at construction, and all problems of one config are reported in one `ConfigError`:
a wrong value is named with its key, never passed on to fail deep inside numpy or XLA.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

from equiv.errors import ConfigError
from equiv.io.json_reader import MAX_SIZE, int_problem, is_real, show  # noqa: F401 - re-exported

FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.401298464324817e-45  # the smallest float32 above 0 (a subnormal)

INT_FIELDS = ("vocab_size", "d_model", "n_layers", "d_state", "head_dim", "n_heads", "n_groups",
               "expand", "conv_kernel", "chunk_size")
BOOL_FIELDS = ("use_bias", "use_conv_bias", "residual_in_fp32", "tie_embeddings", "d_has_hdim")


@dataclass(frozen=True, kw_only=True)
class Mamba2Config:
    """Attributes:
    vocab_size: rows of the embedding (v). d_model: width (d). n_layers: blocks.
    d_state: n. head_dim: p. n_heads: h. n_groups: g (B/C groups; head j reads group j // (h/g)).
    expand: d_inner (e) = expand * d_model = h * p. conv_kernel: k. chunk_size: SSD chunk length.
    time_step_limit: dt clamp (lo, hi); (0, inf) means no clamp.
    use_bias: in_proj/out_proj bias. use_conv_bias: conv bias. norm_eps: every RMSNorm's epsilon.
    residual_in_fp32: keep the residual stream in float32. tie_embeddings: lm_head = embedding.
    d_has_hdim: D is (h, p) instead of (h,) (mamba_ssm `D_has_hdim`).
    eos_token_id / pad_token_id: for generation.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    d_state: int
    head_dim: int
    n_heads: int
    n_groups: int = 1
    expand: int = 2
    conv_kernel: int = 4
    chunk_size: int = 256
    time_step_limit: tuple[float, float] = (0.0, float("inf"))
    use_bias: bool = False
    use_conv_bias: bool = True
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    tie_embeddings: bool = False
    d_has_hdim: bool = False
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
        if not is_real(self.norm_eps):
            problems.append(f"norm_eps: expected a number, got {show(self.norm_eps)}")
        tsl = self.time_step_limit
        if not (isinstance(tsl, (tuple, list)) and len(tsl) == 2 and all(is_real(x) for x in tsl)):
            problems.append(f"time_step_limit: expected a pair (lo, hi) of numbers, got {show(tsl)}")
        if problems:
            raise ConfigError("config: " + "; ".join(problems))
        # Normalise (still inside construction): the config is a static jit argument, so it must
        # hash, and 1 vs 1.0 must not make two configs (and two compilations).
        object.__setattr__(self, "time_step_limit", (float(tsl[0]), float(tsl[1])))
        object.__setattr__(self, "norm_eps", float(self.norm_eps))
        self._check_consistent()

    def _check_consistent(self) -> None:
        problems = []
        if self.n_heads % self.n_groups:
            problems.append(f"n_groups (g): expected a divisor of num_heads (h) = {self.n_heads}, "
                            f"got {self.n_groups}")
        if self.n_heads * self.head_dim != self.d_inner:
            problems.append(f"num_heads x head_dim (h x p): expected expand x hidden_size = d_inner = "
                            f"{self.expand} x {self.d_model} = {self.d_inner}, got {self.n_heads} x "
                            f"{self.head_dim} = {self.n_heads * self.head_dim}")
        lo, hi = self.time_step_limit
        # the forward runs in float32 (and bfloat16, same range): a bound beyond it would overflow
        if not (0.0 <= lo <= FLOAT32_MAX and lo < hi and (hi <= FLOAT32_MAX or hi == math.inf)):
            problems.append(f"time_step_limit: expected 0 <= lo < hi, lo finite, both within float32 "
                            f"(hi may be inf), got {self.time_step_limit}")
        if not FLOAT32_TINY <= self.norm_eps <= FLOAT32_MAX:  # NaN fails too
            problems.append(f"layer_norm_epsilon: expected a finite value > 0 that float32 holds "
                            f"(in [{FLOAT32_TINY:.3g}, {FLOAT32_MAX:.4g}]), got {self.norm_eps}")
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
    def conv_dim(self) -> int:  # x | B | C go through the conv together
        return self.d_inner + 2 * self.n_groups * self.d_state

    @property
    def in_proj_dim(self) -> int:  # z | xBC | dt
        return 2 * self.d_inner + 2 * self.n_groups * self.d_state + self.n_heads

    @property
    def decode_lengths(self) -> tuple[int, ...]:
        """Prompt lengths where a Mamba-2 forward changes regime (port protocol v1): the SSD's chunk
        boundary and the conv state's width."""
        return tuple(sorted({self.chunk_size, self.conv_kernel}))

    @classmethod
    def tiny(cls, **overrides) -> Mamba2Config:
        """A 2-layer model small enough for unit tests."""
        base = dict(vocab_size=96, d_model=64, n_layers=2, d_state=16, head_dim=16, n_heads=8,
                    n_groups=2, chunk_size=16)
        return cls(**(base | overrides))

    def replace(self, **changes) -> Mamba2Config:
        return dataclasses.replace(self, **changes)


# The config.json readers moved to their own modules; `from equiv.mamba2.config import load_config`
# (and the like) keeps working, resolved lazily because those modules import this one.
_MOVED = {"load_config": "config_file", "detect_format": "config_file",
          "config_from_transformers": "config_transformers", "config_from_mamba_ssm": "config_mamba_ssm",
          }


def __getattr__(name: str):
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(f"equiv.mamba2.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
