"""Mamba-1 / Falcon-Mamba config: the frozen dataclass the port is built from, and its validation.

Falcon-Mamba is the same architecture with one addition, weightless RMS norms on dt, B and C inside
the mixer; it is this config with `mixer_rms_eps` set (and model_type "falcon_mamba"), never other
code. It is read strictly from a checkpoint's config.json by `config_file.load_config`
(transformers dialect: `config_transformers`, mamba_ssm dialect: `config_mamba_ssm`). Every field is
type- and range-checked at construction, and all problems of one config come in one `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

from equiv.errors import ConfigError
from equiv.io.json_reader import int_problem, is_real, show

FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.401298464324817e-45  # the smallest float32 above 0 (a subnormal)

INT_FIELDS = ("vocab_size", "d_model", "n_layers", "d_state", "expand", "conv_kernel", "dt_rank")
BOOL_FIELDS = ("use_bias", "use_conv_bias", "residual_in_fp32", "tie_embeddings")
MODEL_TYPES = ("mamba", "falcon_mamba")


def auto_dt_rank(d_model: int) -> int:
    """transformers' and mamba_ssm's dt_rank "auto": ceil(d_model / 16)."""
    return math.ceil(d_model / 16)


@dataclass(frozen=True, kw_only=True)
class Mamba1Config:
    """Attributes:
    vocab_size: rows of the embedding (v). d_model: width (d). n_layers: blocks. d_state: n.
    expand: d_inner (e) = expand * d_model. conv_kernel: k. dt_rank: r, the width of dt before
    dt_proj (transformers `time_step_rank`; "auto" = ceil(d_model / 16), resolved here).
    use_bias: in_proj/out_proj bias. use_conv_bias: conv bias. norm_eps: the block and final
    RMSNorms' epsilon. residual_in_fp32: keep the residual stream in float32.
    tie_embeddings: lm_head = embedding.
    mixer_rms_eps: None for Mamba-1; for Falcon-Mamba the epsilon of the weightless RMS norms on
    dt, B and C. model_type: "mamba" or "falcon_mamba" (must agree with mixer_rms_eps).
    eos_token_id / pad_token_id: for generation.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    d_state: int = 16
    expand: int = 2
    conv_kernel: int = 4
    dt_rank: int | str = "auto"
    use_bias: bool = False
    use_conv_bias: bool = True
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    mixer_rms_eps: float | None = None
    model_type: str = "mamba"
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        for name in (*INT_FIELDS, "eos_token_id", "pad_token_id"):  # numpy ints from Python callers
            v = getattr(self, name)
            if isinstance(v, numbers.Integral) and not isinstance(v, bool) and type(v) is not int:
                object.__setattr__(self, name, int(v))
        if self.dt_rank == "auto" and type(self.d_model) is int:
            object.__setattr__(self, "dt_rank", auto_dt_rank(self.d_model))
        problems = [p.replace("], got", '] or "auto", got') if name == "dt_rank" else p
                    for name in INT_FIELDS if (p := int_problem(name, getattr(self, name)))]
        problems += [f"{name}: expected true or false, got {show(getattr(self, name))}"
                     for name in BOOL_FIELDS if not isinstance(getattr(self, name), bool)]
        for name in ("eos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if v is not None and (p := int_problem(name, v, lo=0)):
                problems.append(p + " or null")
        if not is_real(self.norm_eps):
            problems.append(f"norm_eps: expected a number, got {show(self.norm_eps)}")
        if self.mixer_rms_eps is not None and not is_real(self.mixer_rms_eps):
            problems.append(f"mixer_rms_eps: expected a number or null, got {show(self.mixer_rms_eps)}")
        if not (isinstance(self.model_type, str) and self.model_type in MODEL_TYPES):
            problems.append(f"model_type: expected one of {MODEL_TYPES}, got {show(self.model_type)}")
        if problems:
            raise ConfigError("config: " + "; ".join(problems))
        # Normalise (still inside construction): the config is a static jit argument, so it must
        # hash, and 1 vs 1.0 must not make two configs (and two compilations).
        object.__setattr__(self, "norm_eps", float(self.norm_eps))
        if self.mixer_rms_eps is not None:
            object.__setattr__(self, "mixer_rms_eps", float(self.mixer_rms_eps))
        self._check_consistent()

    def _check_consistent(self) -> None:
        problems = []
        for name in ("norm_eps", "mixer_rms_eps"):
            v = getattr(self, name)
            if v is not None and not FLOAT32_TINY <= v <= FLOAT32_MAX:  # NaN fails too
                problems.append(f"{name}: expected a finite value > 0 that float32 holds "
                                f"(in [{FLOAT32_TINY:.3g}, {FLOAT32_MAX:.4g}]), got {v}")
        falcon = self.model_type == "falcon_mamba"
        if falcon != (self.mixer_rms_eps is not None):
            problems.append(f"mixer_rms_eps: expected a number for model_type 'falcon_mamba' and null for "
                            f"'mamba', got {self.mixer_rms_eps} with model_type {self.model_type!r}")
        if self.d_inner > 2**31 - 1:
            problems.append(f"expand x d_model (d_inner): expected at most 2**31 - 1, got {self.d_inner}")
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
    def x_proj_dim(self) -> int:  # dt | B | C
        return self.dt_rank + 2 * self.d_state

    @property
    def is_falcon(self) -> bool:
        return self.mixer_rms_eps is not None

    @property
    def decode_lengths(self) -> tuple[int, ...]:
        """Prompt lengths where a Mamba-1 forward changes regime (port protocol v1): the conv
        state's width, where a prompt stops being zero-padded to fill it."""
        return (self.conv_kernel,)

    @classmethod
    def tiny(cls, **overrides) -> Mamba1Config:
        """A 2-layer model small enough for unit tests (odd dt_rank on purpose)."""
        base = dict(vocab_size=96, d_model=48, n_layers=2, d_state=8, dt_rank=5)
        return cls(**(base | overrides))

    def replace(self, **changes) -> Mamba1Config:
        return dataclasses.replace(self, **changes)
