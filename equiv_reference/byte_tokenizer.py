"""Byte-level vocabulary for the trained fixture: ids 0..255 are the UTF-8 bytes themselves, then three
specials. No torch, no files: the vocabulary is this module, so a checkpoint's config.json only has to
record `vocab_size` and the special ids (written there by `equiv_reference.mamba2.train_byte_model`).
"""

from __future__ import annotations

import operator

from equiv.errors import TokenRangeError

N_BYTES = 256
BOS_ID = 256
EOS_ID = 257
PAD_ID = 258
# 259 ids in use; the embedding has 264 rows (next multiple of 8: the mamba_ssm convention
# `pad_vocab_size_multiple=8`, so the same weights load there without padding). Ids 259..263 are
# never produced by `encode` and `decode` rejects them.
N_IDS_USED = 259
VOCAB_SIZE = 264
SPECIAL_NAMES = {BOS_ID: "<bos>", EOS_ID: "<eos>", PAD_ID: "<pad>"}


def encode(text: str, *, add_bos: bool = False) -> list[int]:
    """str -> byte ids (UTF-8), optionally preceded by BOS."""
    ids = list(text.encode("utf-8"))
    return [BOS_ID, *ids] if add_bos else ids


def decode(ids: list[int], *, skip_specials: bool = True) -> str:
    """Byte ids -> str. Invalid UTF-8 (a continuation cut in half) becomes U+FFFD, never an exception.
    Specials are dropped, or written as their names with `skip_specials=False`."""
    try:  # numpy and torch integer scalars are fine, floats and bools are not
        ids = [_as_id(i) for i in ids]
    except TypeError:
        kinds = sorted({type(i).__name__ for i in ids})
        raise TokenRangeError(f"decode: expected integer ids, got elements of type {kinds}") from None
    bad = [i for i in ids if not 0 <= i < N_IDS_USED]
    if bad:
        raise TokenRangeError(f"decode: expected ids in [0, {N_IDS_USED}), got {bad[:8]}"
                              + (f" and {len(bad) - 8} more" if len(bad) > 8 else ""))
    out, run = [], bytearray()
    for i in ids:
        if i < N_BYTES:
            run.append(i)
            continue
        out.append(run.decode("utf-8", errors="replace"))
        run = bytearray()
        if not skip_specials:
            out.append(SPECIAL_NAMES[i])
    out.append(run.decode("utf-8", errors="replace"))
    return "".join(out)


def _as_id(value) -> int:
    if isinstance(value, bool):  # operator.index accepts bools; a bool here is a caller's bug
        raise TypeError("a bool is not a token id")
    return operator.index(value)
