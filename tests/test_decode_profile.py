"""The decode profile (equiv_reference/mamba2/decode_profile.py) on the CPU: op kinds lose only
XLA's numeric suffix, only XLA's threads count (not Python's), and a run on the tiny shape prints
the untraced step time and the ops a step."""

from __future__ import annotations

import gzip
import json

from equiv_reference.mamba2 import decode_profile


def test_op_kind_cuts_only_the_numeric_suffix():
    assert decode_profile.op_kind("dot.1372") == "dot"
    assert decode_profile.op_kind("loop_concatenate_fusion_1") == "loop_concatenate_fusion"
    assert decode_profile.op_kind("wrapped_reduce-window") == "wrapped_reduce-window"
    assert decode_profile.op_kind("memcpy128") == "memcpy128"


def test_only_worker_threads_count(tmp_path):
    events = [{"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "tf_XLAEigen/123"}},
              {"ph": "M", "name": "thread_name", "pid": 1, "tid": 8, "args": {"name": "python"}},
              {"ph": "X", "pid": 1, "tid": 7, "name": "dot.1", "dur": 30.0},
              {"ph": "X", "pid": 1, "tid": 7, "name": "dot.2", "dur": 10.0},
              {"ph": "X", "pid": 1, "tid": 7, "name": "ThunkExecutor::Execute", "dur": 99.0},
              {"ph": "M", "name": "thread_name", "pid": 1, "tid": 9,
               "args": {"name": "tf_XLAPjRtCpuClient/1"}},
              {"ph": "X", "pid": 1, "tid": 9, "name": "add_fusion", "dur": 4.0},
              {"ph": "X", "pid": 1, "tid": 8, "name": "dot.3", "dur": 500.0}]
    with gzip.open(tmp_path / "t.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    assert decode_profile.ops_per_step(tmp_path, steps=2) == [
        {"op": "dot", "per_step": 1.0, "traced_us_per_step": 20.0},
        {"op": "add_fusion", "per_step": 0.5, "traced_us_per_step": 2.0}]


def test_runs_on_the_tiny_shape(capsys):
    assert decode_profile.main(["--model", "tiny", "--tokens", "3", "--repeats", "1", "--top", "1000"]) == 0
    out = capsys.readouterr().out
    assert "ms a step untraced" in out and "ops a step" in out and "\ndot " in out


def test_too_few_tokens_is_one_line_and_exit_2(capsys):
    import pytest

    with pytest.raises(SystemExit) as e:
        decode_profile.main(["--tokens", "1"])
    assert e.value.code == 2 and "--tokens: expected >= 2" in capsys.readouterr().err
