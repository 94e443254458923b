"""Mamba-2 config: a frozen dataclass read strictly from a transformers or a mamba_ssm config.json.

Strictness (penzai's allow-list): every attribute is either mapped, known not to affect inference
numerics (initialisation, bookkeeping), or required to have the one value the port implements.
Anything else is rejected by name: a silently ignored attribute is a silently wrong answer.

Every JSON value is type-checked before use (a string, bool, float, null or NaN where an integer
belongs is named with its key, never passed on to fail deep inside numpy or XLA), and all problems
of one config are reported in one `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from dataclasses import dataclass
from pathlib import Path

from equiv.errors import ConfigError, UnsupportedFeatureError

MAX_SIZE = 2**31 - 1
"""Largest accepted size or id: XLA indexes with int32, and token ids are cast to int32."""
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.401298464324817e-45  # the smallest float32 above 0 (a subnormal)
MAX_CONFIG_BYTES = 16 * 2**20
"""A config.json larger than this is not a config (and is not read into memory)."""

_INT_FIELDS = ("vocab_size", "d_model", "n_layers", "d_state", "head_dim", "n_heads", "n_groups",
               "expand", "conv_kernel", "chunk_size")
_BOOL_FIELDS = ("use_bias", "use_conv_bias", "residual_in_fp32", "tie_embeddings", "d_has_hdim")


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
        for name in (*_INT_FIELDS, "eos_token_id", "pad_token_id"):  # numpy ints from Python callers
            v = getattr(self, name)
            if isinstance(v, numbers.Integral) and not isinstance(v, bool) and type(v) is not int:
                object.__setattr__(self, name, int(v))
        problems = [p for name in _INT_FIELDS if (p := _int_problem(name, getattr(self, name)))]
        problems += [f"{name}: expected true or false, got {_show(getattr(self, name))}"
                     for name in _BOOL_FIELDS if not isinstance(getattr(self, name), bool)]
        for name in ("eos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if v is not None and (p := _int_problem(name, v, lo=0)):
                problems.append(p + " or null")
        if not _is_real(self.norm_eps):
            problems.append(f"norm_eps: expected a number, got {_show(self.norm_eps)}")
        tsl = self.time_step_limit
        if not (isinstance(tsl, (tuple, list)) and len(tsl) == 2 and all(_is_real(x) for x in tsl)):
            problems.append(f"time_step_limit: expected a pair (lo, hi) of numbers, got {_show(tsl)}")
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

    @classmethod
    def tiny(cls, **overrides) -> Mamba2Config:
        """A 2-layer model small enough for unit tests."""
        base = dict(vocab_size=96, d_model=64, n_layers=2, d_state=16, head_dim=16, n_heads=8,
                    n_groups=2, chunk_size=16)
        return cls(**(base | overrides))

    def replace(self, **changes) -> Mamba2Config:
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------
# JSON value checks: each returns a problem string (naming the key, what was expected, what came)
# or None.


def _show(v) -> str:
    text = repr(v)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({type(v).__name__})"


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int_problem(name: str, v, lo: int = 1, hi: int = MAX_SIZE) -> str | None:
    # bool is an int subclass and 64.0 == 64: both are refused, a config must say what it means
    if type(v) is not int or not lo <= v <= hi:
        return f"{name}: expected an integer in [{lo}, {hi}], got {_show(v)}"
    return None


def _json_float(v, floats_only: bool = False) -> float:
    """A JSON number, or transformers' (>= 5) encoding of a non-finite one: {"__float__": "Infinity"}.
    `floats_only` refuses JSON integers, as transformers' strict `Mamba2Config` does for its floats."""
    if isinstance(v, dict) and set(v) == {"__float__"} and v["__float__"] in ("Infinity", "-Infinity", "NaN"):
        return float(v["__float__"].replace("Infinity", "inf"))
    if not (isinstance(v, float) if floats_only else _is_real(v)):
        raise TypeError(v)
    return float(v)


def _is_label_map(v, keys_int: bool) -> bool:
    """transformers' id2label (int-like keys, str values) or label2id (values all int or all str).
    {"__float__": ...} is no map: transformers decodes it to a float."""
    if not isinstance(v, dict) or set(v) == {"__float__"}:
        return False
    if keys_int:
        return (all(re.fullmatch(r"\s*[-+]?\d+\s*", k) for k in v)
                and all(isinstance(x, str) for x in v.values()))
    return all(type(x) is int for x in v.values()) or all(isinstance(x, str) for x in v.values())


