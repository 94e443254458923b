"""The strict reader of a mamba_ssm `MambaConfig` config.json (with `ssm_cfg`).

Same allow-list strictness as the transformers reader: mapped, harmless, or required to have the
one value the port implements; anything else is rejected by name.
"""

from __future__ import annotations

from equiv.errors import ConfigError, UnsupportedFeatureError
from equiv.io.json_reader import UNKNOWN_ATTRS, JsonReader, unknown_keys
from equiv.mamba2.config import Mamba2Config, show

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
        raise ConfigError(f"mamba_ssm config: expected a JSON object, got {show(raw)}")
    ssm = raw.get("ssm_cfg", {})
    if not isinstance(ssm, dict):
        raise ConfigError(f"mamba_ssm config.json: ssm_cfg: expected an object, got {show(ssm)}")
    top, s = JsonReader(raw), JsonReader(ssm, "ssm_cfg.")
    unknown = unknown_keys(raw, _MS_TOP) + unknown_keys(ssm, _MS_SSM, "ssm_cfg.")
    unsupported = [UNKNOWN_ATTRS + ", ".join(unknown)] if unknown else []
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
                           f"partial SSM width is not implemented), got {show(d_ssm)}")
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
