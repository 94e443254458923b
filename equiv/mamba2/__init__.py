"""The built-in pure-JAX Mamba-2 port: config, conversion, forward with taps, cached decode."""
