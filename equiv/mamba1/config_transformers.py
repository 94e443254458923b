"""The strict reader of a transformers `MambaConfig` / `FalconMambaConfig` config.json.

Strictness (penzai's allow-list): every attribute is either mapped, known not to affect inference
numerics (initialisation, bookkeeping, a kernel choice), or required to have the one value the port
implements. Anything else is rejected by name: a silently ignored attribute is a silently wrong
answer. Falcon-Mamba's own attributes are known only under its model_type.
"""

from __future__ import annotations

from equiv.errors import ConfigError, UnsupportedFeatureError
from equiv.io.json_reader import UNKNOWN_ATTRS, JsonReader, show, unknown_keys
from equiv.mamba1.config import BOOL_FIELDS, INT_FIELDS, MODEL_TYPES, Mamba1Config

# transformers MambaConfig (5.x) attribute -> (our field, class default): a key missing from
# config.json takes transformers' default (tie_word_embeddings defaults to true there).
_HF_MAPPED = {
    "vocab_size": ("vocab_size", 50280), "hidden_size": ("d_model", 768),
    "num_hidden_layers": ("n_layers", 32), "state_size": ("d_state", 16), "expand": ("expand", 2),
    "conv_kernel": ("conv_kernel", 4), "use_bias": ("use_bias", False),
    "use_conv_bias": ("use_conv_bias", True), "layer_norm_epsilon": ("norm_eps", 1e-5),
    "residual_in_fp32": ("residual_in_fp32", True), "tie_word_embeddings": ("tie_embeddings", True),
    "time_step_rank": ("dt_rank", "auto"), "eos_token_id": ("eos_token_id", 0),
    "pad_token_id": ("pad_token_id", 0),
}
# FalconMambaConfig only: the mixer norms' epsilon, and the old name of use_mambapy
_FALCON_ONLY = {"mixer_rms_eps", "use_falcon_mambapy"}
# The only values implemented. hidden_act is the conv's activation (ACT2FN[hidden_act]).
_HF_REQUIRED = {"hidden_act": "silu"}
# Attributes that do not change inference numerics. use_mambapy and use_associative_scan choose
# another evaluation order of the same recurrence (mambapy's pscan if installed; the associative
# scan only under torch.compile); intermediate_size is recomputed by transformers (checked below).
_HF_HARMLESS = {
    "transformers_version", "architectures", "output_hidden_states", "return_dict", "dtype",
    "torch_dtype", "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id",
    "problem_type", "bos_token_id", "initializer_range", "time_step_scale", "time_step_min",
    "time_step_max", "time_step_init_scheme", "time_step_floor", "rescale_prenorm_residual",
    "use_cache", "use_mambapy", "use_associative_scan", "_name_or_path", "output_attentions",
    "tokenizer_class", "intermediate_size",
}
# Hub conversions from mamba_ssm (state-spaces/mamba-*-hf) still carry mamba_ssm's keys, which
# transformers ignores: accepted when they agree with the transformers keys (checked below).
_MAMBA_SSM_LEFTOVERS = {"d_model", "n_layer", "d_inner", "fused_add_norm", "rms_norm", "ssm_cfg",
                        "pad_vocab_size_multiple"}
# ... of which transformers' strict config still type-checks these (a config.json it cannot load
# must fail here, with a message, rather than later inside the reference)
_HF_HARMLESS_TYPES = {
    "initializer_range": "float", "time_step_min": "float", "time_step_max": "float",
    "time_step_floor": "float", "time_step_scale": "float", "rescale_prenorm_residual": "bool",
    "use_cache": "bool", "use_mambapy": "bool", "use_associative_scan": "bool", "use_falcon_mambapy": "bool",
    "bos_token_id": "token", "id2label": "id2label", "label2id": "label2id", "dtype": "torch_dtype",
    "torch_dtype": "torch_dtype", "fused_add_norm": "bool",
}


