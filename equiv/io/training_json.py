"""A trained checkpoint's training.json (its recorded prompts and special ids), read bounded and
typed: it comes with the checkpoint, so it is as untrusted as config.json."""

from __future__ import annotations

from pathlib import Path

from equiv.errors import CheckpointError, quote_path
from equiv.io.bounded import probe, read_json_object_file

MAX_TRAINING_BYTES = 1 << 20
"""A training.json records a few prompts and ids: kilobytes. The limit also bounds the decode plan
built from its prompts (their count and lengths)."""
MAX_PROMPTS = 64


def read_training_json(checkpoint_dir: str | Path) -> dict | None:
    """{"prompts": [non-empty str, ...], "eos_id": int | None, "pad_id": int} or None when the
    checkpoint has no training.json; anything malformed is one CheckpointError line."""
    path = Path(checkpoint_dir) / "training.json"
    if probe(path, "a training.json", CheckpointError) is None:
        return None
    raw = read_json_object_file(path, "a training.json", MAX_TRAINING_BYTES, CheckpointError)
    prompts, eos, pad = raw.get("prompts"), raw.get("eos_id"), raw.get("pad_id", 0)
    problems = []
    if not (isinstance(prompts, list) and 0 < len(prompts) <= MAX_PROMPTS
            and all(isinstance(p, str) and p for p in prompts)):
        problems.append(f"prompts: expected a list of 1 to {MAX_PROMPTS} non-empty strings")
    if eos is not None and type(eos) is not int:
        problems.append("eos_id: expected an integer or null")
    if type(pad) is not int:
        problems.append("pad_id: expected an integer")
    if problems:
        raise CheckpointError(f"{quote_path(path)}: " + "; ".join(problems))
    return {"prompts": prompts, "eos_id": eos, "pad_id": pad}
