"""gpu_bench's profile summary, run on the CPU: kernel time and launches are summed from the
trace's GPU process only, and `--profile decode` profiles the decode loop alone."""

from __future__ import annotations

import gzip
import json

from equiv_reference.mamba2 import gpu_bench


def test_top_kernels_counts_only_the_gpu_process(tmp_path):
    events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
              {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
              {"ph": "X", "pid": 1, "name": "gemv", "dur": 20.0},
              {"ph": "X", "pid": 1, "name": "gemv", "dur": 22.0},
              {"ph": "X", "pid": 1, "name": "norm", "dur": 2.0},
              {"ph": "X", "pid": 2, "name": "host op", "dur": 900.0}]
    (tmp_path / "t").mkdir()
    with gzip.open(tmp_path / "t" / "x.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    got = gpu_bench.top_kernels(tmp_path)
    assert got["gpu_kernel_us"] == 44.0 and got["kernel_launches"] == 3
    assert [(k["kernel"], k["calls"]) for k in got["top"]] == [("gemv", 2), ("norm", 1)]
    assert abs(got["top"][0]["share"] - 42 / 44) < 1e-4


def test_profile_decode_only(tmp_path):
    argv = ["--models", "tiny", "--dtypes", "bfloat16", "--impls", "port", "--prefill-lens", "",
            "--sweep-lens", "", "--decode-positions", "8", "--repeats", "1", "--no-ceilings",
            "--profile", "decode", "--out", str(tmp_path)]
    assert gpu_bench.main(argv) == 0
    report = json.loads((tmp_path / "gpu-bench.json").read_text())
    assert not report["errors"]
    prof = next(iter(report["profile"]["tiny"].values()))
    assert set(prof) == {"weight_layout", "decode"}
    assert prof["decode"]["kernel_launches"] > 0 and prof["decode"]["top"]
