"""A strict, torch-free safetensors reader (and writer, for fixtures and tests).

Why our own: numpy has no bfloat16 (ml_dtypes does), and a verification tool must reject a
truncated or edited file with a message that names the file and the problem, never crash deep
inside a parser or read garbage. Format: 8-byte little-endian header length, a JSON header
{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the raw bytes.

Validation mirrors the reference implementation (safetensors `Metadata::validate`, Rust): every
byte range matches its shape x dtype, the ranges tile the data section exactly (start at 0, no gap,
no overlap, end at the end of the file). It all happens on the header alone, before any tensor
memory is allocated, so a header claiming a gigantic shape costs nothing; the tensors are then read
straight into their arrays (no second copy of the file, no mmap that a concurrent truncation could
turn into SIGBUS).
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from equiv.errors import CheckpointError, DtypeError, quote, quote_path
from equiv.io.bounded import describe_os_error, open_regular, parse_json
from equiv.io.json_reader import show

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(bool),
}
_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's own limit
MAX_NDIM = 64  # numpy's


class _Corrupt(Exception):
    """Internal: a header problem, turned into a CheckpointError naming the file."""


def _unique_keys(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _Corrupt(f"expected each tensor name once in the header, got {quote(k)} twice")
        out[k] = v
    return out


def _is_int(v) -> bool:
    return type(v) is int  # JSON true/false are bools, and 3.0 is not an offset


def _tensor_specs(header, data_len: int) -> list[tuple[str, np.dtype, tuple, int, int]]:
    """(name, dtype, shape, begin, end) per tensor in file order, or _Corrupt."""
    if not isinstance(header, dict):
        raise _Corrupt(f"header: expected a JSON object, got {type(header).__name__}")
    meta = header.pop("__metadata__", None)
    if meta is not None and not isinstance(meta, dict):
        raise _Corrupt(f"__metadata__: expected an object, got {type(meta).__name__}")
    specs = []
    for key, info in header.items():
        name = quote(key)
        if not isinstance(info, dict) or {"dtype", "shape", "data_offsets"} - set(info):
            raise _Corrupt(f"tensor {name}: expected keys dtype, shape, data_offsets, got {show(info)}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise _Corrupt(f"tensor {name}: expected a dtype in {sorted(DTYPES)}, got {show(dtype)}")
        if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
            raise _Corrupt(f"tensor {name}: expected a shape of non-negative ints, got {show(shape)}")
        if len(shape) > MAX_NDIM:  # also keeps math.prod below from multiplying millions of big ints
            raise _Corrupt(f"tensor {name}: expected at most {MAX_NDIM} dimensions, got {len(shape)}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise _Corrupt(f"tensor {name}: expected data_offsets [begin, end], got {show(offsets)}")
        begin, end = offsets
        want = math.prod(shape) * DTYPES[dtype].itemsize
        if not 0 <= begin <= end <= data_len:
            raise _Corrupt(f"tensor {name}: expected a byte range inside the {data_len}-byte data section, "
                           f"got [{begin}, {end}) (truncated file?)")
        if end - begin != want:
            raise _Corrupt(f"tensor {name}: expected {want} bytes for shape {shape} x {dtype}, the header "
                           f"gives {end - begin}")
        specs.append((key, DTYPES[dtype], tuple(shape), begin, end))
    specs.sort(key=lambda s: (s[3], s[4]))
    at = 0
    for name, _, _, begin, end in specs:
        if begin != at:
            what = "overlaps the previous tensor" if begin < at else "leaves a gap"
            raise _Corrupt(f"tensor {quote(name)}: expected its bytes to start at {at}, got "
                           f"[{begin}, {end}), which {what}")
        at = end
    if at != data_len:
        raise _Corrupt(f"expected the tensors to fill the {data_len}-byte data section, they end at "
                       f"byte {at}")
    return specs


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of one file, validated first (see the module docstring); CheckpointError names the
    file and the problem. Opened through the bounded reader: a regular file only."""
    path = Path(path)
    where = f"{quote_path(path)}: corrupt safetensors file"

    def bad(msg):
        return CheckpointError(f"{where}: {msg}")

    with open_regular(path, "a safetensors file", CheckpointError) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise bad(f"expected at least 8 bytes for the header length, got {size}")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER or 8 + n > size:
                raise bad(f"expected a header length within the file ({size} bytes) and the "
                          f"{MAX_HEADER}-byte limit, got {n}: truncated or not safetensors")
            blob = f.read(n)
            if len(blob) != n:  # the file shrank under us
                raise bad(f"expected a {n}-byte header, read {len(blob)}")
            try:
                header = parse_json(blob, where, "a JSON header", CheckpointError,
                                    object_pairs_hook=_unique_keys)
                specs = _tensor_specs(header, size - 8 - n)
            except _Corrupt as e:
                raise bad(str(e)) from None
            out = {}
            for key, dtype, shape, begin, _ in specs:
                try:  # numpy refuses e.g. (0, 2**62): empty, yet "too big"; or there is no memory left
                    arr = np.empty(shape, dtype)
                except (ValueError, MemoryError) as e:
                    raise bad(f"tensor {quote(key)}: expected a shape numpy can allocate, got {list(shape)} "
                              f"({type(e).__name__}: {e})") from None
                f.seek(8 + n + begin)
                got = f.readinto(arr.reshape(-1).view(np.uint8))
                if got != arr.nbytes:  # the file shrank under us
                    raise bad(f"tensor {quote(key)}: expected {arr.nbytes} bytes, read {got}")
                out[key] = arr
            return out
        except OSError as e:
            raise CheckpointError(f"{quote_path(path)}: expected a readable safetensors file, got "
                                  f"{describe_os_error(e)}") from None


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        arr = np.asarray(tensors[name])
        arr = arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)  # keeps 0-d arrays 0-d
        if not isinstance(name, str) or arr.dtype not in _NAMES:
            raise DtypeError(f"write_safetensors: expected str names and dtypes in {sorted(_NAMES)}, "
                             f"got {name!r}: {arr.dtype}")
        raw = arr.tobytes()
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(hb)) + hb + b"".join(chunks))
