"""The strict reader of a mamba_ssm `MambaConfig` config.json whose blocks are Mamba3
(`ssm_cfg.layer` "Mamba3"): the layout of docs/mamba3-layout.md.

Same allow-list strictness as the other families' readers: every key is mapped, harmless (named
below with why), or required to have the one value the port implements; anything else is rejected
by name.
"""

from __future__ import annotations

from equiv.errors import ConfigError, UnsupportedFeatureError
from equiv.io.json_reader import UNKNOWN_ATTRS, JsonReader, show, unknown_keys
from equiv.mamba3.config import Mamba3Config

# mamba_ssm `MambaConfig` (models/config_mamba.py) and `Mamba3.__init__` (modules/mamba3.py)
# defaults, 2.3.2.post1: a key missing from config.json takes these.
_MS_TOP_DEFAULTS = {"d_model": 2560, "n_layer": 64, "vocab_size": 50277, "pad_vocab_size_multiple": 8,
                    "residual_in_fp32": True, "tie_embeddings": True}
_MS_SSM_DEFAULTS = {"d_state": 128, "expand": 2, "headdim": 64, "ngroups": 1, "rope_fraction": 0.5,
                    "A_floor": 1e-4, "is_outproj_norm": False, "is_mimo": False, "mimo_rank": 4,
                    "chunk_size": 64}
# attn_cfg is unused without attention layers (attn_layer_idx is required empty).
_MS_TOP = set(_MS_TOP_DEFAULTS) | {"ssm_cfg", "rms_norm", "fused_add_norm", "d_intermediate",
                                   "attn_layer_idx", "attn_cfg"}
# dt_min / dt_max / dt_init_floor only initialise dt_bias (which the checkpoint stores); dropout is
# "just to absorb the kwarg" in Mamba3 (it is never applied).
_MS_SSM = set(_MS_SSM_DEFAULTS) | {"layer", "dt_min", "dt_max", "dt_init_floor", "dropout"}
# MixerModel's default; MambaLMHeadModel does not pass norm_epsilon on
_MS_NORM_EPS = 1e-5


def config_from_mamba_ssm(raw: dict) -> Mamba3Config:
    """mamba_ssm `MambaConfig` dict (config.json with ssm_cfg, Mamba3 blocks) -> Mamba3Config (strict).
    `MambaLMHeadModel` pads the vocabulary to a multiple of pad_vocab_size_multiple; so do we.
    Without MIMO, mamba_ssm ignores mimo_rank (rank 1); it is type-checked and then set to 1."""
    if not isinstance(raw, dict):
        raise ConfigError(f"mamba_ssm config: expected a JSON object, got {show(raw)}")
    ssm = raw.get("ssm_cfg", {})
    if not isinstance(ssm, dict):
        raise ConfigError(f"mamba_ssm config.json: ssm_cfg: expected an object, got {show(ssm)}")
    top, s = JsonReader(raw), JsonReader(ssm, "ssm_cfg.")
    unknown = unknown_keys(raw, _MS_TOP) + unknown_keys(ssm, _MS_SSM, "ssm_cfg.")
    unsupported = [UNKNOWN_ATTRS + ", ".join(unknown)] if unknown else []
    checks = (s.choice("layer", None, ("Mamba3",)), top.choice("rms_norm", True, (True,)),
              top.choice("d_intermediate", 0, (0,)), top.choice("attn_layer_idx", [], ([],)),
              s.choice("rope_fraction", 0.5, (0.5, 1.0, 1)))
    unsupported += [c for c in checks if c]
    if unsupported:
        raise UnsupportedFeatureError("mamba_ssm config.json: not supported by this port: "
                                      + "; ".join(unsupported))
    s.check_types({"dt_min": "float", "dt_max": "float", "dt_init_floor": "float", "dropout": "float"})
    is_mimo = s.bool("is_mimo", False)
    rank = s.int("mimo_rank", 4)
    kw = dict(d_model=top.int("d_model", 2560), n_layers=top.int("n_layer", 64),
              d_state=s.int("d_state", 128), expand=s.int("expand", 2), headdim=s.int("headdim", 64),
              ngroups=s.int("ngroups", 1), rope_fraction=s.float("rope_fraction", 0.5),
              A_floor=s.float("A_floor", 1e-4), is_outproj_norm=s.bool("is_outproj_norm", False),
              is_mimo=is_mimo, mimo_rank=rank if is_mimo else 1, chunk_size=s.int("chunk_size", 64),
              norm_eps=_MS_NORM_EPS, residual_in_fp32=top.bool("residual_in_fp32", True),
              fused_add_norm=top.bool("fused_add_norm", True),
              tie_embeddings=top.bool("tie_embeddings", True))
    vocab, mult = top.int("vocab_size", 50277), top.int("pad_vocab_size_multiple", 8)
    problems = top.problems + s.problems
    if problems:
        raise ConfigError("mamba_ssm config.json: " + "; ".join(problems))
    if vocab % mult:  # MambaLMHeadModel.__init__
        vocab += mult - vocab % mult
    return Mamba3Config(vocab_size=vocab, model_type="mamba3", **kw)


def config_to_mamba_ssm(cfg: Mamba3Config) -> dict:
    """The config.json of this layout for `cfg` (fixtures and tests write checkpoints with it); reads
    back to `cfg` through `config_from_mamba_ssm` (vocab_size already a multiple of 1)."""
    ssm = {"layer": "Mamba3", "d_state": cfg.d_state, "expand": cfg.expand, "headdim": cfg.headdim,
           "ngroups": cfg.ngroups, "rope_fraction": cfg.rope_fraction, "A_floor": cfg.A_floor,
           "is_outproj_norm": cfg.is_outproj_norm, "is_mimo": cfg.is_mimo, "mimo_rank": cfg.mimo_rank,
           "chunk_size": cfg.chunk_size}
    return {"d_model": cfg.d_model, "n_layer": cfg.n_layers, "vocab_size": cfg.vocab_size,
            "pad_vocab_size_multiple": 1, "rms_norm": True, "residual_in_fp32": cfg.residual_in_fp32,
            "fused_add_norm": cfg.fused_add_norm, "tie_embeddings": cfg.tie_embeddings, "d_intermediate": 0,
            "ssm_cfg": ssm}
