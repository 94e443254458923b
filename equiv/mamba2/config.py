"""Mamba-2 config: a frozen dataclass read strictly from a transformers or a mamba_ssm config.json.

Strictness (penzai's allow-list): every attribute is either mapped, known not to affect inference
numerics (initialisation, bookkeeping), or required to have the one value the port implements.
Anything else is rejected by name: a silently ignored attribute is a silently wrong answer.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from equiv.errors import ConfigError


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
        problems = []
        for name in ("vocab_size", "d_model", "n_layers", "d_state", "head_dim", "n_heads", "n_groups",
                     "expand", "conv_kernel", "chunk_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                problems.append(f"{name}: expected an integer >= 1, got {v!r}")
        if problems:
            raise ConfigError("config: " + "; ".join(problems))
        if self.n_heads % self.n_groups:
            problems.append(f"n_groups (g) must divide num_heads (h): got g={self.n_groups}, h={self.n_heads}")
        if self.n_heads * self.head_dim != self.d_inner:
            problems.append(f"num_heads x head_dim must equal expand x hidden_size (d_inner): got "
                            f"{self.n_heads} x {self.head_dim} = {self.n_heads * self.head_dim}, "
                            f"d_inner = {self.expand} x {self.d_model} = {self.d_inner}")
        lo, hi = self.time_step_limit
        if not (0.0 <= lo < hi):
            problems.append(f"time_step_limit: expected 0 <= lo < hi, got {self.time_step_limit}")
        if not (self.norm_eps > 0 and math.isfinite(self.norm_eps)):
            problems.append(f"layer_norm_epsilon: expected a finite value > 0, got {self.norm_eps}")
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

    @classmethod
    def tiny(cls, **overrides) -> Mamba2Config:
        """A 2-layer model small enough for unit tests."""
        base = dict(vocab_size=96, d_model=64, n_layers=2, d_state=16, head_dim=16, n_heads=8,
                    n_groups=2, chunk_size=16)
        return cls(**(base | overrides))

    def replace(self, **changes) -> Mamba2Config:
        return dataclasses.replace(self, **changes)


# transformers Mamba2Config: attribute -> (our field, class default). Defaults matter: a key missing
# from config.json takes transformers' default (n_groups defaults to 8 there, not 1).
_HF_MAPPED = {
    "vocab_size": ("vocab_size", 32768), "hidden_size": ("d_model", 4096),
    "num_hidden_layers": ("n_layers", 64), "state_size": ("d_state", 128), "head_dim": ("head_dim", 64),
    "num_heads": ("n_heads", 128), "n_groups": ("n_groups", 8), "expand": ("expand", 2),
    "conv_kernel": ("conv_kernel", 4), "chunk_size": ("chunk_size", 256),
    "time_step_limit": ("time_step_limit", (0.0, float("inf"))), "use_bias": ("use_bias", False),
    "use_conv_bias": ("use_conv_bias", True), "layer_norm_epsilon": ("norm_eps", 1e-5),
    "residual_in_fp32": ("residual_in_fp32", True), "tie_word_embeddings": ("tie_embeddings", False),
    "eos_token_id": ("eos_token_id", 2), "pad_token_id": ("pad_token_id", 1),
}
# Attributes that must have exactly this value: the port implements nothing else.
_HF_REQUIRED = {"hidden_act": "silu", "model_type": "mamba2", "rms_norm": True, "norm_before_gate": False}
# Attributes that do not change inference numerics (initialisation, bookkeeping, outputs).
_HF_HARMLESS = {
    "transformers_version", "architectures", "output_hidden_states", "return_dict", "dtype",
    "torch_dtype", "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id",
    "problem_type", "bos_token_id", "initializer_range", "time_step_rank", "time_step_min",
    "time_step_max", "time_step_floor", "rescale_prenorm_residual", "use_cache", "_name_or_path",
    "output_attentions", "layer_types", "tokenizer_class", "emb_layer_norm_before", "use_return_dict",
}


def _json_float(v):
    # transformers >= 5 writes non-finite floats as {"__float__": "Infinity"}
    if isinstance(v, dict) and set(v) == {"__float__"}:
        return float(v["__float__"])
    if isinstance(v, bool):
        raise TypeError("a bool is not a number")
    return float(v)


def _finite_pair(value, name):
    try:
        lo, hi = (_json_float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected a pair [lo, hi], got {value!r}") from None
    return lo, hi


def _check_keys(raw: dict, mapped, required: dict, harmless: set, source: str) -> None:
    problems = [f"{k}={raw[k]!r} (the port implements only {v!r})"
                for k, v in required.items() if k in raw and raw[k] != v]
    unknown = sorted(set(raw) - set(mapped) - set(required) - harmless)
    if unknown:
        problems.append("unrecognised attributes that may change the numerics: " + ", ".join(unknown))
    if problems:
        raise ConfigError(f"{source}: not supported by this port: " + "; ".join(problems))


def config_from_transformers(raw: dict) -> Mamba2Config:
    """transformers `Mamba2Config` dict -> Mamba2Config (strict)."""
    _check_keys(raw, _HF_MAPPED, _HF_REQUIRED, _HF_HARMLESS, "transformers config.json")
    layer_types = raw.get("layer_types")
    if layer_types is not None and any(t != "mamba" for t in layer_types):
        raise ConfigError(f"transformers config.json: layer_types must all be 'mamba', got {sorted(set(layer_types))}")
    kw = {ours: raw.get(theirs, default) for theirs, (ours, default) in _HF_MAPPED.items()}
    kw["time_step_limit"] = _finite_pair(kw["time_step_limit"], "time_step_limit")
    if isinstance(kw["eos_token_id"], list):
        kw["eos_token_id"] = kw["eos_token_id"][0] if kw["eos_token_id"] else None
    for tok in ("eos_token_id", "pad_token_id"):  # specials outside the vocab don't affect numerics
        if kw[tok] is not None and not (0 <= kw[tok] < kw["vocab_size"]):
            kw[tok] = None
    return Mamba2Config(**kw)


_MS_TOP = {"d_model", "n_layer", "vocab_size", "ssm_cfg", "rms_norm", "residual_in_fp32",
           "fused_add_norm", "pad_vocab_size_multiple", "tie_embeddings", "d_intermediate",
           "attn_layer_idx", "attn_cfg"}
_MS_SSM = {"layer", "d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size", "dt_limit",
           "bias", "conv_bias", "D_has_hdim", "rmsnorm", "norm_before_gate", "dt_min", "dt_max",
           "dt_init_floor", "A_init_range", "d_ssm", "activation"}


def config_from_mamba_ssm(raw: dict) -> Mamba2Config:
    """mamba_ssm `MambaConfig` dict (config.json with ssm_cfg) -> Mamba2Config (strict)."""
    problems = []
    unknown = sorted(set(raw) - _MS_TOP)
    ssm = raw.get("ssm_cfg") or {}
    unknown += [f"ssm_cfg.{k}" for k in sorted(set(ssm) - _MS_SSM)]
    if unknown:
        problems.append("unrecognised attributes that may change the numerics: " + ", ".join(unknown))
    checks = {"ssm_cfg.layer": (ssm.get("layer"), "Mamba2"), "rms_norm": (raw.get("rms_norm", True), True),
              "d_intermediate": (raw.get("d_intermediate", 0), 0), "attn_layer_idx": (raw.get("attn_layer_idx") or [], []),
              "ssm_cfg.rmsnorm": (ssm.get("rmsnorm", True), True),
              "ssm_cfg.norm_before_gate": (ssm.get("norm_before_gate", False), False),
              "ssm_cfg.activation": (ssm.get("activation", "silu"), "silu")}
    problems += [f"{k}={got!r} (the port implements only {want!r})" for k, (got, want) in checks.items() if got != want]
    if ssm.get("d_ssm") not in (None, ssm.get("expand", 2) * raw.get("d_model", 0)):
        problems.append(f"ssm_cfg.d_ssm={ssm['d_ssm']!r} (partial SSM width is not implemented)")
    if problems:
        raise ConfigError("mamba_ssm config.json: not supported by this port: " + "; ".join(problems))
    d_model = raw["d_model"]
    expand = ssm.get("expand", 2)
    head_dim = ssm.get("headdim", 64)
    vocab, mult = raw["vocab_size"], raw.get("pad_vocab_size_multiple", 8)
    if vocab % mult:  # MambaLMHeadModel pads the vocabulary
        vocab += mult - vocab % mult
    return Mamba2Config(
        vocab_size=vocab, d_model=d_model, n_layers=raw["n_layer"], d_state=ssm.get("d_state", 128),
        head_dim=head_dim, n_heads=(expand * d_model) // head_dim, n_groups=ssm.get("ngroups", 1),
        expand=expand, conv_kernel=ssm.get("d_conv", 4), chunk_size=ssm.get("chunk_size", 256),
        time_step_limit=_finite_pair(ssm.get("dt_limit", (0.0, float("inf"))), "ssm_cfg.dt_limit"),
        use_bias=ssm.get("bias", False), use_conv_bias=ssm.get("conv_bias", True), norm_eps=1e-5,
        residual_in_fp32=raw.get("residual_in_fp32", True), tie_embeddings=raw.get("tie_embeddings", True),
        d_has_hdim=ssm.get("D_has_hdim", False))


def detect_format(raw: dict) -> str:
    if "ssm_cfg" in raw or "n_layer" in raw:
        return "mamba_ssm"
    if raw.get("model_type") == "mamba2" or "num_hidden_layers" in raw:
        return "transformers"
    raise ConfigError("config.json: expected a transformers Mamba2 config (model_type 'mamba2') or a "
                      f"mamba_ssm config (with ssm_cfg); got keys {sorted(raw)[:12]}")


def load_config(checkpoint_dir: str | Path) -> tuple[Mamba2Config, str]:
    """Read `config.json` from a checkpoint directory. Returns (config, format)."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"checkpoint: expected {path} to exist, it does not")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: expected valid JSON, got {type(e).__name__}: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    fmt = detect_format(raw)
    try:
        cfg = config_from_transformers(raw) if fmt == "transformers" else config_from_mamba_ssm(raw)
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{path}: malformed {fmt} config ({type(e).__name__}: {e})") from None
    return cfg, fmt
