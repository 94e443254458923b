"""Validation of inputs shared by the harness and every port: token ids (JAX clamps out-of-range
gathers silently where torch raises, so ports check on the host before anything is traced) and the
checkpoint directory a command is given."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import numpy as np

from equiv.errors import CheckpointError, ShapeError, TokenRangeError, clip, quote_path
from equiv.io.bounded import describe_mode, describe_os_error


def _as_array(x, name: str) -> np.ndarray:
    """np.asarray, with numpy's own failures (ragged nesting, unconvertible objects) as ShapeError."""
    try:
        return np.asarray(x)
    except (ValueError, TypeError, OverflowError) as e:
        first = str(e).split(".")[0][:100] if str(e) else type(e).__name__
        raise ShapeError(f"{name}: expected a rectangular (b, l) array, got {type(x).__name__} "
                         f"({first})") from None


def check_tokens(ids, vocab_size: int, mask=None, name: str = "ids") -> tuple[np.ndarray, np.ndarray | None]:
    """ids (b, l) integers in [0, vocab_size); mask None or (b, l) of 0/1. Returns int32 / int32."""
    ids = _as_array(ids, name)
    if ids.size == 0:
        raise TokenRangeError(f"{name}: expected at least one token per sequence, got shape {ids.shape}")
    if ids.ndim != 2:
        raise ShapeError(f"{name}: expected shape (b, l), got {ids.shape}")
    if ids.dtype == bool or not np.issubdtype(ids.dtype, np.integer):
        raise TokenRangeError(f"{name}: expected integer token ids, got dtype {ids.dtype}")
    # numpy >= 2 compares with out-of-range Python ints by value (no wrap for int8 or uint64 ids)
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        pos = tuple(int(i) for i in np.argwhere(bad)[0])
        raise TokenRangeError(f"{name}: expected token ids in [0, {vocab_size}) (vocab_size), got "
                              f"{int(ids[pos])} at position {list(pos)} ({int(bad.sum())} out of range)")
    if mask is not None:
        mask = _as_array(mask, "mask")
        if mask.shape != ids.shape:
            raise ShapeError(f"mask: expected shape (b, l) = {ids.shape} like {name}, got {mask.shape}")
        if mask.dtype.kind not in "biuf":
            raise ShapeError(f"mask: expected 0/1 numbers or booleans, got dtype {mask.dtype}")
        if not np.isin(mask, (0, 1)).all():
            odd = [v.item() for v in np.unique(mask[~np.isin(mask, (0, 1))])[:5]]
            raise ShapeError(f"mask: expected only 0 (padding) and 1 (token) values, got {odd}")
        empty = np.flatnonzero(mask.sum(axis=1) == 0)
        if empty.size:
            raise TokenRangeError(f"mask: expected at least one unmasked token per sequence, got none in "
                                  f"rows {empty[:8].tolist()}")
        mask = mask.astype(np.int32)
    return ids.astype(np.int32), mask


def require_checkpoint_dir(path) -> Path:
    """`path` if it is a directory, else one CheckpointError line saying what it is instead: no such
    path, a file, a FIFO, a symlink loop, a path too long, ..."""
    if not isinstance(path, str | os.PathLike) or str(path) == "":
        raise CheckpointError(f"checkpoint: expected a directory path, got {clip(repr(path), 40)}")
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        what = "no such path" if e.errno == errno.ENOENT and not os.path.lexists(path) else (
            describe_os_error(e, path))
        raise CheckpointError(f"checkpoint: expected a directory, got {quote_path(path)} ({what})") from None
    except ValueError:
        raise CheckpointError(f"checkpoint: expected a directory, got {quote_path(path)} (a path with a NUL "
                              "byte)") from None
    if not stat.S_ISDIR(mode):
        what = "a file" if stat.S_ISREG(mode) else describe_mode(mode)
        raise CheckpointError(f"checkpoint: expected a directory, got {quote_path(path)} ({what})")
    return Path(path)
