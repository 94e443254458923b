"""A checkpoint's config.json: detect its dialect (transformers or mamba_ssm) and read it strictly."""

from __future__ import annotations

from pathlib import Path

from equiv.errors import ConfigError
from equiv.io.json_reader import read_json_object, show
from equiv.mamba1.config import MODEL_TYPES, Mamba1Config
from equiv.mamba1.config_mamba_ssm import config_from_mamba_ssm
from equiv.mamba1.config_transformers import config_from_transformers


def detect_format(raw: dict) -> str:
    """model_type decides first: hub conversions (state-spaces/mamba-*-hf) are transformers
    checkpoints that still carry mamba_ssm's ssm_cfg and n_layer."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config.json: expected a JSON object, got {show(raw)}")
    if "model_type" in raw or "num_hidden_layers" in raw:
        return "transformers"
    if "ssm_cfg" in raw or "n_layer" in raw:
        return "mamba_ssm"
    raise ConfigError(f"config.json: expected a transformers Mamba config (model_type one of {MODEL_TYPES}) "
                      f"or a mamba_ssm config (with ssm_cfg); got keys {sorted(map(str, raw))[:12]}")


def load_config(checkpoint_dir: str | Path) -> tuple[Mamba1Config, str]:
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
