"""Adapters that present third-party JAX ports through the port protocol (equiv/ports.py)."""
