"""A checkpoint's tensors read one at a time, for models bigger than memory (equiv/stream).

`TensorIndex` reads only the safetensors headers at first (single file or sharded through
`model.safetensors.index.json`, chosen in transformers' order and cross-checked like a whole read:
equiv/io/checkpoint_files.py), so it knows every tensor's file, dtype, shape and byte range before
any tensor memory is allocated. `read(names)` then reads just those tensors, each straight into an
array of exactly the size its header declares (validated against the file when the header was read,
and the file's size checked again at every read: a file that changed since is refused, never read
past). Nothing is memory-mapped: a mapped page counts as resident while it is mapped, and a file
truncated under a mapping turns a read into SIGBUS.

Family-agnostic: which tensors belong to which layer is the family's business
(equiv/<family>/layer_stream.py).
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import numpy as np

from equiv.errors import CheckpointError, quote, quote_path
from equiv.io.bounded import describe_os_error, open_regular, parse_json
from equiv.io.checkpoint_files import _layout, _read_sharded
from equiv.io.safetensors_io import MAX_HEADER, _Corrupt, _tensor_specs, _unique_keys, read_safetensors


class TensorSpec:
    """Where one tensor lies: its file, dtype, shape and absolute byte range."""

    __slots__ = ("path", "dtype", "shape", "begin", "end", "file_size")

    def __init__(self, path: Path, dtype: np.dtype, shape: tuple, begin: int, end: int, file_size: int):
        self.path, self.dtype, self.shape = path, dtype, shape
        self.begin, self.end, self.file_size = begin, end, file_size

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def placeholder(self) -> np.ndarray:
        """An array of this shape and dtype that holds no memory (every stride 0): for checks that
        look at shapes and dtypes only."""
        return np.lib.stride_tricks.as_strided(np.zeros(1, self.dtype), self.shape, (0,) * len(self.shape))


def read_header(path: Path) -> dict[str, TensorSpec]:
    """A safetensors file's tensors as specs, from its header alone, validated as a whole read
    validates it (equiv/io/safetensors_io.py): every byte range inside the file, matching its shape
    and dtype, the ranges tiling the data section."""
    where = f"{quote_path(path)}: corrupt safetensors file"
    with open_regular(path, "a safetensors file", CheckpointError) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise CheckpointError(f"{where}: expected at least 8 bytes for the header length, got {size}")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{where}: expected a header length within the file ({size} bytes) and "
                                      f"the {MAX_HEADER}-byte limit, got {n}: truncated or not safetensors")
            blob = f.read(n)
        except OSError as e:
            raise CheckpointError(f"{quote_path(path)}: expected a readable safetensors file, got "
                                  f"{describe_os_error(e)}") from None
    if len(blob) != n:
        raise CheckpointError(f"{where}: expected a {n}-byte header, read {len(blob)}")
    try:
        header = parse_json(blob, where, "a JSON header", CheckpointError, object_pairs_hook=_unique_keys)
        specs = _tensor_specs(header, size - 8 - n)
    except _Corrupt as e:
        raise CheckpointError(f"{where}: {e}") from None
    return {name: TensorSpec(path, dtype, shape, 8 + n + begin, 8 + n + end, size)
            for name, dtype, shape, begin, end in specs}


class TensorIndex:
    """Every tensor of a checkpoint directory, located from the headers; read on demand.

    Only safetensors layouts stream: a `pytorch_model.bin` is a pickle, which torch loads whole.
    `read` keeps the last group it read (one layer), so the sides of one process that load the same
    layer in turn (port, reference, oracle) read it from disk once."""

    def __init__(self, checkpoint_dir: str | Path):
        self.checkpoint_dir = Path(checkpoint_dir)
        path, reader, sharded = _layout(self.checkpoint_dir)
        if reader is not read_safetensors:
            raise CheckpointError(f"{quote_path(path)}: expected safetensors weights to read layer by layer, "
                                  "got a torch pickle, which loads only whole: convert it to safetensors")
        self.specs: dict[str, TensorSpec] = _read_sharded(path, read_header) if sharded else read_header(path)
        self.source = path.name
        self._last: tuple[tuple[str, ...], dict[str, np.ndarray]] | None = None

    def __contains__(self, name: str) -> bool:
        return name in self.specs

    def names(self) -> list[str]:
        return list(self.specs)

    def placeholders(self) -> dict[str, np.ndarray]:
        """Every tensor as a memory-free array of its shape and dtype (TensorSpec.placeholder)."""
        out = {}
        for name, spec in self.specs.items():
            try:  # numpy refuses e.g. (0, 2**62): empty, yet "too big"
                out[name] = spec.placeholder()
            except ValueError as e:
                raise CheckpointError(f"{quote_path(spec.path)}: tensor {quote(name)}: expected a shape "
                                      f"numpy can hold, got {list(spec.shape)} ({e})") from None
        return out

    def nbytes(self, names=None, itemsize: int | None = None) -> int:
        """Bytes of these tensors (default: all) as stored, or at `itemsize` bytes per element."""
        specs = [self.specs[n] for n in (self.specs if names is None else names)]
        return sum(s.nbytes if itemsize is None else s.size * itemsize for s in specs)

    def read(self, names) -> dict[str, np.ndarray]:
        """These tensors (read-only arrays), read one by one; the previous group is dropped first
        unless it is the same group again (in any order)."""
        key = tuple(sorted(set(names)))
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        self._last = None  # free the previous layer before allocating the next
        out = {name: self.read_one(name) for name in key}
        self._last = (key, out)
        return out

    def forget(self) -> None:
        """Drop the kept group."""
        self._last = None

    def read_one(self, name: str) -> np.ndarray:
        """One tensor: exactly its declared bytes, from a file still the size its header was read at."""
        spec = self.specs.get(name)
        if spec is None:
            raise CheckpointError(f"{quote_path(self.checkpoint_dir)}: expected a tensor {quote(name)} in "
                                  f"{self.source}, it has none")
        with open_regular(spec.path, "a safetensors file", CheckpointError) as f:
            try:
                size = os.fstat(f.fileno()).st_size
                if size != spec.file_size:
                    raise CheckpointError(f"{quote_path(spec.path)}: expected {spec.file_size} bytes as when "
                                          f"its header was read, got {size}: the file changed during the run")
                arr = np.empty(spec.shape, spec.dtype)  # the declared size, checked inside the file
                f.seek(spec.begin)
                got = f.readinto(arr.reshape(-1).view(np.uint8))
            except OSError as e:
                raise CheckpointError(f"{quote_path(spec.path)}: expected a readable safetensors file, got "
                                      f"{describe_os_error(e)}") from None
        if got != spec.nbytes:
            raise CheckpointError(f"{quote_path(spec.path)}: tensor {quote(name)}: expected {spec.nbytes} "
                                  f"bytes, read {got}")
        arr.flags.writeable = False  # shared by the sides that read the same group
        return arr
