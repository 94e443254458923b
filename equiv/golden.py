"""Recorded reference outputs, so the main job runs where torch can't (a TPU CI, a minimal image).

`RecordingRunner` wraps a live reference runner and keeps every call's inputs and outputs;
`save_recording` writes them deterministically (sorted safetensors + JSON, no timestamps, so a
regeneration with the same versions is bit-identical). `GoldenRunner` replays them: the same
`run` / `step_logits` / `generate` / `provenance` interface, answering only inputs it has recorded
(anything else is an error, never a silent substitute).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from equiv.errors import EquivError, FixtureIntegrityError, quote, quote_path
from equiv.io.bounded import probe, read_json_object_file
from equiv.io.safetensors_io import read_safetensors, write_safetensors
from equiv.ports import GenerateResult


class GoldenMismatch(EquivError):
    """The golden file has no recording for these inputs (the check's inputs changed)."""


def call_key(method: str, *arrays, **scalars) -> str:
    """A stable key for a call: the method, every array's dtype/shape/bytes, and the scalars."""
    h = hashlib.sha256(method.encode())
    for a in arrays:
        if a is None:
            h.update(b"none")
        else:
            a = np.ascontiguousarray(np.asarray(a, np.int64))
            h.update(f"{a.shape}".encode() + a.tobytes())
    h.update(json.dumps(scalars, sort_keys=True).encode())
    return h.hexdigest()[:24]


class RecordingRunner:
    """Forwards to `inner` and records every answer."""

    def __init__(self, inner):
        self.inner = inner
        self.records: dict[str, dict[str, np.ndarray]] = {}

    def provenance(self) -> dict:
        return self.inner.provenance()

    def run(self, ids, mask=None):
        out = self.inner.run(ids, mask)
        self.records[call_key("run", ids, mask)] = {k: np.asarray(v) for k, v in out.items()}
        return out

    def logits(self, ids, mask=None):
        out = self.inner.run(ids, mask)["logits"]
        self.records[call_key("logits", ids, mask)] = {"logits": np.asarray(out)}
        return out

    def step_logits(self, ids, mask, prompt_len):
        out = self.inner.step_logits(ids, mask, prompt_len)
        self.records[call_key("step_logits", ids, mask, prompt_len=prompt_len)] = {"logits": np.asarray(out)}
        return out

    def generate(self, prompt, mask, max_new_tokens, eos_id=None):
        out = self.inner.generate(prompt, mask, max_new_tokens, eos_id)
        self.records[call_key("generate", prompt, mask, n=max_new_tokens, eos=eos_id)] = {
            "tokens": np.asarray(out.tokens, np.int64), "margins": np.asarray(out.margins, np.float32),
            "steps": np.asarray([out.steps], np.int64)}
        return out


def save_recording(recorder: RecordingRunner, path: Path) -> None:
    """<path>.safetensors (tensors named key/tap) + <path>.json (provenance, keys)."""
    tensors = {f"{key}/{name}": arr for key, outs in recorder.records.items() for name, arr in outs.items()}
    write_safetensors(path.with_suffix(".safetensors"), tensors)
    meta = {"schema": "ssm-equiv/golden", "schema_version": 1, "provenance": recorder.provenance(),
            "calls": {key: sorted(outs) for key, outs in sorted(recorder.records.items())}}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1, sort_keys=True, default=str) + "\n")


class GoldenRunner:
    """Replays a recording made by `save_recording`."""

    def __init__(self, path: Path):
        path = Path(path)
        meta_path, data_path = path.with_suffix(".json"), path.with_suffix(".safetensors")
        if probe(meta_path, "a golden recording", FixtureIntegrityError) is None or probe(
                data_path, "a golden recording", FixtureIntegrityError) is None:
            raise FixtureIntegrityError(f"golden recording {quote_path(path)}: expected {meta_path.name} and "
                                        f"{data_path.name}; regenerate with `nox -s fixtures`")
        meta = read_json_object_file(meta_path, "a golden recording's index", error=FixtureIntegrityError)
        calls = meta.get("calls")
        if not (isinstance(meta.get("provenance"), dict) and isinstance(calls, dict)
                and all(isinstance(v, list) and all(isinstance(n, str) for n in v) for v in calls.values())):
            raise FixtureIntegrityError(f"golden recording {quote_path(meta_path)}: expected a 'provenance' "
                                        "object and a 'calls' object of tap-name lists; regenerate with "
                                        "`nox -s fixtures`")
        self.meta = meta
        self.tensors = read_safetensors(data_path)
        self.path = path

    judged_precision: str | None = None  # set by a loader whose reference rounds coarser (equiv/check.py)
    regenerate: str | None = None  # how the recording is made again, when not `nox -s fixtures`

    def provenance(self) -> dict:
        extra = {k: v for k, v in (("judged_precision", self.judged_precision),
                                   ("regenerate", self.regenerate)) if v}
        return self.meta["provenance"] | extra | {"replayed_from": str(self.path)}

    def _get(self, key: str, what: str) -> dict[str, np.ndarray]:
        names = self.meta["calls"].get(key)
        if names is None:
            raise GoldenMismatch(f"golden recording {quote(self.path.name)}: no {what} recorded for these "
                                 "inputs; the check's inputs changed: regenerate with `nox -s fixtures`")
        absent = [n for n in names if f"{key}/{n}" not in self.tensors]
        if absent:
            raise FixtureIntegrityError(f"golden recording {quote(self.path.name)}: expected tensors "
                                        f"{key}/{{{', '.join(map(quote, absent[:3]))}}} in its safetensors, "
                                        "they are missing; regenerate with `nox -s fixtures`")
        return {n: self.tensors[f"{key}/{n}"] for n in names}

    def run(self, ids, mask=None):
        return self._get(call_key("run", ids, mask), "forward")

    def logits(self, ids, mask=None):
        return self._get(call_key("logits", ids, mask), "logits")["logits"]

    def step_logits(self, ids, mask, prompt_len):
        return self._get(call_key("step_logits", ids, mask, prompt_len=prompt_len), "decode")["logits"]

    def generate(self, prompt, mask, max_new_tokens, eos_id=None):
        rec = self._get(call_key("generate", prompt, mask, n=max_new_tokens, eos=eos_id), "generation")
        return GenerateResult(rec["tokens"].astype(np.int32), rec["margins"], int(rec["steps"][0]))
