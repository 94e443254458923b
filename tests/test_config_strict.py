"""Strict config parsing: numerics-affecting attributes the port does not know are
refused by name, the allow-listed harmless ones change nothing, mamba_ssm configs (ssm_cfg, D_has_hdim,
pad_vocab_size_multiple) parse, and a key missing from config.json takes the upstream class default
(checked against transformers' `Mamba2Config` itself and against mamba_ssm's source)."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from equiv.errors import ConfigError, UnsupportedFeatureError
from equiv.mamba2 import config_mamba_ssm as MS
from equiv.mamba2 import config_transformers as HF
from equiv.mamba2.config import Mamba2Config
from equiv.mamba2.config_file import load_config
from equiv.mamba2.config_mamba_ssm import config_from_mamba_ssm
from equiv.mamba2.config_transformers import config_from_transformers
from equiv.mamba2.convert import load_checkpoint
from tests.test_bad_inputs import base_checkpoint, mamba_ssm_format, write_checkpoint

# our field -> transformers attribute, for every mapped attribute
HF_NAME = {ours: theirs for theirs, (ours, _) in HF._HF_MAPPED.items()}


def base_config() -> dict:
    return base_checkpoint()[0]


def hf_attrs(raw: dict) -> dict:
    """transformers' own reading of a config dict: {our field: value}."""
    import tempfile

    transformers = pytest.importorskip("transformers")
    with tempfile.TemporaryDirectory() as d:  # from_json_file decodes {"__float__": "Infinity"}
        (Path(d) / "config.json").write_text(json.dumps(raw))
        c = transformers.Mamba2Config.from_json_file(Path(d) / "config.json")
    out = {ours: getattr(c, theirs) for ours, theirs in HF_NAME.items()}
    out["time_step_limit"] = tuple(float(x) for x in out["time_step_limit"])
    return out


def ours_attrs(cfg: Mamba2Config) -> dict:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name in HF_NAME}


# ---------------------------------------------------------------------------------------------
# unknown attributes are refused by name; harmless ones are accepted and change nothing

NUMERICS_AFFECTING = {"rope_theta": 10000.0, "num_attention_heads": 8, "intermediate_size": 256,
                      "attention_layer_indices": [1], "mlp_ratio": 4, "use_mamba_kernels": False,
                      "norm_eps": 1e-6, "time_step_scale": 2.0, "D_has_hdim": True}


@pytest.mark.parametrize("key", sorted(NUMERICS_AFFECTING))
def test_unknown_attribute_is_refused_by_name(key):
    raw = base_config() | {key: NUMERICS_AFFECTING[key]}
    with pytest.raises(UnsupportedFeatureError, match=rf"may change the numerics: {key}$"):
        config_from_transformers(raw)


def test_every_unknown_attribute_is_named_in_one_error():
    raw = base_config() | NUMERICS_AFFECTING
    with pytest.raises(UnsupportedFeatureError) as info:
        config_from_transformers(raw)
    assert str(info.value).endswith("may change the numerics: " + ", ".join(sorted(NUMERICS_AFFECTING)))


# a plausible value for each allow-listed attribute (what transformers or a hub config writes)
HARMLESS_VALUES = {
    "transformers_version": "4.44.0", "architectures": ["Mamba2ForCausalLM"], "output_hidden_states": True,
    "return_dict": False, "dtype": "bfloat16", "torch_dtype": "bfloat16", "chunk_size_feed_forward": 0,
    "is_encoder_decoder": False, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0},
    "problem_type": None, "bos_token_id": 0, "initializer_range": 0.02, "time_step_rank": 256,
    "time_step_min": 0.01, "time_step_max": 0.2, "time_step_floor": 1e-3, "rescale_prenorm_residual": True,
    "use_cache": False, "_name_or_path": "some/model", "output_attentions": True,
    "tokenizer_class": "GPTNeoXTokenizer",
    "emb_layer_norm_before": None,
}


def test_harmless_value_table_covers_the_allow_list():
    assert set(HARMLESS_VALUES) == HF._HF_HARMLESS


@pytest.mark.parametrize("key", sorted(HF._HF_HARMLESS))
def test_allow_listed_attribute_is_accepted_and_changes_nothing(key):
    assert config_from_transformers(base_config() | {key: HARMLESS_VALUES[key]}) == \
        config_from_transformers(base_config())


