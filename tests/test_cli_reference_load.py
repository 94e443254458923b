"""`equiv diff` on a checkpoint the port accepts but transformers' `from_pretrained` refuses: one
`CheckpointError` line naming the checkpoint and transformers' own exception, exit 2, no traceback.

The realistic case: generation_config.json, which the port never reads and transformers validates
while loading (a hand-edited `max_new_tokens: -5` raises ValueError; a JSON list, TypeError)."""

from __future__ import annotations

import json
import shutil

import pytest

from equiv.cli import main
from equiv.errors import CheckpointError
from equiv.fixtures import fixture_dir
from equiv.mamba2.port import Mamba2Port

pytest.importorskip("torch")

BAD_GENERATION_CONFIGS = {
    "max_new_tokens -5": ({"max_new_tokens": -5}, "ValueError: `max_new_tokens` must be greater than 0"),
    "a JSON list": ([1, 2], "TypeError: "),
}


def _checkpoint(tmp_path, generation_config):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(fixture_dir("tiny-g1"), ckpt)
    (ckpt / "generation_config.json").write_text(json.dumps(generation_config))
    Mamba2Port().load(ckpt)  # the port accepts it: only the reference refuses
    return ckpt


@pytest.mark.parametrize("name", BAD_GENERATION_CONFIGS)
def test_runner_turns_from_pretrained_failure_into_one_line_checkpoint_error(tmp_path, name):
    from equiv_reference.mamba2.transformers_runner import TransformersRunner

    generation_config, underlying = BAD_GENERATION_CONFIGS[name]
    ckpt = _checkpoint(tmp_path, generation_config)
    with pytest.raises(CheckpointError) as info:
        TransformersRunner(ckpt, "float32")
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{ckpt}: expected"), message
    assert underlying in message, message
    assert type(info.value.__cause__).__name__ == underlying.split(":")[0]  # kept for debugging


def test_diff_exits_2_with_one_line_when_transformers_refuses(tmp_path, capsys):
    generation_config, underlying = BAD_GENERATION_CONFIGS["max_new_tokens -5"]
    ckpt = _checkpoint(tmp_path, generation_config)
    code = main(["diff", str(ckpt), "--seq-len", "4", "--batch", "1"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.splitlines()
    errors = [ln for ln in lines if ln.startswith("equiv: error:")]
    assert len(errors) == 1 and errors[0] == lines[-1] and "Traceback" not in err, err
    assert str(ckpt) in errors[0] and underlying in errors[0], errors[0]
