"""A Mamba-3 checkpoint's config.json, read strictly. One dialect: mamba_ssm's `MambaLMHeadModel`
config with `ssm_cfg.layer` "Mamba3" (docs/mamba3-layout.md)."""

from __future__ import annotations

from pathlib import Path

from equiv.errors import ConfigError
from equiv.io.json_reader import read_json_object, show
from equiv.mamba3.config import Mamba3Config
from equiv.mamba3.config_mamba_ssm import config_from_mamba_ssm


def detect_format(raw: dict) -> str:
    """Only mamba_ssm's layout is read; a config with a model_type (a transformers-style or
    mamba3-jax checkpoint) is refused by name rather than guessed at."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config.json: expected a JSON object, got {show(raw)}")
    ssm = raw.get("ssm_cfg")
    if "model_type" not in raw and isinstance(ssm, dict) and ssm.get("layer") == "Mamba3":
        return "mamba_ssm"
    got = (f"model_type {show(raw['model_type'])}" if "model_type" in raw
           else f"ssm_cfg.layer {show(ssm.get('layer'))}" if isinstance(ssm, dict)
           else f"keys {sorted(map(str, raw))[:12]}")
    raise ConfigError("config.json: expected mamba_ssm's MambaLMHeadModel layout with ssm_cfg.layer "
                      f"'Mamba3' and no model_type (docs/mamba3-layout.md), got {got}")


def load_config(checkpoint_dir: str | Path) -> tuple[Mamba3Config, str]:
    """Read `config.json` from a checkpoint directory. Returns (config, format)."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"checkpoint: expected {path} to exist, it does not")
    raw = read_json_object(path, "config.json")
    try:
        fmt = detect_format(raw)
        cfg = config_from_mamba_ssm(raw)
    except ConfigError as e:
        raise type(e)(f"{path}: {e}") from None
    return cfg, fmt
