"""The main job is deterministic: the same verdicts and the same numbers in its JSON report across
runs and whatever the number of worker processes (timings live apart, in timing.json)."""

from __future__ import annotations

import json

from equiv.check import run_main_job

FIXTURES = ["tiny-g1", "tiny-dtlimit-bias"]


def _summary(tmp_path, name, workers):
    out = tmp_path / name
    code = run_main_job(FIXTURES, out, golden=True, ssd=False, progress=lambda _m: None, workers=workers)
    return code, (out / "summary.json").read_bytes()


def test_summary_json_is_identical_across_runs_and_worker_counts(tmp_path):
    code1, first = _summary(tmp_path, "a", workers=1)
    code2, second = _summary(tmp_path, "b", workers=1)
    code3, third = _summary(tmp_path, "c", workers=2)
    assert code1 == code2 == code3 == 0
    assert first == second, "two runs with one worker wrote different summary.json"
    assert first == third, "-n 2 wrote a different summary.json than -n 1"
    data = json.loads(first)
    assert [f["fixture"] for f in data["fixtures"]] == FIXTURES
    assert all(f["verdict"] == "pass" for f in data["fixtures"])
