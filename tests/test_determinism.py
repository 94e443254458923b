"""The main job is deterministic: the same verdicts and the same numbers in its JSON report across
runs and whatever the number of worker processes (timings live apart, in timing.json)."""

from __future__ import annotations

import json

from equiv.check import run_main_job

FIXTURES = ["tiny-g1", "tiny-dtlimit-bias"]


def _summary(tmp_path, name, workers):
    out = tmp_path / name
    code = run_main_job(FIXTURES, out, golden=True, properties=False, progress=lambda _m: None,
                        workers=workers,
                        allow_not_run=True)
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
    assert data["verdict"] == "equivalent" and data["property_suites"]["SSD duality"]["verdict"] == "not run"


def test_a_check_that_did_not_run_is_never_a_pass(tmp_path):
    """--no-properties without --allow-not-run: every fixture passes, yet the job is INCOMPLETE, exit 3."""
    code = run_main_job(["tiny-g1"], tmp_path, golden=True, properties=False, progress=lambda _m: None)
    data = json.loads((tmp_path / "summary.json").read_text())
    assert code == 3 and data["verdict"] == "incomplete"
    assert data["property_suites"] == {"SSD duality": {"verdict": "not run",
                                                       "detail": "disabled with --no-properties"}}


def test_ssd_properties_in_the_main_job_are_reproducible(tmp_path):
    """The properties are derandomized: two runs draw the same examples, in this process (one
    worker) and in a worker process of the pool (two workers) alike."""
    results = []
    for name, workers in (("a", 1), ("b", 2)):
        code = run_main_job(["tiny-g1"], tmp_path / name, golden=True, property_examples=2,
                            progress=lambda _m: None, workers=workers)
        assert code == 0
        suites = json.loads((tmp_path / name / "summary.json").read_text())["property_suites"]
        results.append(suites["SSD duality"])
    assert results[0] == results[1]
    assert results[0]["verdict"] == "pass" and results[0]["properties_run"] == 9
    assert results[0]["references"]["name"] == "numpy"  # golden mode: the torch-free budget source
