"""The Mamba-3 family's torch side: mamba_ssm's Mamba3 in a language model, its runner, fixtures."""