class _Reader:
    """Reads typed values from one JSON object, collecting every problem (named `prefix + key`)."""

    def __init__(self, raw: dict, prefix: str = "", floats_only: bool = False):
        self.raw, self.prefix, self.problems, self.floats_only = raw, prefix, [], floats_only
        self.number = "a float (transformers refuses integers here)" if floats_only else "a number"

    def _bad(self, key, what, v):
        self.problems.append(f"{self.prefix}{key}: expected {what}, got {_show(v)}")

    def int(self, key, default, lo=1):
        v = self.raw.get(key, default)
        if p := _int_problem(self.prefix + key, v, lo=lo):
            self.problems.append(p)
            return default
        return v

    def bool(self, key, default):
        v = self.raw.get(key, default)
        if not isinstance(v, bool):
            self._bad(key, "true or false", v)
            return default
        return v

    def float(self, key, default):
        v = self.raw.get(key, default)
        try:
            return _json_float(v, self.floats_only)
        except TypeError:
            self._bad(key, self.number, v)
            return default

    def pair(self, key, default):
        v = self.raw.get(key, default)
        try:
            if not isinstance(v, (list, tuple)) or len(v) != 2:
                raise TypeError(v)
            return tuple(_json_float(x, self.floats_only) for x in v)
        except TypeError:
            self._bad(key, f"a pair [lo, hi], each {self.number}", v)
            return default

    def token(self, key, default, vocab, lists=True):
        """An id, a list of ids (the first is used; only where `lists`), or null. Ids outside the
        vocabulary never come out of the model, so they are dropped (None) rather than refused."""
        v = self.raw.get(key, default)
        ids = v if isinstance(v, list) and lists else [v]
        if v is None or ids == []:
            return None
        if any(type(i) is not int for i in ids):
            self._bad(key, "a token id, a list of token ids, or null" if lists else "a token id or null", v)
            return None
        return ids[0] if type(vocab) is int and 0 <= ids[0] < vocab else None

    def check_types(self, kinds: dict) -> None:
        """Type-check attributes whose value we ignore but a strict reader (transformers) does not."""
        for key, kind in kinds.items():
            if key not in self.raw:
                continue
            v = self.raw[key]
            if kind == "float":
                self.float(key, None)
            elif kind == "bool":
                self.bool(key, None)
            elif kind == "token":
                self.token(key, None, None, lists=False)
            elif kind == "int_or_str" and not (type(v) is int or isinstance(v, str)):
                self._bad(key, "an integer or a string", v)
            elif kind == "id2label" and not (v is None or _is_label_map(v, keys_int=True)):
                self._bad(key, 'null or an object {"0": "label", ...}', v)
            elif kind == "label2id" and not (v is None or _is_label_map(v, keys_int=False)):
                self._bad(key, 'null or an object {"label": 0, ...} (ids all ints or all strings)', v)
            elif kind == "torch_dtype" and not (v is None or isinstance(v, str) and v in _TORCH_FLOAT_NAMES):
                names = ", ".join(sorted(_TORCH_FLOAT_NAMES))
                self._bad(key, f"null or a torch float dtype name ({names})", v)

    def choice(self, key, default, allowed):
        v = self.raw.get(key, default)
        if not any(type(v) is type(a) and v == a for a in allowed):
            want = " or ".join(map(repr, allowed))
            return f"{self.prefix}{key}: expected {want} (all the port implements), got {_show(v)}"
        return None


# ---------------------------------------------------------------------------------------------
# transformers


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
# Attributes that must have exactly this value: the port implements nothing else. (transformers'
# Mamba2 hard-codes rms_norm and norm_before_gate=False; Codestral's config.json still carries them.)
_HF_REQUIRED = {"hidden_act": "silu", "model_type": "mamba2", "rms_norm": True, "norm_before_gate": False}
# Attributes that do not change inference numerics (initialisation, bookkeeping, outputs).
_HF_HARMLESS = {
    "transformers_version", "architectures", "output_hidden_states", "return_dict", "dtype",
    "torch_dtype", "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id",
    "problem_type", "bos_token_id", "initializer_range", "time_step_rank", "time_step_min",
    "time_step_max", "time_step_floor", "rescale_prenorm_residual", "use_cache", "_name_or_path",
    "output_attentions", "tokenizer_class", "emb_layer_norm_before",
}
# ... of which transformers' strict Mamba2Config still type-checks these (a config.json it cannot
# load must fail here, with a message, rather than later inside the reference)
_HF_HARMLESS_TYPES = {
    "initializer_range": "float", "time_step_min": "float", "time_step_max": "float",
    "time_step_floor": "float", "rescale_prenorm_residual": "bool", "use_cache": "bool",
    "bos_token_id": "token", "time_step_rank": "int_or_str", "id2label": "id2label", "label2id": "label2id",
    "dtype": "torch_dtype", "torch_dtype": "torch_dtype",  # PreTrainedConfig does getattr(torch, dtype)
}
_TORCH_FLOAT_NAMES = {"float16", "bfloat16", "float32", "float64", "half", "float", "double"}


