"""No code execution from checkpoints: a `.bin` is a pickle, and the loader opens
it only through `torch.load(weights_only=True)`. Each test plants a payload whose unpickling would
create a marker file, loads the checkpoint directory through the public entry points, and checks
that the load is refused with a CheckpointError and that the marker never appeared. A control test
shows each payload is live: plain unpickling does create its marker, so the refusals are not
vacuous."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from equiv.errors import CheckpointError, UnsafeCheckpointError
from equiv.mamba2.convert import load_checkpoint
from equiv.mamba2.port import Mamba2Port
from tests.test_bad_inputs import base_checkpoint, mamba_ssm_format

torch = pytest.importorskip("torch")


class SystemPayload:
    """Unpickling calls os.system (posix.system) with a shell command creating the marker."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class ExecPayload:
    """Unpickling calls builtins.exec on Python source creating the marker (no shell needed)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).write_text('pwned')",))


PAYLOADS = {"os.system": SystemPayload, "exec": ExecPayload}


def _checkpoint_dir(path: Path) -> tuple[Path, dict]:
    """A mamba_ssm-format checkpoint directory with a valid config.json and no weights yet; returns
    the real state dict (as torch tensors) to plant payloads into."""
    config, tensors = mamba_ssm_format(*base_checkpoint())
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path, {k: torch.from_numpy(v) for k, v in tensors.items()}


def _save(obj, path: Path, how: str) -> None:
    if how == "torch.save":  # the zip format torch writes since 1.6
        torch.save(obj, path)
    else:  # a bare pickle (torch's legacy path); protocol 2 so torch's unpickler reaches the GLOBAL
        path.write_bytes(pickle.dumps(obj, protocol=2))


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_payload_is_live(tmp_path, payload, how):
    """Control: without weights_only, loading the very same file runs the payload."""
    marker = tmp_path / "MARKER"
    path = tmp_path / "pytorch_model.bin"
    _save({"w": PAYLOADS[payload](marker)}, path, how)
    if how == "torch.save":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
@pytest.mark.parametrize("entry", ["load_checkpoint", "Mamba2Port.load"])
def test_payload_in_pytorch_model_bin_is_refused(tmp_path, payload, how, entry):
    ckpt, state = _checkpoint_dir(tmp_path / "ckpt")
    marker = tmp_path / "MARKER"
    # hidden among the real weights, as an attacker would
    _save(state | {"backbone.layers.0.mixer.D": PAYLOADS[payload](marker)}, ckpt / "pytorch_model.bin", how)
    load = load_checkpoint if entry == "load_checkpoint" else Mamba2Port().load
    with pytest.raises(UnsafeCheckpointError) as info:
        load(ckpt)
    assert isinstance(info.value, CheckpointError)
    assert "would run code" in str(info.value) and "GLOBAL" in str(info.value)
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_env_override_cannot_turn_weights_only_off(tmp_path, monkeypatch):
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 switches torch.load to full unpickling when the call does
    not pass weights_only; ours passes it explicitly."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    ckpt, state = _checkpoint_dir(tmp_path / "ckpt")
    marker = tmp_path / "MARKER"
    torch.save(state | {"x": ExecPayload(marker)}, ckpt / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(ckpt)
    assert not marker.exists()


def test_payload_in_a_shard_of_a_bin_index_is_refused(tmp_path):
    ckpt, state = _checkpoint_dir(tmp_path / "ckpt")
    marker = tmp_path / "MARKER"
    keys = sorted(state)
    torch.save({k: state[k] for k in keys[:5]}, ckpt / "pytorch_model-00001-of-00002.bin")
    torch.save({k: state[k] for k in keys[5:]} | {"evil": SystemPayload(marker)},
               ckpt / "pytorch_model-00002-of-00002.bin")
    weight_map = {k: f"pytorch_model-0000{1 + (i >= 5)}-of-00002.bin" for i, k in enumerate(keys)}
    (ckpt / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(ckpt)
    assert not marker.exists()


def test_other_bin_files_are_never_opened(tmp_path):
    """Only pytorch_model.bin is a weights file. A Trainer's training_args.bin (a pickle) next to the
    weights is never unpickled, and on its own it is no checkpoint."""
    ckpt, state = _checkpoint_dir(tmp_path / "ckpt")
    marker = tmp_path / "MARKER"
    _save({"args": SystemPayload(marker)}, ckpt / "training_args.bin", "torch.save")
    with pytest.raises(CheckpointError, match=r"expected one of model.safetensors.*found \['config.json', "
                                              r"'training_args.bin'\]"):
        load_checkpoint(ckpt)
    torch.save(state, ckpt / "pytorch_model.bin")
    cfg, params, fmt = load_checkpoint(ckpt)
    assert fmt == "mamba_ssm" and cfg.n_layers == 2
    assert not marker.exists()


def test_plain_state_dict_bin_loads_like_safetensors(tmp_path):
    """The .bin path is a working loader, not a blanket refusal: a plain state dict gives the same
    params as the same tensors in safetensors (bf16 tensors included)."""
    ckpt, state = _checkpoint_dir(tmp_path / "bin")
    torch.save(state, ckpt / "pytorch_model.bin")
    from tests.test_bad_inputs import write_checkpoint

    config, tensors = mamba_ssm_format(*base_checkpoint())
    _, want, _ = load_checkpoint(write_checkpoint(tmp_path / "st", config, tensors))
    _, got, _ = load_checkpoint(ckpt)
    assert np.array_equal(np.asarray(got["embed"]), np.asarray(want["embed"]))
    for g, w in zip(got["layers"], want["layers"]):
        assert all(np.array_equal(np.asarray(g[k]), np.asarray(w[k])) for k in w)
    torch.save({k: v.to(torch.bfloat16) for k, v in state.items()}, ckpt / "pytorch_model.bin")
    _, bf, _ = load_checkpoint(ckpt, "bfloat16")
    assert str(bf["embed"].dtype) == "bfloat16"
