"""The PyTorch side of the Mamba-1 family (transformers `MambaForCausalLM` and `FalconMambaForCausalLM`):
the reference runner with its taps, the code-path record, the tiny fixtures and the trained byte model."""