_UNKNOWN = ("expected only attributes the port maps or knows to be harmless, got unrecognised ones that "
            "may change the numerics: ")


def _unknown(raw: dict, known: set, prefix: str = "") -> list[str]:
    return [prefix + k for k in sorted(str(k) for k in set(raw) - known)]


def config_from_transformers(raw: dict) -> Mamba2Config:
    """transformers `Mamba2Config` dict -> Mamba2Config (strict)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"transformers config: expected a JSON object, got {_show(raw)}")
    unsupported = [c for k, v in _HF_REQUIRED.items() if (c := _Reader(raw).choice(k, v, (v,)))]
    unknown = _unknown(raw, set(_HF_MAPPED) | set(_HF_REQUIRED) | _HF_HARMLESS)
    if unknown:
        unsupported.append(_UNKNOWN + ", ".join(unknown))
    if unsupported:
        raise UnsupportedFeatureError("transformers config.json: not supported by this port: "
                                      + "; ".join(unsupported))
    r = _Reader(raw, floats_only=True)
    r.check_types(_HF_HARMLESS_TYPES)
    kw = {ours: r.int(theirs, default) for theirs, (ours, default) in _HF_MAPPED.items()
          if ours in _INT_FIELDS}
    kw |= {ours: r.bool(theirs, default) for theirs, (ours, default) in _HF_MAPPED.items()
           if ours in _BOOL_FIELDS}
    kw["norm_eps"] = r.float("layer_norm_epsilon", 1e-5)
    kw["time_step_limit"] = r.pair("time_step_limit", (0.0, float("inf")))
    kw["eos_token_id"] = r.token("eos_token_id", 2, kw["vocab_size"])
    kw["pad_token_id"] = r.token("pad_token_id", 1, kw["vocab_size"], lists=False)
    if r.problems:
        raise ConfigError("transformers config.json: " + "; ".join(r.problems))
    return Mamba2Config(**kw)


# ---------------------------------------------------------------------------------------------
# mamba_ssm

# mamba_ssm `MambaConfig` (models/config_mamba.py) and `Mamba2.__init__` (modules/mamba2.py)
# defaults, 2.3.2: a key missing from config.json takes these.
_MS_TOP_DEFAULTS = {"d_model": 2560, "n_layer": 64, "vocab_size": 50277, "pad_vocab_size_multiple": 8,
                    "residual_in_fp32": True, "tie_embeddings": True}
_MS_SSM_DEFAULTS = {"d_state": 128, "d_conv": 4, "expand": 2, "headdim": 64, "ngroups": 1,
                    "chunk_size": 256, "dt_limit": (0.0, float("inf")), "bias": False,
                    "conv_bias": True, "D_has_hdim": False}
_MS_TOP = set(_MS_TOP_DEFAULTS) | {"ssm_cfg", "rms_norm", "fused_add_norm", "d_intermediate",
                                   "attn_layer_idx", "attn_cfg"}
# d_ssm and activation are checked below; the rest are initialisation or kernel-path choices.
_MS_SSM = set(_MS_SSM_DEFAULTS) | {"layer", "rmsnorm", "norm_before_gate", "dt_min", "dt_max",
                                   "dt_init_floor", "A_init_range", "d_ssm", "activation", "conv_init",
                                   "use_mem_eff_path", "sequence_parallel", "process_group"}


def config_from_mamba_ssm(raw: dict) -> Mamba2Config:
    """mamba_ssm `MambaConfig` dict (config.json with ssm_cfg) -> Mamba2Config (strict).
    `MambaLMHeadModel` pads the vocabulary to a multiple of pad_vocab_size_multiple; so do we."""
    if not isinstance(raw, dict):
        raise ConfigError(f"mamba_ssm config: expected a JSON object, got {_show(raw)}")
    ssm = raw.get("ssm_cfg", {})
    if not isinstance(ssm, dict):
        raise ConfigError(f"mamba_ssm config.json: ssm_cfg: expected an object, got {_show(ssm)}")
    top, s = _Reader(raw), _Reader(ssm, "ssm_cfg.")
    unknown = _unknown(raw, _MS_TOP) + _unknown(ssm, _MS_SSM, "ssm_cfg.")
    unsupported = [_UNKNOWN + ", ".join(unknown)] if unknown else []
    # create_block builds Mamba1 unless ssm_cfg.layer says Mamba2
    checks = (s.choice("layer", "Mamba1", ("Mamba2",)), top.choice("rms_norm", True, (True,)),
              top.choice("d_intermediate", 0, (0,)), top.choice("attn_layer_idx", [], ([],)),
              s.choice("rmsnorm", True, (True,)), s.choice("norm_before_gate", False, (False,)),
              s.choice("activation", "silu", ("silu",)), s.choice("process_group", None, (None,)))
    unsupported += [c for c in checks if c]
    d_model, expand = top.int("d_model", 2560), s.int("expand", 2)
    d_ssm = ssm.get("d_ssm")
    if d_ssm is not None and d_ssm != expand * d_model:
        unsupported.append(f"ssm_cfg.d_ssm: expected null or expand x d_model = {expand * d_model} (a "
                           f"partial SSM width is not implemented), got {_show(d_ssm)}")
    if unsupported:
        raise UnsupportedFeatureError("mamba_ssm config.json: not supported by this port: "
                                      + "; ".join(unsupported))
    kw = dict(d_model=d_model, expand=expand, n_layers=top.int("n_layer", 64),
              d_state=s.int("d_state", 128), head_dim=s.int("headdim", 64), n_groups=s.int("ngroups", 1),
              conv_kernel=s.int("d_conv", 4), chunk_size=s.int("chunk_size", 256),
              time_step_limit=s.pair("dt_limit", (0.0, float("inf"))), use_bias=s.bool("bias", False),
              use_conv_bias=s.bool("conv_bias", True), norm_eps=1e-5,
              residual_in_fp32=top.bool("residual_in_fp32", True),
              tie_embeddings=top.bool("tie_embeddings", True),
              d_has_hdim=s.bool("D_has_hdim", False))
    vocab, mult = top.int("vocab_size", 50277), top.int("pad_vocab_size_multiple", 8)
    problems = top.problems + s.problems
    if not problems and (expand * d_model) % kw["head_dim"]:
        problems.append(f"ssm_cfg.headdim (p): expected a divisor of expand x d_model = {expand * d_model}, "
                        f"got {kw['head_dim']}")
    if problems:
        raise ConfigError("mamba_ssm config.json: " + "; ".join(problems))
    if vocab % mult:  # MambaLMHeadModel.__init__
        vocab += mult - vocab % mult
    return Mamba2Config(vocab_size=vocab, n_heads=(expand * d_model) // kw["head_dim"], **kw)


# ---------------------------------------------------------------------------------------------
# config.json


def detect_format(raw: dict) -> str:
    if not isinstance(raw, dict):
        raise ConfigError(f"config.json: expected a JSON object, got {_show(raw)}")
    if "ssm_cfg" in raw or "n_layer" in raw:
        return "mamba_ssm"
    if raw.get("model_type") == "mamba2" or "num_hidden_layers" in raw:
        return "transformers"
    raise ConfigError("config.json: expected a transformers Mamba2 config (model_type 'mamba2') or a "
                      f"mamba_ssm config (with ssm_cfg); got keys {sorted(map(str, raw))[:12]}")


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs):
    seen = {}
    for k, v in pairs:
        if k in seen:  # json keeps the last one silently: which one did the author mean?
            raise _DuplicateKey(f"expected each key once, got {k!r} twice")
        seen[k] = v
    return seen


def read_json_object(path: Path, what: str, error=ConfigError, max_bytes: int = MAX_CONFIG_BYTES) -> dict:
    """A small JSON file holding one object, with every failure as `error` naming the file: missing,
    unreadable, too large, not UTF-8, not JSON, duplicate keys, nesting too deep, an integer too
    long to convert, not an object."""
    try:
        size = path.stat().st_size
        blob = path.read_bytes() if size <= max_bytes else b""
    except FileNotFoundError:
        raise error(f"{path}: expected a {what}, the file does not exist") from None
    except OSError as e:
        raise error(f"{path}: expected a readable {what}, got {e.strerror or type(e).__name__}") from None
    if size > max_bytes:
        raise error(f"{path}: expected a {what} under {max_bytes} bytes, got {size} bytes")
    try:
        raw = json.loads(blob.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as e:
        raise error(f"{path}: {e}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, int digits limit
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise error(f"{path}: expected a valid JSON {what}, got {type(e).__name__}: {first}") from None
    if not isinstance(raw, dict):
        raise error(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def load_config(checkpoint_dir: str | Path) -> tuple[Mamba2Config, str]:
    """Read `config.json` from a checkpoint directory. Returns (config, format)."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"checkpoint: expected {path} to exist, it does not")
    raw = read_json_object(path, "config.json")
    try:
        fmt = detect_format(raw)
        cfg = config_from_transformers(raw) if fmt == "transformers" else config_from_mamba_ssm(raw)
    except ConfigError as e:
        raise type(e)(f"{path}: {e}") from None
    return cfg, fmt
