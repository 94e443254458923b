"""A strict, torch-free safetensors reader (and writer, for fixtures and tests).

Why our own: numpy has no bfloat16 (ml_dtypes does), and a verification tool must reject a
truncated or edited file with a message that names the file and the problem, never crash deep
inside a parser or read garbage. Format: 8-byte little-endian header length, a JSON header
{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the raw bytes.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from equiv.errors import CheckpointError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(bool),
}
_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's own limit


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of one file, validated: header bounds, dtypes, shapes x itemsize == byte ranges,
    ranges inside the file, contiguous and non-overlapping."""
    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None

    def bad(msg):
        return CheckpointError(f"{path}: corrupt safetensors file: {msg}")

    if len(blob) < 8:
        raise bad(f"expected at least 8 bytes for the header length, got {len(blob)}")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > MAX_HEADER or 8 + n > len(blob):
        raise bad(f"header length {n} exceeds the file ({len(blob)} bytes): truncated or not safetensors")
    try:
        header = json.loads(blob[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad(f"header: expected a JSON object, got {type(header).__name__}")
    data = memoryview(blob)[8 + n:]
    header.pop("__metadata__", None)
    out, spans = {}, []
    for name, info in header.items():
        if not isinstance(info, dict) or {"dtype", "shape", "data_offsets"} - set(info):
            raise bad(f"tensor {name!r}: expected keys dtype, shape, data_offsets, got {info!r}"[:300])
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPES:
            raise bad(f"tensor {name!r}: unsupported dtype {dtype!r} (expected one of {sorted(DTYPES)})")
        if (not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                   for s in shape)):
            raise bad(f"tensor {name!r}: expected a list of non-negative ints as shape, got {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise bad(f"tensor {name!r}: expected data_offsets [begin, end], got {offsets!r}")
        begin, end = offsets
        want = math.prod(shape) * DTYPES[dtype].itemsize
        if not (0 <= begin <= end <= len(data)):
            raise bad(f"tensor {name!r}: byte range [{begin}, {end}) outside the {len(data)}-byte data "
                      "section (truncated file?)")
        if end - begin != want:
            raise bad(f"tensor {name!r}: shape {shape} x {dtype} needs {want} bytes, the header gives {end - begin}")
        spans.append((begin, end, name))
        out[name] = np.frombuffer(data[begin:end], dtype=DTYPES[dtype]).reshape(shape).copy()
    spans.sort()
    for (_, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise bad(f"tensors {n0!r} and {n1!r} overlap")
    return out


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
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
