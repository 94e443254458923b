"""Validation of token inputs shared by every port: JAX clamps out-of-range gathers silently where
torch raises, so ports check on the host before anything is traced."""

from __future__ import annotations

import numpy as np

from equiv.errors import ShapeError, TokenRangeError


def check_tokens(ids, vocab_size: int, mask=None, name: str = "ids") -> tuple[np.ndarray, np.ndarray | None]:
    """ids (b, l) integers in [0, vocab_size); mask None or (b, l) of 0/1. Returns int32 / int32."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ShapeError(f"{name}: expected shape (b, l), got {ids.shape}")
    if ids.size == 0:
        raise TokenRangeError(f"{name}: expected at least one token per sequence, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise TokenRangeError(f"{name}: expected integer token ids, got dtype {ids.dtype}")
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        pos = tuple(int(i) for i in np.argwhere(bad)[0])
        raise TokenRangeError(f"{name}: expected token ids in [0, {vocab_size}) (vocab_size), got "
                              f"{int(ids[pos])} at position {list(pos)} ({int(bad.sum())} out of range)")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != ids.shape:
            raise ShapeError(f"mask: expected shape (b, l) = {ids.shape} like {name}, got {mask.shape}")
        if not np.isin(mask, (0, 1)).all():
            raise ShapeError("mask: expected only 0 (padding) and 1 (token) values")
        if (mask.sum(axis=1) == 0).any():
            raise TokenRangeError("mask: every sequence needs at least one unmasked token")
        mask = mask.astype(np.int32)
    return ids.astype(np.int32), mask
