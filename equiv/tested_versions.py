"""The versions ssm-equiv is tested with (equiv/tested_versions.toml, shipped in the package), the
versions installed here, and which of those are outside the tested set.

Read with importlib.metadata only: nothing here imports torch or transformers, so golden mode and
an installed wheel can report versions without them.
"""

from __future__ import annotations

import importlib.metadata
import platform
import tomllib
from functools import cache
from pathlib import Path

from equiv.io.bounded import read_text

TOML = Path(__file__).with_name("tested_versions.toml")

VERDICT_PACKAGES = ("transformers", "torch", "mamba-ssm", "jax", "jaxlib", "numpy", "ml-dtypes",
                    "safetensors", "hypothesis", "kernels", "mamba2-jax", "mamba3-jax", "flax")
"""The distributions whose version can change a verdict; every report records them."""


@cache
def tested() -> dict:
    """{"transformers": {"supported": [...], "dependencies": {...}}, "pins": {...}, "tools": {...}}."""
    return tomllib.loads(read_text(TOML, "the tested-versions file", 1 << 20))


def supported_transformers() -> list[str]:
    return list(tested()["transformers"]["supported"])


def transformers_range() -> str:
    """'5.23.0 to 5.25.0' (or the single version)."""
    versions = supported_transformers()
    return versions[0] if len(versions) == 1 else f"{versions[0]} to {versions[-1]}"


def pins(transformers: str | None = None) -> dict[str, str]:
    """Distribution -> exact version for pip constraints: the verdict pins, the tools, transformers
    (`transformers`, default the newest supported; "" leaves it and its dependencies free)."""
    t = tested()
    out = dict(t["pins"]) | dict(t.get("tools", {}))
    if transformers != "":
        out["transformers"] = transformers or supported_transformers()[-1]
        out |= dict(t["transformers"].get("dependencies", {}))
    return out


def constraints(transformers: str | None = None) -> str:
    """pip constraints text for `pins(transformers)`."""
    return "".join(f"{name}=={version}\n" for name, version in sorted(pins(transformers).items()))


def _installed(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _release(version: str) -> str:
    """'2.13.0+cpu' -> '2.13.0': a local build tag is the same release."""
    return version.split("+", 1)[0]


def installed_versions() -> dict[str, str | None]:
    """Python and every verdict package's installed version (None: not installed)."""
    return {"python": platform.python_version(), **{d: _installed(d) for d in VERDICT_PACKAGES}}


def untested(versions: dict[str, str | None] | None = None) -> list[str]:
    """One phrase per installed package outside the tested set, e.g. 'transformers 5.26.0 (tested:
    5.23.0 to 5.25.0)'. Packages not installed are not listed (a run that needs one fails on its own)."""
    versions = installed_versions() if versions is None else versions
    allowed = {name: [version] for name, version in pins().items()}
    allowed["transformers"] = supported_transformers()
    out = []
    for dist, version in sorted(versions.items()):
        key = dist.replace("_", "-")
        if version is None or key not in allowed:
            continue
        if _release(version) not in allowed[key]:
            want = transformers_range() if key == "transformers" else allowed[key][0]
            out.append(f"{key} {version} (tested: {want})")
    return out


def untested_note(versions: dict[str, str | None] | None = None) -> str | None:
    """A report note when something outside the tested set ran, else None."""
    off = untested(versions)
    if not off:
        return None
    return ("outside the tested versions: " + ", ".join(off) + "; the verdict may reflect a changed "
            "library (the tested set is in equiv/tested_versions.toml; `nox -s references` checks a new "
            "transformers)")
