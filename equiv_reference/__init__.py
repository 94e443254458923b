"""The PyTorch side of ssm-equiv: reference runners, pure-torch references and float64 oracles.

Modules here may import torch at import time (the `equiv` package never does). Each module is one
concern: `mamba_ssm_refs` loads mamba_ssm's pure-torch references without its CUDA extension,
`ssd_oracles` wraps them (and transformers' chunk scan, and a float64 sequential recurrence) in
`equiv.mamba2.ssd`'s argument layouts.
"""
