"""`equiv diff` through `main([...])` with the numpy fake as port and reference: exit codes 0/1/2,
one line on stderr for every usage or input error, reports written with --out."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from equiv.cli import Progress, main, random_ids
from tests.fake_port import Defect, FakeConfig, write_checkpoint

FAKE = ["--port", "tests.fake_port:FakePort", "--reference", "tests.fake_port:load_fake_reference"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def importable_tests_package(monkeypatch):
    """`tests.fake_port:...` is resolved by import inside the CLI, from the repository root."""
    monkeypatch.syspath_prepend(str(ROOT))


@pytest.fixture
def good(tmp_path):
    return write_checkpoint(tmp_path / "good")


@pytest.fixture
def bad(tmp_path):
    return write_checkpoint(tmp_path / "bad", defects=[Defect("layers.1.mix", 1e-4)])


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *fragments: str):
    lines = err.splitlines()
    errors = [ln for ln in lines if ": error: " in ln]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0] == lines[-1]  # stage lines may precede it, nothing follows
    for f in fragments:
        assert f in errors[0], (f, errors[0])


def test_equivalent_exits_0_table_on_stdout_stages_on_stderr(capsys, good):
    code, out, err = run_cli(capsys, "diff", good, *FAKE, "--seq-len", "16")
    assert code == 0
    assert out.rstrip().endswith("EQUIVALENT: all 12 taps compared, 0 fail")
    assert max(map(len, out.splitlines())) <= 80
    # stderr is not a TTY under capsys: one line per stage, no live counter
    assert err.splitlines() == ["equiv: loading port tests.fake_port:FakePort (float32)",
                                "equiv: loading reference tests.fake_port:load_fake_reference "
                                "(float32 and the float64 oracle)",
                                "equiv: oracle forward (float64)", "equiv: reference forward (float32)",
                                "equiv: port forward", "equiv: comparing"]


def test_divergence_exits_1_and_writes_reports(capsys, bad, tmp_path):
    out_dir = tmp_path / "out"
    code, out, err = run_cli(capsys, "diff", bad, *FAKE, "--out", out_dir, "--seed", "3",
                             "--batch", "3", "--seq-len", "10")
    assert code == 1
    assert "> layers.1.mix" in out and "every upstream tap is within budget" in out.replace("\n  ", " ")
    written = sorted(p.name for p in out_dir.iterdir())
    assert written == ["ratio.png", "report.html", "report.json", "report.md"]
    report = json.loads((out_dir / "report.json").read_text())
    assert report["first_divergence"]["tap"] == "layers.1.mix"
    assert report["inputs"]["seed"] == 3 and report["inputs"]["shape"] == [3, 10]
    assert err.splitlines()[-1] == f"equiv: writing reports to {out_dir}"


def test_isolated_mode_and_bfloat16(capsys, bad):
    code, out, _ = run_cli(capsys, "diff", bad, *FAKE, "--mode", "isolated", "--seq-len", "8")
    assert code == 1 and "DIVERGENT: all 12 taps compared, 1 fail, first at layers.1.mix" in out
    code, out, _ = run_cli(capsys, "diff", bad, *FAKE, "--dtype", "bfloat16", "--seq-len", "8")
    assert code == 0 and "bfloat16" in out  # a 1e-4 defect is below bf16 rounding: no false alarm


def test_budget_option_is_applied(capsys, bad):
    code, out, _ = run_cli(capsys, "diff", bad, *FAKE, "--seq-len", "8", "--budget", "1e9")
    assert code == 0 and "budget 1e+09x" in out


def test_port_without_isolated_mode_exits_2(capsys, good):
    code, out, err = run_cli(capsys, "diff", good, "--port", "tests.fake_port:NoIsolatedFakePort",
                             "--reference", "tests.fake_port:load_fake_reference", "--mode", "isolated")
    assert code == 2 and "n/a" in out
    assert_one_line_error(err, "no tap could be compared", "isolated mode switched off")


@pytest.mark.parametrize("argv, fragments", [
    ([], ["equiv: error:", "COMMAND"]),
    (["frobnicate"], ["invalid choice", "frobnicate"]),
    (["diff"], ["equiv diff: error:", "checkpoint"]),
    (["diff", "{good}", "--seq-len", "0"], ["--seq-len", "expected an integer >= 1, got 0"]),
    (["diff", "{good}", "--batch", "two"], ["--batch", "'two'"]),
    (["diff", "{good}", "--seed", "-1"], ["--seed", "expected an integer >= 0"]),
    (["diff", "{good}", "--budget", "nan"], ["--budget", "finite number > 0"]),
    (["diff", "{good}", "--dtype", "float16"], ["--dtype", "invalid choice"]),
    (["diff", "{good}", "--mode", "both"], ["--mode", "invalid choice"]),
    (["diff", str(ROOT / "fixtures" / "tiny-g2"), "--port", "nosuch"], ["port: expected one of", "'nosuch'"]),
    (["diff", str(ROOT / "fixtures" / "tiny-g2"), "--reference", "nosuch"],
     ["reference for Mamba-2: expected one of ['transformers', 'mamba_ssm']", "'nosuch'"]),
    (["diff", "{good}"], ["expected a checkpoint of a known family (mamba2 (model_type 'mamba2'",
                          "got neither a model_type nor a mamba_ssm ssm_cfg"]),
    (["diff", "{good}", "--port", "tests.fake_port:Nope",
      "--reference", "tests.fake_port:load_fake_reference"],
     ["has no attribute 'Nope'"]),
    # a checkpoint no family reads needs both sides as plug-ins
    (["diff", "{good}", "--port", "tests.fake_port:FakePort", "--reference", "torchscript"],
     ["expected a checkpoint of a known family", "got neither a model_type"]),
    (["diff", "{good}", "--port", "tests.fake_port:FakePort", "--reference", "no_such_mod:f"],
     ["reference 'no_such_mod:f'", "No module named"]),
    (["diff", "{missing}", *FAKE], ["checkpoint: expected a directory", "no such path"]),
    # config.json is read strictly once, to choose the family
    (["diff", "{no_config}"], ["config.json': expected a config.json, got nothing: the file does not exist"]),
    (["diff", "{bad_json}"], ["config.json': expected a config.json as valid JSON", "JSONDecodeError"]),
    (["diff", "{no_vocab}"], ["expected a checkpoint of a known family", "got neither a model_type"]),
    (["diff", "{good}", "--port", "tests.test_cli:port_without_vocab_size", "--reference",
      "tests.fake_port:load_fake_reference"], ["does not follow the port protocol v1", "vocab_size (an int"]),
    (["diff", "{good}", *FAKE, "--out", "{a_file}"], ["report directory", "expected a directory"]),
])
def test_usage_and_input_errors_exit_2_with_one_line(capsys, tmp_path, good, argv, fragments):
    (tmp_path / "no_config").mkdir()
    (tmp_path / "bad_json").mkdir()
    (tmp_path / "bad_json" / "config.json").write_text("{vocab_size: 3")
    (tmp_path / "no_vocab").mkdir()
    (tmp_path / "no_vocab" / "config.json").write_text(json.dumps({"d_model": 8}))
    (tmp_path / "a_file").write_text("x")
    paths = {k: tmp_path / k for k in ("missing", "no_config", "bad_json", "no_vocab", "a_file")}
    argv = [a.format(good=good, **paths) for a in argv]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert_one_line_error(err, *fragments)
    assert out == ""  # nothing ran: every one of these is caught before the forwards


def test_help_exits_0(capsys):
    code, out, _ = run_cli(capsys, "diff", "--help")
    assert code == 0 and "--reference" in out and "--mode" in out


def test_random_ids_are_seeded_and_in_range():
    a, b = random_ids(50, 3, 200, seed=5), random_ids(50, 3, 200, seed=5)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.int32 and a.shape == (3, 200) and a.min() >= 0 and a.max() < 50
    assert len(np.unique(a)) > 40 and not np.array_equal(a, random_ids(50, 3, 200, seed=6))


def test_progress_on_a_tty_redraws_one_line_per_stage():
    stream = io.StringIO()
    p = Progress(stream, tty=True)
    p.stage("port forward")
    p.stage("comparing")
    p.close()
    text = stream.getvalue()
    assert text.startswith("equiv: port forward ...")
    assert "\r\033[Kequiv: port forward ... " in text and text.endswith("s\n")
    assert text.count("\n") == 2  # one finished line per stage


def test_vocab_comes_from_config(capsys, tmp_path):
    ck = write_checkpoint(tmp_path / "v3", FakeConfig(vocab_size=3))
    out_dir = tmp_path / "out"
    assert main(["diff", str(ck), *FAKE, "--seq-len", "40", "--out", str(out_dir)]) == 0
    capsys.readouterr()
    shape = json.loads((out_dir / "report.json").read_text())["taps"][-1]["shape"]
    assert shape == [2, 40, 3]  # logits (b, l, v): the ids were drawn in [0, 3) or the fake would fail


def register(subparsers):
    """A subcommand contributed by another module (the extension point `decode` and `check` use)."""
    p = subparsers.add_parser("hello")
    p.add_argument("--times", type=int, default=1)
    p.set_defaults(func=lambda args, progress: print("hello " * args.times) or 0)


def test_other_modules_register_subcommands(capsys, monkeypatch):
    import equiv.cli

    monkeypatch.setattr(equiv.cli, "SUBCOMMAND_MODULES", ("tests.test_cli", "equiv.no_such_cli_module"))
    code, out, _ = run_cli(capsys, "hello", "--times", "2")
    assert code == 0 and out == "hello hello \n"
    code, _, err = run_cli(capsys, "hello", "--times", "x")
    assert code == 2
    assert_one_line_error(err, "equiv hello: error: argument --times")


def port_without_vocab_size():
    """A port whose loaded model lacks a member the harness needs (protocol v1)."""
    from tests.fake_port import FakePort

    class Port(FakePort):
        def load(self, checkpoint_dir, dtype="float32"):
            model = super().load(checkpoint_dir, dtype)
            del model.vocab_size
            return model

    return Port()


def raising_port_factory():
    """A port whose load raises what no layer of ours anticipates."""

    class Port:
        name = "raises"

        def load(self, checkpoint_dir, dtype="float32"):
            raise TypeError("Func() is not a Python function")

    return Port()


def test_any_exception_is_one_line_and_exit_2_traceback_only_with_debug(capsys, good):
    argv = ["diff", str(good), "--port", "tests.test_cli:raising_port_factory",
            "--reference", "tests.fake_port:load_fake_reference"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2  # a plug-in's own exception is named with the plug-in and the call
    assert_one_line_error(err, "port 'tests.test_cli:raising_port_factory': load(",
                          "raised TypeError: Func() is not a Python function")
    code, _, err = run_cli(capsys, *argv, "--debug")  # accepted anywhere on the line
    assert code == 2 and "Traceback (most recent call last)" in err and "raise TypeError" in err


def test_an_exception_no_layer_names_is_one_line_saying_so(capsys, good, monkeypatch):
    def broken(*args):
        raise TypeError("Func() is not a Python function")

    monkeypatch.setattr("equiv.cli.random_ids", broken)
    code, _, err = run_cli(capsys, "diff", good, *FAKE)
    assert code == 2
    assert_one_line_error(err, "equiv diff failed with TypeError: Func() is not a Python function", "--debug")
