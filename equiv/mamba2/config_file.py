"""A checkpoint's config.json: detect its dialect (transformers or mamba_ssm) and read it strictly."""

from __future__ import annotations

from pathlib import Path

from equiv.errors import ConfigError, clip, quote_path
from equiv.io.bounded import probe
from equiv.io.json_reader import read_json_object
from equiv.mamba2.config import Mamba2Config, show
from equiv.mamba2.config_mamba_ssm import config_from_mamba_ssm
from equiv.mamba2.config_transformers import config_from_transformers


def detect_format(raw: dict) -> str:
    if not isinstance(raw, dict):
        raise ConfigError(f"config.json: expected a JSON object, got {show(raw)}")
    if "ssm_cfg" in raw or "n_layer" in raw:
        return "mamba_ssm"
    if raw.get("model_type") == "mamba2" or "num_hidden_layers" in raw:
        return "transformers"
    keys = clip(repr(sorted(map(str, raw))[:12]), 150)
    raise ConfigError("config.json: expected a transformers Mamba2 config (model_type 'mamba2') or a "
                      f"mamba_ssm config (with ssm_cfg); got keys {keys}")


def load_config(checkpoint_dir: str | Path) -> tuple[Mamba2Config, str]:
    """Read `config.json` from a checkpoint directory. Returns (config, format)."""
    path = Path(checkpoint_dir) / "config.json"
    if probe(path, "a config.json", ConfigError) is None:
        raise ConfigError(f"checkpoint: expected {quote_path(path)} to exist, it does not")
    raw = read_json_object(path, "config.json")
    try:
        fmt = detect_format(raw)
        cfg = config_from_transformers(raw) if fmt == "transformers" else config_from_mamba_ssm(raw)
    except ConfigError as e:
        raise type(e)(f"{quote_path(path)}: {e}") from None
    return cfg, fmt
