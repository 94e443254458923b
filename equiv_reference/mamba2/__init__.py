"""The PyTorch side of the Mamba-2 family: transformers and mamba_ssm reference runners, the SSD
references, fixture builders, the budget calibration and the benchmarks."""
