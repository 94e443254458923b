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

import os
from pathlib import Path

import jax
from hypothesis import HealthCheck, settings

from equiv import compile_cache

# Equinox-style strictness: implicit rank promotion hides broadcasting bugs,
# and float32 verification must not silently run reduced-precision matmuls.
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")

# XLA's compile dominates these tests' time (the SSD suites compile ~30 small executables, about a
# second each on this machine): the persistent compilation cache (equiv/compile_cache.py) shares
# them between xdist workers and across runs, in the repository's .pytest_cache unless
# SSM_EQUIV_JAX_CACHE_DIR says otherwise.
compile_cache.enable(Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax-compilation-cache")

CI_EXAMPLES = 30

settings.register_profile(
    "ci", max_examples=CI_EXAMPLES, deadline=None, derandomize=True, database=None,
    print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "thorough", max_examples=10 * CI_EXAMPLES, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("SSM_EQUIV_HYPOTHESIS_PROFILE", "ci"))
