"""Test-wide configuration: strict JAX numerics and the hypothesis profiles.

Profiles (choose with SSM_EQUIV_HYPOTHESIS_PROFILE, default `ci`):

- `ci`: derandomized (the same examples every run, so CI is reproducible), no deadline (the first
  example of each jit bucket pays XLA's compile), no example database (nothing written in CI).
  30 examples per property: the SSD property and reference suites have 11 property tests, so a
  run draws 330 examples.
- `thorough`: 10x the examples (3300 across the SSD suites), random, with the example database,
  for a nightly job or before a release: `SSM_EQUIV_HYPOTHESIS_PROFILE=thorough pytest -n 2`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import jax
from hypothesis import HealthCheck, settings

# Equinox-style strictness: implicit rank promotion hides broadcasting bugs,
# and float32 verification must not silently run reduced-precision matmuls.
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")

# XLA's compile dominates these tests' time (the SSD suites compile ~30 small executables, about a
# second each on this machine). A persistent compilation cache shares them between xdist workers
# and across runs; results are unaffected (entries are keyed by the program, the compile options
# and the jax/XLA versions). SSM_EQUIV_JAX_CACHE_DIR picks the directory ("" turns it off). The size
# limit turns on jax's file lock around reads and writes, which concurrent workers need.
_DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax-compilation-cache"
_CACHE_DIR = os.environ.get("SSM_EQUIV_JAX_CACHE_DIR", str(_DEFAULT_CACHE))
if _CACHE_DIR and importlib.util.find_spec("filelock") is not None:
    jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_compilation_cache_max_size", 512 * 2**20)

CI_EXAMPLES = 30

settings.register_profile(
    "ci", max_examples=CI_EXAMPLES, deadline=None, derandomize=True, database=None,
    print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "thorough", max_examples=10 * CI_EXAMPLES, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("SSM_EQUIV_HYPOTHESIS_PROFILE", "ci"))
