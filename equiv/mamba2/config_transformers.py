"""The strict reader of a transformers `Mamba2Config` config.json.

Strictness (penzai's allow-list): every attribute is either mapped, known not to affect inference
numerics (initialisation, bookkeeping), or required to have the one value the port implements.
Anything else is rejected by name: a silently ignored attribute is a silently wrong answer.
"""

from __future__ import annotations

from equiv.errors import ConfigError, UnsupportedFeatureError
from equiv.io.json_reader import UNKNOWN_ATTRS, JsonReader, unknown_keys
from equiv.mamba2.config import BOOL_FIELDS, INT_FIELDS, Mamba2Config, show

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


def config_from_transformers(raw: dict) -> Mamba2Config:
    """transformers `Mamba2Config` dict -> Mamba2Config (strict)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"transformers config: expected a JSON object, got {show(raw)}")
    unsupported = [c for k, v in _HF_REQUIRED.items() if (c := JsonReader(raw).choice(k, v, (v,)))]
    unknown = unknown_keys(raw, set(_HF_MAPPED) | set(_HF_REQUIRED) | _HF_HARMLESS)
    if unknown:
        unsupported.append(UNKNOWN_ATTRS + ", ".join(unknown))
    if unsupported:
        raise UnsupportedFeatureError("transformers config.json: not supported by this port: "
                                      + "; ".join(unsupported))
    r = JsonReader(raw, floats_only=True)
    r.check_types(_HF_HARMLESS_TYPES)
    kw = {ours: r.int(theirs, default) for theirs, (ours, default) in _HF_MAPPED.items()
          if ours in INT_FIELDS}
    kw |= {ours: r.bool(theirs, default) for theirs, (ours, default) in _HF_MAPPED.items()
           if ours in BOOL_FIELDS}
    kw["norm_eps"] = r.float("layer_norm_epsilon", 1e-5)
    kw["time_step_limit"] = r.pair("time_step_limit", (0.0, float("inf")))
    kw["eos_token_id"] = r.token("eos_token_id", 2, kw["vocab_size"])
    kw["pad_token_id"] = r.token("pad_token_id", 1, kw["vocab_size"], lists=False)
    if r.problems:
        raise ConfigError("transformers config.json: " + "; ".join(r.problems))
    return Mamba2Config(**kw)