def test_required_values_are_accepted_when_they_match():
    raw = base_config() | {"rms_norm": True, "norm_before_gate": False, "hidden_act": "silu"}
    assert config_from_transformers(raw) == config_from_transformers(base_config())


@pytest.mark.parametrize("key,value", [("rms_norm", 1), ("norm_before_gate", 0), ("hidden_act", "SiLU")])
def test_required_values_are_compared_with_their_type(key, value):
    """1 == True in Python; a config saying `"rms_norm": 1` is not the documented spelling."""
    with pytest.raises(UnsupportedFeatureError, match=rf"{key}: expected"):
        config_from_transformers(base_config() | {key: value})


def test_layer_types_is_refused_like_transformers_refuses_it():
    """transformers 5 derives Mamba2Config.layer_types (a read-only property) and cannot load a
    config.json that sets it; hybrid configs use it to place attention layers. Refused by name."""
    for layer_types in (["mamba", "mamba"], ["mamba", "attention"]):
        with pytest.raises(UnsupportedFeatureError, match=r"may change the numerics: layer_types$"):
            config_from_transformers(base_config() | {"layer_types": layer_types})


# ---------------------------------------------------------------------------------------------
# defaults: transformers


def test_missing_keys_take_transformers_class_defaults():
    """An almost empty config.json reads like transformers' `Mamba2Config()`: every mapped
    attribute equal (n_groups 8, tie_word_embeddings false, chunk_size 256, ...)."""
    ours = ours_attrs(config_from_transformers({"model_type": "mamba2"}))
    assert ours == hf_attrs({"model_type": "mamba2"})
    assert ours["n_groups"] == 8 and ours["tie_embeddings"] is False  # the two that surprise people


def test_default_table_matches_the_installed_transformers():
    transformers = pytest.importorskip("transformers")
    defaults = transformers.Mamba2Config()
    for theirs, (_, default) in HF._HF_MAPPED.items():
        got = getattr(defaults, theirs)
        assert (tuple(got) if theirs == "time_step_limit" else got) == default, theirs


@given(st.sets(st.sampled_from(sorted(HF._HF_MAPPED))))
def test_dropping_keys_agrees_with_transformers(dropped):
    """Drop any subset of mapped keys from a real config.json: if transformers rejects the result,
    so do we; if we accept it, transformers does too and reads every mapped attribute as we do.
    (We reject more: transformers accepts n_groups not dividing num_heads.)"""
    hub_errors = pytest.importorskip("huggingface_hub.errors")
    raw = {k: v for k, v in base_config().items() if k not in dropped}
    try:
        theirs = hf_attrs(raw)
    except hub_errors.StrictDataclassError:  # transformers' @strict validation
        event("transformers rejects")
        with pytest.raises(ConfigError):
            config_from_transformers(raw)
        return
    event("both accept")
    ours = ours_attrs(config_from_transformers(raw))
    for tok in ("eos_token_id", "pad_token_id"):  # we drop ids outside the vocabulary
        if theirs[tok] is not None and not 0 <= theirs[tok] < theirs["vocab_size"]:
            theirs[tok] = None
    assert ours == theirs


def test_transformers_saved_configs_parse_like_transformers(tmp_path):
    """config.json as transformers 5 writes it (non-finite floats as {"__float__": ...}), for a few
    non-default settings."""
    transformers = pytest.importorskip("transformers")
    for i, kw in enumerate([dict(time_step_limit=(0.01, 10.0), use_bias=True, n_groups=2),
                            dict(tie_word_embeddings=True, residual_in_fp32=False, layer_norm_epsilon=1e-6),
                            dict(chunk_size=64, conv_kernel=3, eos_token_id=[5, 7])]):
        c = transformers.Mamba2Config(vocab_size=128, hidden_size=64, num_heads=8, head_dim=16,
                                      num_hidden_layers=2, state_size=16, **({"n_groups": 1} | kw))
        c.save_pretrained(tmp_path / str(i))
        cfg, fmt = load_config(tmp_path / str(i))
        raw = json.loads((tmp_path / str(i) / "config.json").read_text())
        theirs = hf_attrs(raw)
        if isinstance(theirs["eos_token_id"], list):  # generation stops on the first one
            theirs["eos_token_id"] = theirs["eos_token_id"][0]
        assert fmt == "transformers" and ours_attrs(cfg) == theirs


