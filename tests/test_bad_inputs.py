"""Every bad input of the loading path raises one documented EquivError subclass, with a one-line
message saying what was expected and what came, raised by equiv's own code (never a traceback from
inside json, numpy, JAX or torch, never a silent wrong answer).

CASES is the one catalogue: the test runs each case, and

    PYTHONPATH=. python tests/test_bad_inputs.py

rewrites the table in docs/bad-inputs.md from the real messages (test_docs_table_is_current fails
when the two drift apart). The base checkpoint is the bundled fixture tiny-g2 (transformers format,
g=2, tied head), read torch-free; the helpers here are shared by the fuzz and pickle tests.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import struct
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import equiv
from equiv.errors import (
    CheckpointError,
    ConfigError,
    DtypeError,
    EquivError,
    ShapeError,
    TokenRangeError,
    UnsafeCheckpointError,
    UnsupportedFeatureError,
)
from equiv.fixtures import fixture_dir
from equiv.io.safetensors_io import read_safetensors, write_safetensors
from equiv.mamba2.convert import load_checkpoint

BASE = "tiny-g2"
EQUIV_DIR = Path(equiv.__file__).resolve().parent
DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-inputs.md"


# ---------------------------------------------------------------------------------------------
# checkpoint builders (torch-free)


@functools.cache
def _base():
    d = fixture_dir(BASE)
    return json.loads((d / "config.json").read_text()), read_safetensors(d / "model.safetensors")


def base_checkpoint() -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json dict, tensors) of the base fixture; fresh copies, safe to edit."""
    config, tensors = _base()
    return copy.deepcopy(config), {k: v.copy() for k, v in tensors.items()}


def write_checkpoint(path: Path, config, tensors: dict, weights: str = "model.safetensors") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    write_safetensors(path / weights, tensors)
    return path


def mamba_ssm_format(config: dict, tensors: dict) -> tuple[dict, dict]:
    """The same model as a mamba_ssm `MambaLMHeadModel` checkpoint (its state dict keeps the tied head)."""
    c = config
    ms = {"d_model": c["hidden_size"], "n_layer": c["num_hidden_layers"], "vocab_size": c["vocab_size"],
          "pad_vocab_size_multiple": 8, "tie_embeddings": c["tie_word_embeddings"], "rms_norm": True,
          "residual_in_fp32": c["residual_in_fp32"], "fused_add_norm": True,
          "ssm_cfg": {"layer": "Mamba2", "d_state": c["state_size"], "d_conv": c["conv_kernel"],
                      "expand": c["expand"], "headdim": c["head_dim"], "ngroups": c["n_groups"],
                      "chunk_size": c["chunk_size"], "bias": c["use_bias"], "conv_bias": c["use_conv_bias"]}}
    t = {("backbone.embedding.weight" if k == "backbone.embeddings.weight" else k): v
         for k, v in tensors.items()}
    t["lm_head.weight"] = t["backbone.embedding.weight"].copy()
    return ms, t


def safetensors_bytes(tensors: dict) -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        write_safetensors(Path(d) / "x.safetensors", tensors)
        return (Path(d) / "x.safetensors").read_bytes()


