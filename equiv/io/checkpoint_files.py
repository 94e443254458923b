"""A checkpoint directory's tensors, family-agnostic: the file layouts transformers reads, in its
order (`_get_resolved_checkpoint_files`: model.safetensors, its index, pytorch_model.bin, its index),
so a port reads the very tensors the reference reads. safetensors is preferred: a `.bin` is a
pickle, read by equiv/io/torch_bin.py (archive checked, then `torch.load(weights_only=True)`,
which refuses to run code). A sharded index is cross-checked against its shards.

`preflight` checks, with the same bounded reader, what a reference library will open in a
checkpoint directory with no limits of its own (transformers' from_pretrained reads config.json,
generation_config.json and the weights), so a FIFO, a device or a decompression bomb there is one
line before the library ever sees it."""

from __future__ import annotations

import itertools
import os
import stat
from pathlib import Path

import numpy as np

from equiv.errors import CheckpointError, bare_or_quoted, clip, quote, quote_path
from equiv.io.bounded import describe_mode, open_regular, probe, read_json
from equiv.io.json_reader import read_json_object
from equiv.io.safetensors_io import read_safetensors
from equiv.io.torch_bin import check_archive, read_torch_bin

MAX_INDEX_BYTES = 64 * 2**20  # a shard index is a name -> file table: kilobytes even for 100B models
GENERATION_CONFIG_BYTES = 1 << 20  # a generation_config.json is a few hundred bytes


def _plain_name(name) -> bool:
    """A shard name from an index must be a file directly inside the checkpoint directory: no
    separators, no '..', nothing absolute. (Symlinks are followed: the Hugging Face cache links
    snapshot files to blobs elsewhere; the index, not the file system, is the untrusted part.)"""
    return (isinstance(name, str) and 0 < len(name) <= 255 and not name.startswith(".")
            and not any(c in name for c in "/\\\0:"))


def _read_sharded(index: Path, read_one) -> dict[str, np.ndarray]:
    """A `*.index.json` {"weight_map": {key: shard file}} and the shards it names, cross-checked:
    every shard present, every key in the shard the index names, no key in two shards."""
    raw = read_json_object(index, "shard index", error=CheckpointError, max_bytes=MAX_INDEX_BYTES)
    weight_map = raw.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{quote_path(index)}: expected a non-empty 'weight_map' object, got "
                              f"{type(weight_map).__name__}")
    bad = sorted({quote(v) if isinstance(v, str) else clip(repr(v))
                  for v in weight_map.values() if not _plain_name(v)})
    if bad:
        raise CheckpointError(f"{quote_path(index)}: expected shard names that are plain file names inside "
                              f"{quote_path(index.parent)}, got {', '.join(bad[:5])}")
    files = sorted(set(weight_map.values()))
    absent = [bare_or_quoted(f) for f in files if _regular(index.parent / f, "a shard") is None]
    if absent:
        raise CheckpointError(f"{quote_path(index)}: expected the shards it names in "
                              f"{quote_path(index.parent)}, missing: {', '.join(absent[:8])}")
    tensors, where, problems = {}, {}, []
    for name in files:
        for key, arr in read_one(index.parent / name).items():
            if key in where:
                problems.append(f"{bare_or_quoted(key)}: expected in one shard, got two "
                                f"({bare_or_quoted(where[key])}, {bare_or_quoted(name)})")
            tensors[key], where[key] = arr, name
    problems += [f"{bare_or_quoted(k)}: expected in {bare_or_quoted(weight_map[k])} (the index), got in "
                 f"{bare_or_quoted(where[k])}"
                 for k in weight_map if k in where and where[k] != weight_map[k]]
    unlisted = sorted(set(where) - set(weight_map))
    if unlisted:
        problems.append(f"expected every shard key in weight_map, got {len(unlisted)} more: "
                        f"{', '.join(map(bare_or_quoted, unlisted[:8]))}")
    listed = sorted(set(weight_map) - set(where))
    if listed:
        problems.append(f"expected every weight_map key in a shard, {len(listed)} in none: "
                        f"{', '.join(map(bare_or_quoted, listed[:8]))}")
    if problems:
        raise CheckpointError(f"{quote_path(index)}: index and shards disagree: " + "; ".join(problems[:12]))
    return tensors


_LAYOUTS = (("model.safetensors", read_safetensors, False),
            ("model.safetensors.index.json", read_safetensors, True),
            ("pytorch_model.bin", read_torch_bin, False),
            ("pytorch_model.bin.index.json", read_torch_bin, True))


def _regular(path: Path, what: str) -> os.stat_result | None:
    """The stat of a regular file at `path`, None when nothing is there; anything else that is
    there (a directory, a FIFO, a symlink loop, a broken symlink) is a CheckpointError naming it."""
    st = probe(path, f"{what} (a regular file)", CheckpointError)
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{quote_path(path)}: expected {what} (a regular file), got "
                              f"{describe_mode(st.st_mode)}")
    return st


def _layout(checkpoint_dir: Path):
    """(path, reader, sharded) of the first tensor file layout present, in transformers' order."""
    for name, reader, sharded in _LAYOUTS:
        path = checkpoint_dir / name
        if _regular(path, "a weights file") is not None:
            return path, reader, sharded
    try:
        with os.scandir(checkpoint_dir) as entries:  # a listing for the message, never a huge one
            found = sorted(quote(e.name) for e in itertools.islice(entries, 200))
    except OSError as e:
        found = [f"(cannot list: {e.strerror})"]
    raise CheckpointError(f"{quote_path(checkpoint_dir)}: expected one of "
                          f"{', '.join(n for n, _, _ in _LAYOUTS)}, found [{', '.join(found[:10])}]")


def read_tensors(checkpoint_dir: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory, from the first supported file layout present."""
    path, reader, sharded = _layout(Path(checkpoint_dir))
    return _read_sharded(path, reader) if sharded else reader(path)


def _check_bin(path: Path) -> None:
    with open_regular(path, "a torch checkpoint", CheckpointError) as f:
        check_archive(f, path, os.fstat(f.fileno()).st_size)


def preflight(checkpoint_dir: str | Path) -> None:
    """Check what a reference library will open in `checkpoint_dir` before it opens it (module
    docstring): the JSON files read bounded and parsed, the weights files regular, a `.bin`'s
    archive within bounds. Contents are validated by whoever reads them; this bounds the reading."""
    checkpoint_dir = Path(checkpoint_dir)
    read_json_object(checkpoint_dir / "config.json", "config.json", CheckpointError)
    generation = checkpoint_dir / "generation_config.json"
    if _regular(generation, "a generation_config.json") is not None:
        read_json(generation, "a generation_config.json", GENERATION_CONFIG_BYTES, CheckpointError)
    path, _, sharded = _layout(checkpoint_dir)
    shards = [path]
    if sharded:
        raw = read_json_object(path, "shard index", error=CheckpointError, max_bytes=MAX_INDEX_BYTES)
        weight_map = raw.get("weight_map")
        names = set(weight_map.values()) if isinstance(weight_map, dict) else set()
        shards = [path.parent / n for n in sorted(names) if _plain_name(n)]
        for shard in shards:
            _regular(shard, "a shard")
    for shard in shards:
        if shard.suffix == ".bin" and shard.exists():
            _check_bin(shard)
