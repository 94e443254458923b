"""The strict reader of a mamba_ssm `MambaConfig` config.json whose blocks are Mamba1 (`ssm_cfg`
without `layer`, or with "layer": "Mamba1").

Same allow-list strictness as the transformers reader: mapped, harmless, or required to have the
one value the port implements; anything else is rejected by name.
"""

from __future__ import annotations

from equiv.errors import ConfigError, UnsupportedFeatureError
from equiv.io.json_reader import UNKNOWN_ATTRS, JsonReader, show, unknown_keys
from equiv.mamba1.config import Mamba1Config

# mamba_ssm `MambaConfig` (models/config_mamba.py) and `Mamba.__init__` (modules/mamba_simple.py)
# defaults, 2.3.2: a key missing from config.json takes these.
_MS_TOP_DEFAULTS = {"d_model": 2560, "n_layer": 64, "vocab_size": 50277, "pad_vocab_size_multiple": 8,
                    "residual_in_fp32": True, "tie_embeddings": True}
_MS_SSM_DEFAULTS = {"d_state": 16, "d_conv": 4, "expand": 2, "dt_rank": "auto", "conv_bias": True,
                    "bias": False}
# fused_add_norm picks a Triton kernel for the same add + norm; attn_cfg is unused without attention
# layers (attn_layer_idx is required empty).
_MS_TOP = set(_MS_TOP_DEFAULTS) | {"ssm_cfg", "rms_norm", "fused_add_norm", "d_intermediate",
                                   "attn_layer_idx", "attn_cfg"}
# The dt_* keys other than dt_rank initialise dt_proj; use_fast_path chooses the fused kernel.
_MS_SSM = set(_MS_SSM_DEFAULTS) | {"layer", "dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor",
                                   "use_fast_path"}
# MixerModel's default; MambaLMHeadModel does not pass norm_epsilon on
_MS_NORM_EPS = 1e-5


def config_from_mamba_ssm(raw: dict) -> Mamba1Config:
    """mamba_ssm `MambaConfig` dict (config.json with ssm_cfg, Mamba1 blocks) -> Mamba1Config (strict).
    `MambaLMHeadModel` pads the vocabulary to a multiple of pad_vocab_size_multiple; so do we."""
    if not isinstance(raw, dict):
        raise ConfigError(f"mamba_ssm config: expected a JSON object, got {show(raw)}")
    ssm = raw.get("ssm_cfg", {})
    if not isinstance(ssm, dict):
        raise ConfigError(f"mamba_ssm config.json: ssm_cfg: expected an object, got {show(ssm)}")
    top, s = JsonReader(raw), JsonReader(ssm, "ssm_cfg.")
    unknown = unknown_keys(raw, _MS_TOP) + unknown_keys(ssm, _MS_SSM, "ssm_cfg.")
    unsupported = [UNKNOWN_ATTRS + ", ".join(unknown)] if unknown else []
    checks = (s.choice("layer", "Mamba1", ("Mamba1",)), top.choice("rms_norm", True, (True,)),
              top.choice("d_intermediate", 0, (0,)), top.choice("attn_layer_idx", [], ([],)))
    unsupported += [c for c in checks if c]
    if unsupported:
        raise UnsupportedFeatureError("mamba_ssm config.json: not supported by this port: "
                                      + "; ".join(unsupported))
    dt_rank = ssm.get("dt_rank", "auto")
    if not (dt_rank == "auto" or type(dt_rank) is int):
        s.problems.append(f'ssm_cfg.dt_rank: expected an integer or "auto", got {show(dt_rank)}')
        dt_rank = "auto"
    top.check_types({"fused_add_norm": "bool"})
    kw = dict(d_model=top.int("d_model", 2560), n_layers=top.int("n_layer", 64),
              d_state=s.int("d_state", 16), expand=s.int("expand", 2), conv_kernel=s.int("d_conv", 4),
              dt_rank=dt_rank, use_bias=s.bool("bias", False), use_conv_bias=s.bool("conv_bias", True),
              norm_eps=_MS_NORM_EPS, residual_in_fp32=top.bool("residual_in_fp32", True),
              tie_embeddings=top.bool("tie_embeddings", True))
    vocab, mult = top.int("vocab_size", 50277), top.int("pad_vocab_size_multiple", 8)
    problems = top.problems + s.problems
    if problems:
        raise ConfigError("mamba_ssm config.json: " + "; ".join(problems))
    if vocab % mult:  # MambaLMHeadModel.__init__
        vocab += mult - vocab % mult
    return Mamba1Config(vocab_size=vocab, model_type="mamba", **kw)