# ---------------------------------------------------------------------------------------------
# mamba_ssm


def _mamba_ssm_source() -> Path | None:
    spec = importlib.util.find_spec("mamba_ssm")  # locates the package without running its __init__
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def _defaults_in_source(path: Path, cls: str, method: str | None) -> dict:
    """Default values of a dataclass's fields, or of a method's keyword arguments, read with ast
    (importing mamba_ssm needs its CUDA extension)."""
    node = next(n for n in ast.walk(ast.parse(path.read_text()))
                if isinstance(n, ast.ClassDef) and n.name == cls)
    if method is None:
        return {s.target.id: ast.literal_eval(s.value) for s in node.body
                if isinstance(s, ast.AnnAssign) and s.value is not None and not isinstance(s.value, ast.Call)}
    fn = next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == method)
    args = fn.args.args[-len(fn.args.defaults):]
    out = {}
    for a, d in zip(args, fn.args.defaults):
        try:
            out[a.arg] = ast.literal_eval(d)
        except ValueError:  # float("inf")
            out[a.arg] = eval(compile(ast.Expression(d), "<default>", "eval"), {"float": float})
    return out


def test_mamba_ssm_default_tables_match_its_source():
    root = _mamba_ssm_source()
    if root is None:
        pytest.skip("mamba_ssm is not installed")
    top = _defaults_in_source(root / "models" / "config_mamba.py", "MambaConfig", None)
    assert {k: top[k] for k in MS._MS_TOP_DEFAULTS} == MS._MS_TOP_DEFAULTS
    ssm = _defaults_in_source(root / "modules" / "mamba2.py", "Mamba2", "__init__")
    assert {k: ssm[k] for k in MS._MS_SSM_DEFAULTS} == MS._MS_SSM_DEFAULTS
    # every constructor argument is either handled, allow-listed, or absent from JSON by nature
    assert set(ssm) - MS._MS_SSM <= {"layer_idx", "device", "dtype"}


def test_mamba_ssm_config_maps_every_field():
    raw = {"d_model": 64, "n_layer": 3, "vocab_size": 100, "pad_vocab_size_multiple": 16,
           "tie_embeddings": False, "residual_in_fp32": False, "rms_norm": True, "fused_add_norm": False,
           "ssm_cfg": {"layer": "Mamba2", "d_state": 32, "d_conv": 3, "expand": 2, "headdim": 32,
                       "ngroups": 2, "chunk_size": 64, "dt_limit": [0.001, 0.5], "bias": True,
                       "conv_bias": False, "D_has_hdim": True, "dt_min": 0.01, "A_init_range": [1, 8],
                       "use_mem_eff_path": False}}
    cfg = config_from_mamba_ssm(raw)
    assert cfg == Mamba2Config(vocab_size=112, d_model=64, n_layers=3, d_state=32, head_dim=32, n_heads=4,
                               n_groups=2, expand=2, conv_kernel=3, chunk_size=64,
                               time_step_limit=(0.001, 0.5),
                               use_bias=True, use_conv_bias=False, norm_eps=1e-5, residual_in_fp32=False,
                               tie_embeddings=False, d_has_hdim=True)


def test_mamba_ssm_missing_keys_take_its_defaults():
    cfg = config_from_mamba_ssm({"ssm_cfg": {"layer": "Mamba2"}})
    assert (cfg.d_model, cfg.n_layers, cfg.d_state, cfg.head_dim, cfg.n_groups, cfg.chunk_size) == \
        (2560, 64, 128, 64, 1, 256)
    assert cfg.vocab_size == 50280  # 50277 padded to a multiple of 8, as MambaLMHeadModel does
    assert cfg.tie_embeddings is True and cfg.d_has_hdim is False and cfg.time_step_limit == (0.0, math.inf)


@pytest.mark.parametrize("vocab,multiple,padded", [(50277, 16, 50288), (50280, 8, 50280), (90, 8, 96),
                                                   (96, 1, 96), (1, 7, 7)])
