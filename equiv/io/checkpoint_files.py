"""A checkpoint directory's tensors, family-agnostic: the file layouts transformers reads, in its
order (`_get_resolved_checkpoint_files`: model.safetensors, its index, pytorch_model.bin, its index),
so a port reads the very tensors the reference reads. safetensors is preferred: a `.bin` is a
pickle, opened only through `torch.load(weights_only=True)`, which refuses to run code
(UnsafeCheckpointError). A sharded index is cross-checked against its shards."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from equiv.errors import CheckpointError, UnsafeCheckpointError
from equiv.io.json_reader import read_json_object
from equiv.io.safetensors_io import read_safetensors

MAX_INDEX_BYTES = 64 * 2**20  # a shard index is a name -> file table: kilobytes even for 100B models


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
        raise CheckpointError(f"{index}: expected a non-empty 'weight_map' object, got "
                              f"{type(weight_map).__name__}")
    bad = sorted({repr(v)[:80] for v in weight_map.values() if not _plain_name(v)})
    if bad:
        raise CheckpointError(f"{index}: expected shard names that are plain file names inside "
                              f"{index.parent}, got {', '.join(bad[:5])}")
    files = sorted(set(weight_map.values()))
    absent = [f for f in files if not (index.parent / f).is_file()]
    if absent:
        raise CheckpointError(f"{index}: expected the shards it names in {index.parent}, missing: "
                              f"{', '.join(absent[:8])}")
    tensors, where, problems = {}, {}, []
    for name in files:
        for key, arr in read_one(index.parent / name).items():
            if key in where:
                problems.append(f"{key}: expected in one shard, got two ({where[key]}, {name})")
            tensors[key], where[key] = arr, name
    problems += [f"{k}: expected in {weight_map[k]} (the index), got in {where[k]}"
                 for k in weight_map if k in where and where[k] != weight_map[k]]
    unlisted = sorted(set(where) - set(weight_map))
    if unlisted:
        problems.append(f"expected every shard key in weight_map, got {len(unlisted)} more: "
                        f"{', '.join(unlisted[:8])}")
    listed = sorted(set(weight_map) - set(where))
    if listed:
        problems.append(f"expected every weight_map key in a shard, {len(listed)} in none: "
                        f"{', '.join(listed[:8])}")
    if problems:
        raise CheckpointError(f"{index}: index and shards disagree: " + "; ".join(problems[:12]))
    return tensors


_LAYOUTS = (("model.safetensors", read_safetensors, False),
            ("model.safetensors.index.json", read_safetensors, True),
            ("pytorch_model.bin", None, False),
            ("pytorch_model.bin.index.json", None, True))


def read_tensors(checkpoint_dir: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory, from the first supported file layout present."""
    checkpoint_dir = Path(checkpoint_dir)
    for name, reader, sharded in _LAYOUTS:
        path = checkpoint_dir / name
        if path.exists() and not path.is_file():
            raise CheckpointError(f"{path}: expected a regular file, got a directory or special file")
        if path.is_file():
            reader = reader or _read_torch_bin
            return _read_sharded(path, reader) if sharded else reader(path)
    try:
        found = sorted(p.name for p in checkpoint_dir.iterdir())
    except OSError as e:
        found = [f"(cannot list: {e.strerror})"]
    raise CheckpointError(f"{checkpoint_dir}: expected one of {', '.join(n for n, _, _ in _LAYOUTS)}, "
                          f"found {found[:10]}")


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    """A pickle checkpoint, only through torch.load(weights_only=True): its restricted unpickler
    builds tensors and containers and refuses every other global, so no code from the file runs.
    The argument is passed explicitly: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD only overrides a default."""
    try:
        import pickle

        import torch
    except ImportError:
        raise CheckpointError(f"{path}: expected torch to read a .bin checkpoint (pip install torch); "
                              "prefer safetensors, which needs nothing") from None
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": we report the outcome ourselves
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), (lines or [""])[0])
        if "GLOBAL" in detail:  # the pickle calls or builds something other than tensors and containers
            raise UnsafeCheckpointError(f"{path}: expected a pickle of plain tensors, got one that would run "
                                        f"code; refused (torch.load with weights_only=True ran nothing): "
                                        f"{detail[:300]}") from None
        raise CheckpointError(f"{path}: expected a pickle of plain tensors, torch.load(weights_only=True) "
                              f"refused it: {detail[:300]}") from None
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, EOFError, zipfile errors...
        first = str(e).strip().splitlines()[0].split(". ")[0][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: expected a torch checkpoint, torch.load(weights_only=True) failed: "
                              f"{first}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a flat state dict of tensors, got {type(state).__name__}")
    bad = [repr(k)[:60] for k, v in state.items()
           if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: expected a flat state dict of str -> tensor, got other entries: "
                              f"{', '.join(bad[:8])}")
    out = {}
    for k, v in state.items():
        try:
            v = v.detach().cpu()
            out[k] = (v.float() if v.dtype == torch.bfloat16 else v.resolve_conj().resolve_neg()).numpy()
        except (RuntimeError, TypeError) as e:  # sparse, quantized, float8: no numpy equivalent
            raise CheckpointError(f"{path}: tensor {k!r}: expected a dense tensor numpy can hold, got "
                                  f"{v.dtype}, {v.layout}: "
                                  f"{str(e).splitlines()[0][:200]}") from None
    return out
