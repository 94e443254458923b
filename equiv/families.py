"""Model families: everything specific to one SSM architecture, registered in one place.

A family lives in its own folders (`equiv/<family>/` for JAX, `equiv_reference/<family>/` for
torch) and describes itself with a `Family` in `equiv/<family>/family.py`. The harness (check,
diff, the pytest plugin, golden recording, reports) takes a family and knows no architecture: it
asks the family for its ports, its reference runners and its algorithm property suite. Everything
is named as a 'module:attr' string, imported only when used, so this registry imports no family
code, the JAX side never imports torch, and no package imports the other back.

Adding a family is one line in FAMILIES plus its folders (README, "Adding an SSM variant").
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

from equiv.errors import ConfigError, EquivError, quote, quote_path

FAMILIES: dict[str, str] = {
    "mamba2": "equiv.mamba2.family:FAMILY",
    "mamba1": "equiv.mamba1.family:FAMILY",
    "mamba3": "equiv.mamba3.family:FAMILY",
}


@dataclass(frozen=True)
class PropertySuite:
    """The algorithm's dual-form property suite, run in-process by the main job.

    `run`: 'module:attr' of run(references, examples_per_property=..., progress=...) -> dict (the
    schema of equiv.mamba2.ssd_properties.run_ssd_properties: verdict, detail, properties).
    `references` / `torch_free_references`: 'module:attr' of a zero-argument factory of the object
    that sets the budget (float32 counterparts and a float64 oracle): torch's in a live run, numpy's
    in golden mode."""

    title: str  # the summary row, e.g. "SSD duality"
    run: str
    references: str
    torch_free_references: str


@dataclass(frozen=True)
class Family:
    name: str  # registry key, e.g. "mamba2"
    title: str  # for people, e.g. "Mamba-2"
    model_types: tuple[str, ...]  # transformers config.json `model_type` values it reads
    mamba_ssm_layers: tuple[str, ...]  # mamba_ssm config.json (no model_type): `ssm_cfg.layer` values
    ports: dict[str, str]  # port name -> 'module:attr' of a Port; "builtin" is the project's own
    references: dict[str, str]  # name -> 'module:attr' of load(checkpoint_dir, dtype, *, threads, device)
    default_reference: str
    properties: PropertySuite
    fixture_builders: tuple[str, ...] = ()  # modules run as `python -m MODULE --out fixtures`
    trained_fixtures: dict[str, str] = field(default_factory=dict)  # fixture name -> its trainer module
    notes: dict[str, str] = field(default_factory=dict)
    # layer streaming (equiv/stream/protocol.py): "port" -> 'module:attr' of the built-in port's stage
    # factory, "reference" -> the default reference's (float64: the oracle); empty: in memory only
    streaming: dict[str, str] = field(default_factory=dict)
    # `equiv diff --mesh`: the module with shard(model, data, model_axis, port=) and
    # diff_against_unsharded(sharded, unsharded, oracle, ids, args, progress); empty: no sharded port
    sharding: str = ""
    # references that need hardware CI lacks (a GPU's kernels), replayed from recordings: name -> the
    # rounding the reference really computes at ("float32", or "bfloat16" for kernels that round their
    # inputs so). Where fixtures/golden/<fixture>/<name>-float32.* exists, the main job also checks
    # "<fixture>@<name>" against it, unpadded (such references take no attention mask).
    recorded_references: dict[str, str] = field(default_factory=dict)


class UnknownFamily(ConfigError):
    """A checkpoint no registered family reads."""


def import_attr(target: str, what: str):
    """'module:attr' -> the object; one EquivError line naming `what` if it cannot be imported."""
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise EquivError(f"{what}: cannot import {module_name!r} ({e})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise EquivError(f"{what}: module {module_name!r} has no attribute {attr!r}") from None


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise UnknownFamily(f"family: expected one of {sorted(FAMILIES)}, got {name!r}")
    return import_attr(FAMILIES[name], f"family {name!r}")


def all_families() -> list[Family]:
    return [family(name) for name in FAMILIES]


def _known() -> str:
    parts = []
    for f in all_families():
        kinds = [f"model_type {', '.join(map(repr, f.model_types))}"]
        if f.mamba_ssm_layers:
            kinds.append(f"mamba_ssm ssm_cfg.layer {', '.join(map(repr, f.mamba_ssm_layers))}")
        parts.append(f"{f.name} ({'; '.join(kinds)})")
    return "; ".join(parts)


def family_for_config(raw) -> Family:
    """The family of a parsed config.json: by `model_type` (transformers), else by mamba_ssm's
    `ssm_cfg.layer` (absent means Mamba1, as mamba_ssm's create_block reads it)."""
    if not isinstance(raw, dict):
        got = {list: "a JSON list", type(None): "null", str: "a JSON string", bool: "a JSON boolean"}.get(
            type(raw), "a JSON number")
        raise UnknownFamily(f"config.json: expected a JSON object, got {got} (known families: {_known()})")
    if "model_type" in raw:
        found = [f for f in all_families() if raw["model_type"] in f.model_types]
        got = f"model_type {quote(raw['model_type'])}"
    elif isinstance(raw.get("ssm_cfg"), dict):
        layer = raw["ssm_cfg"].get("layer", "Mamba1")
        found = [f for f in all_families() if layer in f.mamba_ssm_layers]
        got = f"a mamba_ssm config with ssm_cfg.layer {quote(layer)}"
    else:
        found, got = [], "neither a model_type nor a mamba_ssm ssm_cfg"
    if not found:
        raise UnknownFamily(f"config.json: expected a checkpoint of a known family ({_known()}), got {got}")
    return found[0]


def family_of_checkpoint(checkpoint_dir: str | Path) -> Family:
    """The family of a checkpoint directory, from its config.json (read strictly and bounded)."""
    from equiv.io.json_reader import read_json_object

    path = Path(checkpoint_dir) / "config.json"
    raw = read_json_object(path, "config.json")
    try:
        return family_for_config(raw)
    except UnknownFamily as e:
        raise UnknownFamily(f"{quote_path(path)}: {str(e).removeprefix('config.json: ')}") from None
