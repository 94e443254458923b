"""JAX's persistent compilation cache for the main job and the tests.

XLA's compiles dominate a main-job run on a CPU (each fixture's shapes and each property suite's
forms compile afresh: about half of a 2-core run). The cache keeps the compiled executables on disk
between runs and shares them between worker processes; results are unaffected (entries are keyed by
the program, the compile options and the jax/XLA versions). SSM_EQUIV_JAX_CACHE_DIR picks the
directory ("" turns it off). The size limit turns on jax's file lock around reads and writes, which
concurrent workers need, so without the filelock package the cache stays off.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

ENV = "SSM_EQUIV_JAX_CACHE_DIR"
MAX_BYTES = 512 * 2**20


def default_dir() -> Path:
    """$XDG_CACHE_HOME/ssm-equiv/jax-compilation-cache (~/.cache when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ssm-equiv" / "jax-compilation-cache"


def enable(default: Path | None = None) -> str | None:
    """Turn the cache on in this process (a directory already configured, e.g. by the test suite,
    is kept); returns its directory, or None when it stays off."""
    import jax

    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    directory = os.environ.get(ENV, str(default or default_dir()))
    if not directory or importlib.util.find_spec("filelock") is None:
        return None

    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return directory
