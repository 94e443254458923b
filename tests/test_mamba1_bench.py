"""The Mamba-1 CPU benchmark (equiv_reference/mamba1/bench.py) end to end on its tiny shape: both
implementations timed, the torch scan branch recorded, the ratios the quotients of the figures."""

from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from equiv_reference.mamba1 import bench  # noqa: E402


def test_tiny_bench_writes_consistent_figures(tmp_path, capsys):
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:
        rc = bench.main(["--tiny", "--cache-dir", str(tmp_path / "ckpt"), "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    rep = json.loads(out.read_text())
    assert "ratios port / transformers" in capsys.readouterr().out

    fig = rep["figures"]
    assert set(fig) == {"port", "transformers"}
    for impl, f in fig.items():
        for key in ("prefill_median_s", "prefill_tokens_per_s", "generate_median_s", "prefill16_median_s",
                    "decode_ms_per_token"):
            assert math.isfinite(f[key]) and f[key] > 0, (impl, key, f[key])
        assert len(f["prefill_runs_s"]) == rep["method"]["rounds"] == 2
        assert all(math.isfinite(t) and t > 0 for t in f["prefill_runs_s"] + f["generate_runs_s"])
        assert f["prefill_tokens_per_s"] == pytest.approx(bench.PREFILL_LEN / f["prefill_median_s"])

    tf = rep["transformers"]
    assert tf["scan_implementation"] == "sequential loop"
    assert tf["use_mambapy"] == [False]
    assert tf["scan_calls_timed_untraced"] > 0  # the timed calls went through the recorder's shims

    p, t = fig["port"], fig["transformers"]
    assert rep["ratios"]["prefill_tokens_per_s"]["ratio"] == pytest.approx(
        p["prefill_tokens_per_s"] / t["prefill_tokens_per_s"], rel=1e-12)
    assert rep["ratios"]["prefill_tokens_per_s"]["ratio"] == pytest.approx(
        t["prefill_median_s"] / p["prefill_median_s"], rel=1e-12)
    assert rep["ratios"]["decode_ms_per_token"]["ratio"] == pytest.approx(
        p["decode_ms_per_token"] / t["decode_ms_per_token"], rel=1e-12)
    for impl in ("jax", "torch", "transformers", "numpy", "python"):
        assert rep["versions"][impl]
    assert rep["machine"]["cores"] >= 1 and len(rep["machine"]["load_at_start"]) == 3
    assert rep["ceilings"]["prefill_tokens_per_s_ceiling"] > 0
    assert rep["ceilings"]["decode_ms_per_token_floor"] > 0