def _extra_problems(raw: dict, kw: dict) -> list[str]:
    """mamba_ssm keys left in a converted config must say what the transformers keys say; the
    string-typed harmless attribute JsonReader.check_types has no kind for."""
    problems = []
    for theirs, ours, value in (("d_model", "hidden_size", kw["d_model"]),
                                ("n_layer", "num_hidden_layers", kw["n_layers"]),
                                ("d_inner", "expand x hidden_size", kw["expand"] * kw["d_model"]),
                                ("intermediate_size", "expand x hidden_size", kw["expand"] * kw["d_model"])):
        if theirs in raw and not (type(raw[theirs]) is int and raw[theirs] == value):
            problems.append(f"{theirs}: expected {ours} = {value} (transformers reads only that), "
                            f"got {show(raw[theirs])}")
    if "ssm_cfg" in raw and not isinstance(raw["ssm_cfg"], dict):
        problems.append(f"ssm_cfg: expected an object (ignored by transformers), got {show(raw['ssm_cfg'])}")
    if "pad_vocab_size_multiple" in raw and type(raw["pad_vocab_size_multiple"]) is not int:
        problems.append(f"pad_vocab_size_multiple: expected an integer (ignored by transformers: vocab_size "
                        f"is already padded), got {show(raw['pad_vocab_size_multiple'])}")
    if "time_step_init_scheme" in raw and not isinstance(raw["time_step_init_scheme"], str):
        problems.append(f"time_step_init_scheme: expected a string, got {show(raw['time_step_init_scheme'])}")
    return problems


def config_from_transformers(raw: dict) -> Mamba1Config:
    """transformers `MambaConfig` / `FalconMambaConfig` dict -> Mamba1Config (strict)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"transformers config: expected a JSON object, got {show(raw)}")
    top = JsonReader(raw)
    unsupported = [c for c in (top.choice("model_type", "mamba", MODEL_TYPES),
                               top.choice("rms_norm", True, (True,)))
                   if c]
    unsupported += [c for k, v in _HF_REQUIRED.items() if (c := top.choice(k, v, (v,)))]
    falcon = raw.get("model_type") == "falcon_mamba"
    known = set(_HF_MAPPED) | {"model_type"} | set(_HF_REQUIRED) | _HF_HARMLESS | _MAMBA_SSM_LEFTOVERS
    unknown = unknown_keys(raw, known | (_FALCON_ONLY if falcon else set()))
    if unknown:
        unsupported.append(UNKNOWN_ATTRS + ", ".join(unknown))
    if unsupported:
        raise UnsupportedFeatureError("transformers config.json: not supported by this port: "
                                      + "; ".join(unsupported))
    r = JsonReader(raw, floats_only=True)
    r.check_types(_HF_HARMLESS_TYPES)
    kw = {ours: r.int(theirs, default) for theirs, (ours, default) in _HF_MAPPED.items()
          if ours in INT_FIELDS and ours != "dt_rank"}
    kw |= {ours: r.bool(theirs, default) for theirs, (ours, default) in _HF_MAPPED.items()
           if ours in BOOL_FIELDS}
    kw["norm_eps"] = r.float("layer_norm_epsilon", 1e-5)
    dt_rank = raw.get("time_step_rank", "auto")
    if not (dt_rank == "auto" or type(dt_rank) is int):
        r.problems.append(f'time_step_rank: expected an integer or "auto", got {show(dt_rank)}')
        dt_rank = "auto"
    kw["dt_rank"] = dt_rank
    kw["mixer_rms_eps"] = r.float("mixer_rms_eps", 1e-6) if falcon else None
    kw["eos_token_id"] = r.token("eos_token_id", 0, kw["vocab_size"])
    kw["pad_token_id"] = r.token("pad_token_id", 0, kw["vocab_size"], lists=False)
    problems = r.problems or _extra_problems(raw, kw)  # leftovers are compared with read values
    if problems:
        raise ConfigError("transformers config.json: " + "; ".join(problems))
    return Mamba1Config(model_type=raw.get("model_type", "mamba"), **kw)