def split_header(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def join_header(header: dict, data: bytes) -> bytes:
    hb = json.dumps(header).encode()
    return struct.pack("<Q", len(hb)) + hb + data


def write_sharded(path: Path, config: dict, tensors: dict, weight_map_edit=None) -> Path:
    """Two shards plus model.safetensors.index.json (transformers' sharded layout)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for shard, keys in shards.items():
        write_safetensors(path / shard, {k: tensors[k] for k in keys})
        weight_map |= {k: shard for k in keys}
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    if weight_map_edit:
        weight_map_edit(index)
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


# ---------------------------------------------------------------------------------------------
# the catalogue


@dataclass(frozen=True)
class Case:
    name: str
    area: str
    run: Callable[[Path], object]  # builds the bad input under an empty directory and calls the API
    error: type[EquivError]
    match: str  # regex the message must contain (the expected/got substance)


def _config_edit(**changes):
    """config.json edits: key=value sets, key=... (Ellipsis) deletes; 'ssm_cfg.x' edits ssm_cfg."""
    def edit(config):
        for key, value in changes.items():
            target, key = (config["ssm_cfg"], key[9:]) if key.startswith("ssm_cfg__") else (config, key)
            if value is ...:
                target.pop(key, None)
            else:
                target[key] = value
    return edit


def config_case(name, area, error, match, fmt="transformers", **changes) -> Case:
    def run(tmp):
        config, tensors = base_checkpoint()
        if fmt == "mamba_ssm":
            config, tensors = mamba_ssm_format(config, tensors)
        _config_edit(**changes)(config)
        return load_checkpoint(write_checkpoint(tmp, config, tensors))
    return Case(name, area, run, error, match)


def raw_config_case(name, text: bytes, error, match) -> Case:
    def run(tmp):
        _, tensors = base_checkpoint()
        write_checkpoint(tmp, "{}", tensors)
        (tmp / "config.json").write_bytes(text)
        return load_checkpoint(tmp)
    return Case(name, "config.json file", run, error, match)


def tensors_case(name, edit, error, match, dtype="float32", area="checkpoint keys and values") -> Case:
    def run(tmp):
        config, tensors = base_checkpoint()
        edit(config, tensors)
        return load_checkpoint(write_checkpoint(tmp, config, tensors), dtype)
    return Case(name, area, run, error, match)


def bytes_case(name, mutate: Callable[[bytes], bytes], match) -> Case:
    def run(tmp):
        config, tensors = base_checkpoint()
        write_checkpoint(tmp, config, tensors)
        path = tmp / "model.safetensors"
        path.write_bytes(mutate(path.read_bytes()))
        return load_checkpoint(tmp)
    return Case(name, "safetensors file", run, CheckpointError, match)


def header_case(name, mutate: Callable[[dict], None], match) -> Case:
    def edit(blob):
        header, data = split_header(blob)
        mutate(header)
        return join_header(header, data)
    return bytes_case(name, edit, match)


def index_case(name, edit, match) -> Case:
    def run(tmp):
        config, tensors = base_checkpoint()
        return load_checkpoint(write_sharded(tmp, config, tensors, edit))
    return Case(name, "sharded index", run, CheckpointError, match)


@functools.cache
def _tiny_model():
    from equiv.mamba2.port import Mamba2Port

    return Mamba2Port().load(fixture_dir(BASE))


def tokens_case(name, ids, error, match, mask=None) -> Case:
    return Case(name, "token inputs", lambda tmp: _tiny_model().forward(ids, mask, taps=False), error, match)


def _first(t, suffix):
    return next(k for k in sorted(t) if k.endswith(suffix))


def _set(t, suffix, value):
    t[_first(t, suffix)] = value


def _header_set(key_suffix, field, value):
    def mutate(h):
        h[next(k for k in sorted(h) if k.endswith(key_suffix))][field] = value
    return mutate


def _rename_in_header(blob: bytes, old: str, new: str) -> bytes:
    """Rename one tensor in the header text (JSON parsers keep the last duplicate silently)."""
    header, data = split_header(blob)
    hb = json.dumps(header).replace(json.dumps(old), json.dumps(new), 1).encode()
    return struct.pack("<Q", len(hb)) + hb + data


def _pickle_payload_case() -> Case:
    def run(tmp):
        torch = pytest.importorskip("torch")
        config, tensors = mamba_ssm_format(*base_checkpoint())
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "config.json").write_text(json.dumps(config))
        torch.save({"x": _Payload(str(tmp / "MARKER"))}, tmp / "pytorch_model.bin")
        return load_checkpoint(tmp)
    return Case("pytorch_model.bin whose unpickling would call os.system", "pickle", run,
                UnsafeCheckpointError, r"would run code.*GLOBAL 'posix\.system'")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _bin_case(name, write, match) -> Case:
    def run(tmp):
        pytest.importorskip("torch")
        config, _ = mamba_ssm_format(*base_checkpoint())
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "config.json").write_text(json.dumps(config))
        write(tmp / "pytorch_model.bin")
        return load_checkpoint(tmp)
    return Case(name, "pickle", run, CheckpointError, match)


def _torch_save(obj):
    def write(path):
        import torch

        torch.save(obj() if callable(obj) else obj, path)
    return write


def _path_case(name, make_arg, error, match, dtype="float32") -> Case:
    return Case(name, "paths and arguments", lambda tmp: load_checkpoint(make_arg(tmp), dtype), error, match)


def _nonfinite(value, key="mixer.D"):
    def edit(config, t):
        wide = np.isfinite(value) and abs(value) > float(np.finfo(np.float32).max)
        a = t[_first(t, key)].astype(np.float64 if wide else np.float32)
        a[0] = value
        _set(t, key, a)
    return edit


CASES: list[Case] = [
    # -- config that contradicts itself
    config_case("n_groups does not divide num_heads", "config contradicts itself", ConfigError,
                r"n_groups \(g\): expected a divisor of num_heads \(h\) = 8, got 3", n_groups=3),
    config_case("num_heads x head_dim != expand x hidden_size", "config contradicts itself", ConfigError,
                r"expected expand x hidden_size = d_inner = 2 x 64 = 128, got 8 x 15 = 120", head_dim=15),
    config_case("chunk_size 0", "config contradicts itself", ConfigError,
                r"chunk_size: expected an integer in \[1, 2147483647\], got 0", chunk_size=0),
    config_case("chunk_size -4", "config contradicts itself", ConfigError, r"chunk_size: .* got -4",
                chunk_size=-4),
    config_case("time_step_limit lo > hi", "config contradicts itself", ConfigError,
                r"time_step_limit: expected 0 <= lo < hi", time_step_limit=[0.5, 0.1]),
    config_case("layer_norm_epsilon 0", "config contradicts itself", ConfigError,
                r"layer_norm_epsilon: expected a finite value > 0 that float32 holds .*got 0.0",
                layer_norm_epsilon=0.0),
    config_case("layer_norm_epsilon 1e47 (beyond float32)", "config contradicts itself", ConfigError,
                r"layer_norm_epsilon: expected a finite value > 0 that float32 holds "
                r"\(in \[1.4e-45, 3.403e\+38\]\), got 1e\+47", layer_norm_epsilon=1e47),
    config_case("time_step_limit hi 1e39 (beyond float32)", "config contradicts itself", ConfigError,
                r"time_step_limit: expected 0 <= lo < hi, lo finite, both within float32 \(hi may be inf\), "
                r"got \(0.0, 1e\+39\)", time_step_limit=[0.0, 1e39]),
    tensors_case("vocab_size smaller than the embedding",
                 lambda c, t: c.update(vocab_size=64), CheckpointError,
                 r"vocab_size: config.json says 64, the embedding has 96 rows",
                 area="config contradicts itself"),
    tensors_case("num_hidden_layers more than the checkpoint holds",
                 lambda c, t: c.update(num_hidden_layers=3), CheckpointError,
                 r"n_layers: config.json says 3, the checkpoint has layer indices 0..1",
                 area="config contradicts itself"),
    config_case("mamba_ssm headdim does not divide expand x d_model", "config contradicts itself",
                ConfigError,
                r"ssm_cfg.headdim \(p\): expected a divisor of expand x d_model = 128, got 48",
                fmt="mamba_ssm", ssm_cfg__headdim=48),
    config_case("mamba_ssm pad_vocab_size_multiple 0", "config contradicts itself", ConfigError,
                r"pad_vocab_size_multiple: expected an integer in \[1, .*got 0", fmt="mamba_ssm",
                pad_vocab_size_multiple=0),
    # -- wrong JSON types
    config_case("hidden_size as a string", "config value types", ConfigError,
                r"hidden_size: expected an integer in \[1, 2147483647\], got '64' \(str\)", hidden_size="64"),
    config_case("num_heads as a bool", "config value types", ConfigError, r"num_heads: .*got True \(bool\)",
                num_heads=True),
    config_case("state_size as a float", "config value types", ConfigError,
                r"state_size: .*got 16.0 \(float\)", state_size=16.0),
    config_case("head_dim null", "config value types", ConfigError, r"head_dim: .*got None \(NoneType\)",
                head_dim=None),
    config_case("chunk_size NaN", "config value types", ConfigError, r"chunk_size: .*got nan \(float\)",
                chunk_size=float("nan")),
    config_case("num_hidden_layers 10**30", "config value types", ConfigError,
                r"num_hidden_layers: expected an integer in \[1, 2147483647\], got 1" + "0" * 30,
                num_hidden_layers=10**30),
    config_case("vocab_size 2**31 (beyond int32 ids)", "config value types", ConfigError,
                r"vocab_size: .*got 2147483648", vocab_size=2**31),
    config_case("use_bias as the string 'false'", "config value types", ConfigError,
                r"use_bias: expected true or false, got 'false' \(str\)", use_bias="false"),
    config_case("tie_word_embeddings as 1", "config value types", ConfigError,
                r"tie_word_embeddings: expected true or false, got 1 \(int\)", tie_word_embeddings=1),
    config_case("layer_norm_epsilon as a string", "config value types", ConfigError,
                r"layer_norm_epsilon: expected a float .*, got '1e-5' \(str\)", layer_norm_epsilon="1e-5"),
    config_case("layer_norm_epsilon as an integer", "config value types", ConfigError,
                r"layer_norm_epsilon: expected a float \(transformers refuses integers here\), got 1 \(int\)",
                layer_norm_epsilon=1),
    config_case("initializer_range (ignored) as a string", "config value types", ConfigError,
                r"initializer_range: expected a float .*got 'abc' \(str\)", initializer_range="abc"),
    config_case("pad_token_id as a list", "config value types", ConfigError,
                r"pad_token_id: expected a token id or null, got \[1\] \(list\)", pad_token_id=[1]),
    config_case("layer_norm_epsilon Infinity", "config value types", ConfigError,
                r"layer_norm_epsilon: expected a finite value > 0 .*got inf",
                layer_norm_epsilon=float("inf")),
    config_case("torch_dtype '' (transformers would getattr(torch, ''))", "config value types", ConfigError,
                r"torch_dtype: expected null or a torch float dtype name \(.*\), got '' \(str\)",
                torch_dtype=""),
    config_case("time_step_limit with a string bound", "config value types", ConfigError,
                r"time_step_limit: expected a pair \[lo, hi\], each a float .*, got \[0.0, 'inf'\]",
                time_step_limit=[0.0, "inf"]),
    config_case("time_step_limit with three entries", "config value types", ConfigError,
                r"time_step_limit: expected a pair", time_step_limit=[0, 1, 2]),
    config_case("time_step_limit NaN bound", "config value types", ConfigError,
                r"time_step_limit: expected 0 <= lo < hi", time_step_limit=[float("nan"), 1.0]),
    config_case("eos_token_id as a string", "config value types", ConfigError,
                r"eos_token_id: expected a token id, a list of token ids, or null, got '2'",
                eos_token_id="2"),
    config_case("several bad values at once", "config value types", ConfigError,
                r"hidden_size: .*state_size: .*use_bias: ", hidden_size="64", state_size=None, use_bias=0),
    config_case("mamba_ssm ssm_cfg a list", "config value types", ConfigError,
                r"ssm_cfg: expected an object, got \[\] \(list\)", fmt="mamba_ssm", ssm_cfg=[]),
    config_case("mamba_ssm ngroups as a string", "config value types", ConfigError,
                r"ssm_cfg.ngroups: expected an integer", fmt="mamba_ssm", ssm_cfg__ngroups="2"),
    # -- config.json as a file
    raw_config_case("config.json truncated", b'{"model_type": "mamba2", "hidden_', ConfigError,
                    r"expected a config.json as valid JSON, got JSONDecodeError"),
    raw_config_case("config.json not UTF-8", b'{"model_type": "\xff\xfe"}', ConfigError,
                    r"expected a config.json as valid JSON, got UnicodeDecodeError"),
    raw_config_case("config.json a JSON array", b"[1, 2]", ConfigError,
                    r"expected a JSON object, got a JSON list"),
    raw_config_case("config.json with a key twice", b'{"model_type": "mamba2", "n_groups": 1, "n_groups": 8}',
                    ConfigError, r"expected each key once, got 'n_groups' twice"),
    raw_config_case("config.json nested 100000 deep", b"[" * 100000 + b"]" * 100000, ConfigError,
                    r"expected a config.json nested at most 64 levels deep, got 100000 levels"),
    raw_config_case("config.json with a 5000-digit integer", b'{"vocab_size": ' + b"9" * 5000 + b"}",
                    ConfigError, r"expected a config.json as valid JSON, got ValueError: Exceeds the limit"),
    raw_config_case("config.json of neither format", b'{"model_type": "mamba", "d_model": 4}', ConfigError,
                    r"expected a transformers Mamba2 config \(model_type 'mamba2'\) or a mamba_ssm config"),
    raw_config_case("config.json of 17 MiB", b'{"a": "' + b"x" * (17 * 2**20) + b'"}', ConfigError,
                    r"expected a config.json of at most 16777216 bytes, got \d+ bytes"),
    # -- features the port does not implement
    config_case("hidden_act gelu", "unsupported features", UnsupportedFeatureError,
                r"hidden_act: expected 'silu' \(all the port implements\), got 'gelu'", hidden_act="gelu"),
    config_case("norm_before_gate true", "unsupported features", UnsupportedFeatureError,
                r"norm_before_gate: expected False", norm_before_gate=True),
    config_case("rms_norm false (LayerNorm)", "unsupported features", UnsupportedFeatureError,
                r"rms_norm: expected True", rms_norm=False),
    config_case("unknown numerics-affecting attributes", "unsupported features", UnsupportedFeatureError,
                r"got unrecognised ones that may change the numerics: num_attention_heads, rope_theta",
                rope_theta=10000.0, num_attention_heads=8),
    config_case("layer_types with attention layers", "unsupported features", UnsupportedFeatureError,
                r"may change the numerics: layer_types$", layer_types=["mamba", "attention"]),
    config_case("two unsupported features at once", "unsupported features", UnsupportedFeatureError,
                r"hidden_act: .*norm_before_gate: ", hidden_act="relu", norm_before_gate=True),
    config_case("mamba_ssm without ssm_cfg.layer (Mamba1)", "unsupported features", UnsupportedFeatureError,
                r"ssm_cfg.layer: expected 'Mamba2' \(all the port implements\), got 'Mamba1'",
                fmt="mamba_ssm", ssm_cfg__layer=...),
    config_case("mamba_ssm d_intermediate (MLP blocks)", "unsupported features", UnsupportedFeatureError,
                r"d_intermediate: expected 0", fmt="mamba_ssm", d_intermediate=256),
    config_case("mamba_ssm attention layers", "unsupported features", UnsupportedFeatureError,
                r"attn_layer_idx: expected \[\]", fmt="mamba_ssm", attn_layer_idx=[1]),
    config_case("mamba_ssm partial d_ssm", "unsupported features", UnsupportedFeatureError,
                r"ssm_cfg.d_ssm: expected null or expand x d_model = 128", fmt="mamba_ssm",
                ssm_cfg__d_ssm=64),
    config_case("mamba_ssm unknown ssm_cfg key", "unsupported features", UnsupportedFeatureError,
                r"may change the numerics: ssm_cfg.dt_scale", fmt="mamba_ssm", ssm_cfg__dt_scale=2.0),
    # -- checkpoint keys, shapes, dtypes, values
    tensors_case("missing, unexpected and misshapen keys together",
                 lambda c, t: (t.pop(_first(t, "0.mixer.D")), t.update(extra=np.zeros(2, np.float32)),
                               _set(t, "0.mixer.dt_bias", np.zeros(9, np.float32))),
                 CheckpointError, r"expected keys missing \(1\): backbone.layers.0.mixer.D \| "
                 r"unexpected keys \(1\): extra \| wrong shapes \(1\): backbone.layers.0.mixer.dt_bias: "
                 r"expected \(n_heads=8\), got \(9,\)"),
    tensors_case("conv weight with the wrong kernel width",
                 lambda c, t: _set(t, "0.mixer.conv1d.weight", np.zeros((192, 1, 3), np.float32)),
                 CheckpointError, r"expected \(conv_dim=192, 1, conv_kernel=4\), got \(192, 1, 3\)"),
    tensors_case("every tensor of layer 1 missing",
                 lambda c, t: [t.pop(k) for k in list(t) if ".layers.1." in k],
                 CheckpointError, r"n_layers: config.json says 2, the checkpoint has layer indices 0..0.*"
                 r"expected keys missing \(9\)"),
    tensors_case("integer tensor (I32 A_log)", lambda c, t: _set(t, "0.mixer.A_log", np.zeros(8, np.int32)),
                 CheckpointError, r"expected floating tensors, got: backbone.layers.0.mixer.A_log: int32"),
    tensors_case("bool tensor (norm weight)", lambda c, t: _set(t, "norm_f.weight", np.ones(64, bool)),
                 CheckpointError, r"expected floating tensors, got: backbone.norm_f.weight: bool"),
    tensors_case("0-d tensor where a vector belongs",
                 lambda c, t: _set(t, "norm_f.weight", np.float32(1)[()]),
                 CheckpointError, r"backbone.norm_f.weight: expected \(d_model=64\), got \(\)"),
    tensors_case("tied head present and different from the embedding",
                 lambda c, t: t.update({"lm_head.weight": np.zeros((96, 64), np.float32)}), CheckpointError,
                 r"lm_head.weight \(present and different from the embedding although tie_word_embeddings"),
    tensors_case("mamba_ssm key names under a transformers config",
                 lambda c, t: t.update({"backbone.embedding.weight": t.pop("backbone.embeddings.weight")}),
                 CheckpointError, r"missing \(1\): backbone.embeddings.weight \| unexpected keys \(1\): "
                 r"backbone.embedding.weight"),
    tensors_case("NaN in a weight", _nonfinite(float("nan")), CheckpointError,
                 r"expected finite weights in float32, got NaN/inf in 1 tensors: backbone.layers.0.mixer.D "
                 r"\(1 of 8\)"),
    tensors_case("inf in a weight", _nonfinite(float("inf"), "mixer.in_proj.weight"), CheckpointError,
                 r"NaN/inf in 1 tensors: backbone.layers.0.mixer.in_proj.weight"),
    tensors_case("F64 weight beyond the float32 range", _nonfinite(1e39), CheckpointError,
                 r"expected finite weights in float32"),
    tensors_case("float32 weight beyond the bfloat16 range (dtype bfloat16)",
                 _nonfinite(3.4e38, "mixer.out_proj.weight"), CheckpointError,
                 r"expected finite weights in bfloat16, got NaN/inf in 1 tensors", dtype="bfloat16"),
    # -- safetensors file
    bytes_case("model.safetensors truncated to half", lambda b: b[: len(b) // 2],
               r"expected a byte range inside the .*-byte data section"),
    bytes_case("model.safetensors of 5 bytes", lambda b: b[:5],
               r"expected at least 8 bytes for the header length, got 5"),
    bytes_case("header length 2**63", lambda b: struct.pack("<Q", 2**63) + b[8:],
               r"expected a header length within the file .* got 9223372036854775808"),
    bytes_case("header not JSON", lambda b: b[:8] + b"\x00" * 64 + b[72:],
               r"expected a JSON header as valid JSON, got"),
    bytes_case("trailing bytes after the tensors", lambda b: b + b"\x00" * 16,
               r"expected the tensors to fill the .*-byte data section, they end at byte"),
    header_case("header claims a 2**40 x 2**40 tensor", _header_set("norm_f.weight", "shape", [2**40, 2**40]),
                r"expected 4835703278458516698824704 bytes for shape \[1099511627776, 1099511627776\]"),
    header_case("header shape (0, 2**62): empty, yet too big for numpy",  # at the end: no gap, no overlap
                lambda h: h.update({"empty": {"dtype": "F32", "shape": [0, 2**62], "data_offsets": [
                    max(v["data_offsets"][1] for v in h.values())] * 2}}),
                r"tensor 'empty': expected a shape numpy can allocate, got \[0, 4611686018427387904\] "
                r"\(ValueError: array is too big"),
    header_case("header shape with 100000 dimensions", _header_set("norm_f.weight", "shape", [1] * 100000),
                r"expected at most 64 dimensions, got 100000"),
    header_case("header dtype F8_E4M3", _header_set("norm_f.weight", "dtype", "F8_E4M3"),
                r"expected a dtype in \[.*\], got 'F8_E4M3'"),
    header_case("header dtype a list", _header_set("norm_f.weight", "dtype", ["F32"]),
                r"expected a dtype in .*got \['F32'\]"),
    header_case("header shape with a negative size", _header_set("norm_f.weight", "shape", [-64]),
                r"expected a shape of non-negative ints, got \[-64\]"),
    header_case("header offsets not ints", _header_set("norm_f.weight", "data_offsets", [0.0, 256.0]),
                r"expected data_offsets \[begin, end\], got \[0.0, 256.0\]"),
    header_case("header offsets overlapping another tensor",  # A_log and D are both (h,) float32
                lambda h: h["backbone.layers.0.mixer.D"].update(
                    data_offsets=h["backbone.layers.0.mixer.A_log"]["data_offsets"]),
                r"expected its bytes to start at \d+, got \[\d+, \d+\), which overlaps the previous tensor"),
    header_case("header entry missing data_offsets",
                lambda h: h["backbone.norm_f.weight"].pop("data_offsets"),
                r"expected keys dtype, shape, data_offsets"),
    header_case("header __metadata__ not an object", lambda h: h.update(__metadata__=[1]),
                r"__metadata__: expected an object, got list"),
    bytes_case("header names a tensor twice", lambda b: _rename_in_header(b, "backbone.norm_f.weight",
                                                                          "backbone.layers.0.norm.weight"),
               r"expected each tensor name once in the header, got 'backbone.layers.0.norm.weight' twice"),
    Case("model.safetensors is a directory", "safetensors file",
         lambda tmp: (write_checkpoint(tmp, base_checkpoint()[0], {"a": np.zeros(1, np.float32)}, "w"),
                      (tmp / "model.safetensors").mkdir(), load_checkpoint(tmp)),
         CheckpointError, r"model.safetensors': expected a weights file \(a regular file\), got a directory"),
    Case("no weights file at all", "safetensors file",
         lambda tmp: (write_checkpoint(tmp, base_checkpoint()[0], {"a": np.zeros(1, np.float32)},
                                       "weights.npz"),
                      load_checkpoint(tmp)),
         CheckpointError,
         r"expected one of model.safetensors, model.safetensors.index.json, pytorch_model.bin"),
    # -- sharded index
    index_case("index names a shard that is not there",
               lambda i: i["weight_map"].update(
                   {next(iter(i["weight_map"])): "model-00003-of-00003.safetensors"}),
               r"expected the shards it names in .*, missing: model-00003-of-00003.safetensors"),
    index_case("index shard path with ../", lambda i: i["weight_map"].update(
        {next(iter(i["weight_map"])): "../outside.safetensors"}),
        r"expected shard names that are plain file names inside .*, got '../outside.safetensors'"),
    index_case("index shard path absolute", lambda i: i["weight_map"].update(
        {next(iter(i["weight_map"])): "/etc/passwd"}), r"got '/etc/passwd'"),
    index_case("index shard name not a string", lambda i: i["weight_map"].update(
        {next(iter(i["weight_map"])): 7}), r"expected shard names that are plain file names .*got 7"),
    index_case("index weight_map a list", lambda i: i.update(weight_map=[]),
               r"expected a non-empty 'weight_map' object, got list"),
    index_case("index key listed under the wrong shard", lambda i: i["weight_map"].update(
        {sorted(i["weight_map"])[0]: "model-00002-of-00002.safetensors"}),
        r"expected in model-00002-of-00002.safetensors \(the index\), "
        r"got in model-00001-of-00002.safetensors"),
    index_case("index lists a key no shard holds", lambda i: i["weight_map"].update(
        {"backbone.ghost.weight": "model-00001-of-00002.safetensors"}),
        r"expected every weight_map key in a shard, 1 in none: backbone.ghost.weight"),
    Case("index not JSON", "sharded index",
         lambda tmp: (write_sharded(tmp, *base_checkpoint()),
                      (tmp / "model.safetensors.index.json").write_text("{weight_map:"),
                      load_checkpoint(tmp)),
         CheckpointError, r"expected a shard index as valid JSON, got JSONDecodeError"),
    # -- pickle (.bin) checkpoints; the full proof that nothing runs is tests/test_pickle_refused.py
    _pickle_payload_case(),
    _bin_case("pytorch_model.bin of random bytes", lambda p: p.write_bytes(bytes(range(256)) * 4),
              r"expected torch.save's zip archive, got neither it nor a pickle"),
    _bin_case("pytorch_model.bin holding a list", _torch_save(lambda: [__import__("torch").zeros(2)]),
              r"expected a flat state dict of tensors, got list"),
    _bin_case("pytorch_model.bin holding non-tensor values", _torch_save({"step": 3}),
              r"expected a flat state dict of str -> tensor, got other entries: 'step'"),
    _bin_case("pytorch_model.bin truncated", lambda p: (_torch_save({"a": __import__("torch").zeros(64)})(p),
                                                        p.write_bytes(p.read_bytes()[:200])),
              r"expected torch.save's zip archive, its directory is unreadable, truncated or damaged"),
    # -- tokens
    tokens_case("token id equal to vocab_size", [[1, 96]], TokenRangeError,
                r"expected token ids in \[0, 96\) \(vocab_size\), got 96 at position \[0, 1\]"),
    tokens_case("negative token id", [[-1, 3]], TokenRangeError, r"got -1 at position \[0, 0\]"),
    tokens_case("uint64 id 2**64-1", np.array([[2**64 - 1]], np.uint64), TokenRangeError,
                r"got 18446744073709551615"),
    tokens_case("empty batch (1, 0)", np.zeros((1, 0), np.int32), TokenRangeError,
                r"expected at least one token per sequence, got shape \(1, 0\)"),
    tokens_case("empty list", [], TokenRangeError, r"expected at least one token"),
    tokens_case("1-D ids", [1, 2, 3], ShapeError, r"expected shape \(b, l\), got \(3,\)"),
    tokens_case("float ids", [[1.0, 2.0]], TokenRangeError, r"expected integer token ids, got dtype float64"),
    tokens_case("bool ids", [[True]], TokenRangeError, r"expected integer token ids, got dtype bool"),
    tokens_case("ragged ids", [[1, 2], [3]], ShapeError, r"expected a rectangular \(b, l\) array, got list"),
    tokens_case("mask of the wrong shape", [[1, 2]], ShapeError, r"mask: expected shape \(b, l\) = \(1, 2\)",
                mask=[[1]]),
    tokens_case("mask all padding", [[1, 2]], TokenRangeError,
                r"expected at least one unmasked token per sequence, got none in rows \[0\]",
                mask=[[0, 0]]),
    tokens_case("mask value 2", [[1, 2]], ShapeError,
                r"expected only 0 \(padding\) and 1 \(token\) values, got \[2\]", mask=[[1, 2]]),
    tokens_case("mask of strings", [[1, 2]], ShapeError,
                r"mask: expected 0/1 numbers or booleans, got dtype <U",
                mask=[["1", "1"]]),
    # -- paths and arguments
    _path_case("dtype float16", lambda tmp: fixture_dir(BASE), DtypeError,
               r"dtype: expected one of \['bfloat16', 'float32'\], got 'float16'", dtype="float16"),
    _path_case("dtype np.float32 (not a name)", lambda tmp: fixture_dir(BASE), DtypeError,
               r"got <class 'numpy.float32'> \(type\)", dtype=np.float32),
    _path_case("dtype a list", lambda tmp: fixture_dir(BASE), DtypeError, r"got \['float32'\] \(list\)",
               dtype=["float32"]),
    _path_case("checkpoint directory does not exist", lambda tmp: tmp / "nope", CheckpointError,
               r"expected a directory, got .*nope' \(no such path\)"),
    _path_case("checkpoint path is a file", lambda tmp: fixture_dir(BASE) / "config.json", CheckpointError,
               r"expected a directory, got .*config.json' \(a file\)"),
    _path_case("checkpoint path ''", lambda tmp: "", CheckpointError, r"expected a directory path, got ''"),
    _path_case("checkpoint path None", lambda tmp: None, CheckpointError,
               r"expected a directory path, got None"),
    _path_case("checkpoint path with a NUL byte", lambda tmp: str(tmp) + "\0x", CheckpointError,
               r"expected a directory, got .* \(a path with a NUL byte\)"),
    _path_case("directory without config.json", lambda tmp: (tmp.mkdir(), tmp)[1], ConfigError,
               r"config.json' to exist"),
]


def run_case(case: Case, tmp: Path) -> EquivError:
    """Run one case; return the EquivError it raised (anything else propagates, and so fails)."""
    try:
        case.run(tmp)
    except EquivError as e:
        return e
    raise AssertionError(f"{case.name}: expected {case.error.__name__}, nothing was raised "
                         "(a silent wrong answer)")


def redact(message: str, tmp: Path) -> str:
    return (message.replace(str(tmp), "<dir>").replace(str(fixture_dir(BASE)), f"fixtures/{BASE}")
            .replace("|", "\\|"))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_raises_one_documented_error(case, tmp_path):
    err = run_case(case, tmp_path / "ckpt")
    message = str(err)
    assert type(err) is case.error, f"{case.name}: expected {case.error.__name__}, got {err!r}"
    assert re.search(case.match, message), f"{case.name}: message does not match {case.match!r}: {message}"
    assert "\n" not in message and "expected" in message and len(message) < 2000, message
    # raised by equiv's own code, not escaping from inside json/numpy/JAX/torch
    last = traceback.extract_tb(err.__traceback__)[-1].filename
    assert Path(last).resolve().is_relative_to(EQUIV_DIR), f"{case.name}: raised in {last}"


def test_gigantic_header_shape_allocates_nothing(tmp_path):
    """The shape check runs on the header alone: a 2**80-byte claim fails in well under a second
    with no MemoryError (an allocation attempt would raise MemoryError or take the machine down)."""
    import time

    case = next(c for c in CASES if c.name == "header claims a 2**40 x 2**40 tensor")
    t0 = time.perf_counter()
    err = run_case(case, tmp_path / "ckpt")
    assert isinstance(err, CheckpointError) and time.perf_counter() - t0 < 5


def test_out_of_memory_is_a_checkpoint_error(tmp_path, monkeypatch):
    """A checkpoint too big for this machine: host MemoryError while reading or converting, named
    with the bytes needed (simulated: the allocation functions raise)."""
    import equiv.io.safetensors_io as io
    import equiv.mamba2.convert as convert

    def no_memory(*args, **kwargs):
        raise MemoryError

    with monkeypatch.context() as m:
        m.setattr(convert, "_to_params", no_memory)
        with pytest.raises(CheckpointError, match=r"expected room for \d+ bytes of float32 weights, "
                                                  r"allocation failed \(MemoryError\)"):
            load_checkpoint(fixture_dir(BASE))
    with monkeypatch.context() as m:
        m.setattr(io.np, "empty", no_memory)
        with pytest.raises(CheckpointError, match=r"expected a shape numpy can allocate, got \[\d+"):
            load_checkpoint(fixture_dir(BASE))


def test_docs_table_is_current():
    """docs/bad-inputs.md lists every case of the catalogue (regenerate with this file's __main__)."""
    doc = DOC.read_text()
    missing = [c.name for c in CASES if f"| {c.name} |" not in doc]
    assert not missing, f"docs/bad-inputs.md lacks {missing}: PYTHONPATH=. python tests/test_bad_inputs.py"
    assert f"{len(CASES)} bad inputs" in doc


def _write_docs() -> None:
    import tempfile

    rows = []
    for case in CASES:
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d) / "ckpt"
            err = run_case(case, tmp)
            rows.append(f"| {case.name} | {case.area} | `{type(err).__name__}` | {redact(str(err), tmp)} |")
    text = DOC.read_text() if DOC.exists() else "<!-- table:start -->\n<!-- table:end -->\n"
    start, end = text.index("<!-- table:start -->"), text.index("<!-- table:end -->")
    table = "\n".join([f"<!-- table:start -->\n{len(CASES)} bad inputs, each raising the class shown; the "
                       "message is the real one (`<dir>` is the checkpoint directory):\n",
                       "| bad input | area | exception | message |", "|---|---|---|---|", *rows, ""])
    DOC.write_text(text[:start] + table + text[end:])
    print(f"wrote {len(rows)} rows to {DOC}")


if __name__ == "__main__":
    sys.exit(_write_docs())
