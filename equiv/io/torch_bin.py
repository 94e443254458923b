"""A `pytorch_model.bin` (a pickle in torch's zip archive) read without trusting it.

Two things torch.load does not bound are checked first, on the archive's own directory:

* memory: torch.load inflates a record before looking at it, so a 3.7 MB file holding one
  deflate-compressed 3 GiB record costs 3 GiB. torch.save writes every record stored
  (uncompressed), so a compressed record is refused, and so is a total uncompressed size beyond the
  archive's own size plus a small overhead (stored records cannot hold more than the file; more
  means records overlap);
* code: a pickle can call any function while it loads. torch.load(weights_only=True) builds only
  tensors and containers and refuses every other global; the argument is passed explicitly, as
  TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD only overrides a default. A bare pickle (no zip: torch's
  pre-1.6 format, or not torch at all) is never handed to torch: its opcodes are scanned (nothing
  runs), a global outside torch's is refused as code, anything else as a format to re-save.

The file is opened once, through the bounded reader, and that very handle is checked and loaded.
"""

from __future__ import annotations

import os
import pickletools
import re
import warnings
import zipfile

import numpy as np

from equiv.errors import CheckpointError, UnsafeCheckpointError, clip, quote, quote_path
from equiv.io.bounded import open_regular

ARCHIVE_OVERHEAD = 1 << 16
"""Bytes a stored archive's records may add up to beyond the file's size (none in a well-formed
archive: stored records lie inside the file; the slack only forgives an odd writer)."""

_SAFE_GLOBAL_PREFIXES = ("torch.", "torch._utils.", "collections.OrderedDict", "_codecs.encode")


def check_archive(f, path, size: int) -> None:
    """Refuse a torch zip archive whose records are compressed or claim more bytes than the file."""
    try:
        infos = zipfile.ZipFile(f).infolist()
    except Exception as e:  # noqa: BLE001 - BadZipFile, struct.error, EOFError, NotImplementedError...
        raise CheckpointError(f"{quote_path(path)}: expected torch.save's zip archive, its directory is "
                              f"unreadable, truncated or damaged ({type(e).__name__}: "
                              f"{clip(str(e), 60)})") from None
    total = 0
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{quote_path(path)}: expected stored (uncompressed) records, as "
                                  f"torch.save writes them, got record {quote(info.filename)} compressed "
                                  f"(method {info.compress_type}) to {info.compress_size} bytes from "
                                  f"{info.file_size}: refused before inflating it")
        if info.file_size != info.compress_size:
            raise CheckpointError(f"{quote_path(path)}: expected stored record {quote(info.filename)} to "
                                  f"hold as many bytes as it stores, it declares {info.file_size} "
                                  f"uncompressed in {info.compress_size}")
        total += info.file_size
    if total > size + ARCHIVE_OVERHEAD:
        raise CheckpointError(f"{quote_path(path)}: expected records totalling at most the archive's "
                              f"{size} bytes (+{ARCHIVE_OVERHEAD}), they declare {total} bytes: "
                              "overlapping records, refused before reading them")


def _bare_pickle_globals(blob: bytes) -> list[str]:
    """The globals a bare pickle names, from its opcodes (pickletools parses; nothing runs). The
    operands of a STACK_GLOBAL are the two strings pushed last."""
    names, strings = [], []
    for op, arg, _ in pickletools.genops(blob):
        if op.name in ("GLOBAL", "INST"):
            names.append(str(arg).replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            names.append(".".join(strings[-2:]))
        elif isinstance(arg, str):
            strings.append(arg)
    return names


def _refuse_bare_pickle(f, path, size: int) -> None:
    blob = f.read(size + 1)
    try:
        found = _bare_pickle_globals(blob)
    except Exception as e:  # noqa: BLE001 - ValueError on an unknown opcode, truncated data...
        raise CheckpointError(f"{quote_path(path)}: expected torch.save's zip archive, got neither it nor "
                              f"a pickle ({type(e).__name__}: {clip(str(e), 60)})") from None
    unsafe = [g for g in found if not g.startswith(_SAFE_GLOBAL_PREFIXES)]
    if unsafe:
        raise UnsafeCheckpointError(f"{quote_path(path)}: expected a pickle of plain tensors, got one that "
                                    f"would run code: it calls GLOBAL {quote(unsafe[0])}; refused, "
                                    "nothing from it ran")
    raise CheckpointError(f"{quote_path(path)}: expected torch.save's zip archive (torch >= 1.6), got a "
                          "bare pickle (torch's legacy format): re-save it with torch.save or as safetensors")


def _torch_refusal(path, e: Exception) -> CheckpointError:
    """torch's UnpicklingError as one line of our own: the global that was refused, never torch's
    advice to allow-list it."""
    text = str(e)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return UnsafeCheckpointError(f"{quote_path(path)}: expected a pickle of plain tensors, got one that "
                                     f"would run code: it calls GLOBAL {quote(found.group(1))}; refused "
                                     "(torch.load with weights_only=True ran nothing)")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    detail = next((ln for ln in lines if ln.startswith("Unsupported")), "")
    return CheckpointError(f"{quote_path(path)}: expected a pickle of plain tensors, torch.load(weights_only="
                           f"True) refused it{': ' + clip(detail, 60) if detail else ''}")


def read_torch_bin(path) -> dict[str, np.ndarray]:
    """A pickle checkpoint's tensors as numpy arrays, through the checks of this module's docstring."""
    with open_regular(path, "a torch checkpoint", CheckpointError) as f:
        size = os.fstat(f.fileno()).st_size
        zipped = f.read(2) == b"PK" or zipfile.is_zipfile(f)  # a damaged archive still starts with PK
        f.seek(0)
        if not zipped:
            _refuse_bare_pickle(f, path, size)
        check_archive(f, path, size)
        f.seek(0)
        try:  # only now: a refused file never costs torch's import
            import pickle

            import torch
        except ImportError:
            raise CheckpointError(f"{quote_path(path)}: expected torch to read a .bin checkpoint (pip "
                                  "install torch); prefer safetensors, which needs nothing") from None
        try:
            with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": we report the outcome
                warnings.simplefilter("ignore", UserWarning)
                state = torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise _torch_refusal(path, e) from None
        except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, EOFError, zipfile errors...
            first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{quote_path(path)}: expected a torch checkpoint, torch.load(weights_only="
                                  f"True) failed: {clip(first, 80)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{quote_path(path)}: expected a flat state dict of tensors, got "
                              f"{type(state).__name__}")
    bad = [quote(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{quote_path(path)}: expected a flat state dict of str -> tensor, got other "
                              f"entries: {', '.join(bad[:8])}")
    out = {}
    for k, v in state.items():
        try:
            v = v.detach().cpu()
            out[k] = (v.float() if v.dtype == torch.bfloat16 else v.resolve_conj().resolve_neg()).numpy()
        except (RuntimeError, TypeError) as e:  # sparse, quantized, float8: no numpy equivalent
            raise CheckpointError(f"{quote_path(path)}: tensor {quote(k)}: expected a dense tensor numpy can "
                                  f"hold, got {v.dtype}, {v.layout}: {clip(str(e), 80)}") from None
    return out