def test_pad_vocab_size_multiple(vocab, multiple, padded):
    raw = {"d_model": 64, "n_layer": 1, "vocab_size": vocab, "pad_vocab_size_multiple": multiple,
           "ssm_cfg": {"layer": "Mamba2", "headdim": 16}}
    assert config_from_mamba_ssm(raw).vocab_size == padded


def test_pad_vocab_size_multiple_reaches_the_checkpoint(tmp_path):
    """vocab 90 padded to 96 matches the 96-row embedding; without padding it does not."""
    config, tensors = mamba_ssm_format(*base_checkpoint())
    cfg, _, fmt = load_checkpoint(write_checkpoint(tmp_path / "a", config | {"vocab_size": 90}, tensors))
    assert fmt == "mamba_ssm" and cfg.vocab_size == 96
    with pytest.raises(Exception, match=r"vocab_size: config.json says 90, the embedding has 96 rows"):
        load_checkpoint(write_checkpoint(tmp_path / "b", config | {"vocab_size": 90,
                                                                    "pad_vocab_size_multiple": 1}, tensors))


def test_d_has_hdim_checkpoint_loads_per_channel_d(tmp_path):
    """D_has_hdim: D is (d_inner,) = (h * p,) in the checkpoint, (h, p) head-major in the params."""
    config, tensors = mamba_ssm_format(*base_checkpoint())
    config["ssm_cfg"]["D_has_hdim"] = True
    h, p = config["d_model"] * 2 // config["ssm_cfg"]["headdim"], config["ssm_cfg"]["headdim"]
    for k in [k for k in tensors if k.endswith("mixer.D")]:
        tensors[k] = np.arange(h * p, dtype=np.float32)
    cfg, params, _ = load_checkpoint(write_checkpoint(tmp_path / "d", config, tensors))
    assert cfg.d_has_hdim
    d = np.asarray(params["layers"][0]["D"])
    assert d.shape == (h, p) and d[1, 0] == p and d[0, 1] == 1  # "(h p)" order
    tensors[k] = np.zeros(h, np.float32)  # the per-head shape is now wrong
    with pytest.raises(Exception, match=rf"mixer.D: expected \(d_inner={h * p}\), got \({h},\)"):
        load_checkpoint(write_checkpoint(tmp_path / "e", config, tensors))


@pytest.mark.parametrize("key", ["fused_add_norm", "attn_cfg", "ssm_cfg.dt_min", "ssm_cfg.dt_max",
                                 "ssm_cfg.dt_init_floor", "ssm_cfg.A_init_range", "ssm_cfg.conv_init",
                                 "ssm_cfg.use_mem_eff_path", "ssm_cfg.sequence_parallel"])
def test_mamba_ssm_harmless_attributes_change_nothing(key):
    config, _ = mamba_ssm_format(*base_checkpoint())
    edited = json.loads(json.dumps(config))
    value = {"fused_add_norm": False, "attn_cfg": {"num_heads": 4}, "ssm_cfg.A_init_range": [2, 4],
             "ssm_cfg.conv_init": 0.1, "ssm_cfg.use_mem_eff_path": False,
             "ssm_cfg.sequence_parallel": False}.get(key, 0.5)
    (edited["ssm_cfg"] if key.startswith("ssm_cfg.") else edited)[key.removeprefix("ssm_cfg.")] = value
    assert config_from_mamba_ssm(edited) == config_from_mamba_ssm(config)


# ---------------------------------------------------------------------------------------------
# the dataclass itself


def test_direct_construction_normalises_numpy_and_stays_hashable():
    cfg = Mamba2Config.tiny(chunk_size=np.int64(8), time_step_limit=[0, 1])
    assert type(cfg.chunk_size) is int and cfg.time_step_limit == (0.0, 1.0)
    assert hash(cfg) == hash(Mamba2Config.tiny(chunk_size=8, time_step_limit=(0.0, 1.0)))


@pytest.mark.parametrize("change", [dict(chunk_size=0), dict(n_groups=3), dict(head_dim=15),
                                    dict(use_bias="yes"), dict(norm_eps="1e-5"), dict(time_step_limit=(1,)),
                                    dict(eos_token_id=96), dict(d_model=2**31)])
def test_direct_construction_is_validated(change):
    with pytest.raises(ConfigError, match="expected"):
        Mamba2Config.tiny(**change)
