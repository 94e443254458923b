"""Reference runners by name, for any family: what `equiv diff --reference NAME`, the main job and
the pytest plugin load. Each family lists its references (equiv/families.py); a runner provides
run(ids, mask) -> {tap: array}, step_logits, generate and provenance() (numpy in and out).

`load_reference(NAME, dir, "float64")` returns that reference's float64 oracle (each family says
what it is). A `module:attr` plug-in is any callable (checkpoint_dir, dtype) -> runner.
"""

from __future__ import annotations

from pathlib import Path

from equiv.errors import EquivError, first_line, one_line, quote
from equiv.families import Family, family_of_checkpoint, import_attr
from equiv.io.checkpoint_files import preflight
from equiv.plugins import PLUGIN_EXCEPTIONS

DTYPES = ("float32", "float64", "bfloat16")

DEFAULT_THREADS = 1
"""torch intra-op threads for the reference. Measured on the 2-core CI machine while other jobs
ran: a tiny-g2 decode step took 0.27 s with 2 threads and 7 ms with 1 (OpenMP workers spinning on
an oversubscribed box); the fixtures are far too small for threads to pay. Recorded in provenance."""

RUNNER_METHODS = ("run", "provenance")


class ReferenceUnavailable(EquivError):
    """The named reference cannot run here (unknown name, or it needs what this machine lacks)."""


def reference_names(fam: Family) -> list[str]:
    return list(fam.references)


def load_reference(name: str | None, checkpoint_dir: str | Path, dtype: str = "float32", *,
                   family: Family | None = None, threads: int | None = DEFAULT_THREADS, device: str = "cpu"):
    """The runner `name` (None: the family's default) of the checkpoint's family, in `dtype`
    (float64: the oracle). `threads` sets torch's intra-op threads (None leaves them alone)."""
    if dtype not in DTYPES:
        raise ReferenceUnavailable(f"reference dtype: expected one of {list(DTYPES)}, got {quote(dtype)}")
    if name is not None and ":" in name:
        return load_plugin(name, checkpoint_dir, dtype)
    fam = family or family_of_checkpoint(checkpoint_dir)
    name = name or fam.default_reference
    if name not in fam.references:
        raise ReferenceUnavailable(f"reference for {fam.title}: expected one of {reference_names(fam)} or "
                                   f"'module:attr', got {quote(name)}")
    preflight(checkpoint_dir)  # the library reads the directory with no limits: bound it first
    try:
        loader = import_attr(fam.references[name], f"reference {name!r}")
    except EquivError as e:
        raise ReferenceUnavailable(f"{e}; the references need torch: "
                                   "pip install 'ssm-equiv[reference]'") from None
    return loader(checkpoint_dir, dtype, threads=threads, device=device)


def load_plugin(spec: str, checkpoint_dir: str | Path, dtype: str):
    """`module:attr`, attr a callable (checkpoint_dir, dtype) -> runner; the call is wrapped and
    what comes back is checked, and so is every later call into the runner (equiv/plugins.py), so
    a broken plug-in is one line naming it, the call and what came."""
    from equiv.plugins import CheckedRunner, PluginError, call, member

    who = f"reference {quote(spec)}"
    try:
        factory = import_attr(spec, who)
    except EquivError as e:
        raise ReferenceUnavailable(one_line(str(e), 400)) from None
    except PLUGIN_EXCEPTIONS as e:  # importing runs the plug-in's module code
        raise ReferenceUnavailable(f"{who}: importing it raised {type(e).__name__}: "
                                   f"{first_line(e, 200)}") from None
    if not callable(factory):
        raise ReferenceUnavailable(f"{who}: expected a callable (checkpoint_dir, dtype) -> "
                                   f"runner, got {type(factory).__name__}")
    try:
        runner = call(who, f"calling it with ({quote(str(checkpoint_dir))}, {dtype!r})", factory,
                      Path(checkpoint_dir), dtype)
    except PluginError as e:
        raise ReferenceUnavailable(str(e)) from None
    missing = [m for m in RUNNER_METHODS if not callable(member(who, runner, m))]
    if missing:
        raise ReferenceUnavailable(f"{who}: expected a runner with methods "
                                   f"{list(RUNNER_METHODS)} (and step_logits, generate for the decode "
                                   f"match), got {type(runner).__name__} without {missing}")
    return CheckedRunner(who, runner)
