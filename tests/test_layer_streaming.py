"""Layer streaming (equiv/stream, equiv/io/layer_reader.py, the Mamba-2 stage runners): the streamed
run gives the very LayerwiseResult of the in-memory run, number for number, on every Mamba-2 fixture
in both modes (also read through a sharded index, and with left padding), and the same
teacher-forced decode match; the generic driver on the numpy fake keeps the harness's rules
(first divergence, explanations, one-sided taps, a port without isolated mode); the reader reads only
what the headers declare; `equiv diff --stream` prints a line per layer and records peak memory."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from equiv.check import plan_for
from equiv.cli import main
from equiv.decode import teacher_forced_decode
from equiv.errors import CheckpointError, EquivError
from equiv.families import family
from equiv.fixtures import fixtures_root
from equiv.io.layer_reader import TensorIndex
from equiv.io.safetensors_io import read_safetensors, write_safetensors
from equiv.layerwise import run_layerwise
from equiv.stream.driver import run_streamed
from tests.fake_port import (
    Defect,
    FakeConfig,
    FakeModel,
    FakeRunner,
    _mask,
    _Ops,
    _perturb,
    weights,
)

MAMBA2 = ["tiny-g1", "tiny-g2", "tiny-gh", "tiny-untied", "tiny-dtlimit-bias", "trained-bytes"]
DECODE_STEPS = 6


def fixture(name: str) -> Path:
    return fixtures_root() / name


def assert_same_result(in_memory, streamed, renamed: tuple[Path, Path] | None = None):
    """Every per-tap number, the verdict, first divergence, explanations and what the report says
    about the inputs, the port and the settings; the reference's provenance only differs by saying
    it streamed and by its call counts. `renamed` (streamed path, in-memory path): the streamed
    checkpoint is a copy elsewhere, so its path in the reports is mapped back before comparing."""
    def same(value):
        text = json.dumps(value, default=str, sort_keys=True)
        if renamed:
            text = text.replace(str(renamed[0]), str(renamed[1]))
            text = text.replace(json.dumps(renamed[0].name), json.dumps(renamed[1].name))
        return text

    assert [t.to_dict() for t in streamed.taps] == [t.to_dict() for t in in_memory.taps]
    for attr in ("mode", "dtype", "budget", "verdict", "first_divergence", "explanations", "port_only",
                 "reference_only", "inputs", "port", "settings", "notes"):
        assert same(getattr(streamed, attr)) == same(getattr(in_memory, attr)), attr
    skip = {"streamed", "code_paths"}
    assert same({k: v for k, v in streamed.reference.items() if k not in skip}) == \
        same({k: v for k, v in in_memory.reference.items() if k not in skip})


def assert_same_decode(in_memory, streamed):
    """The teacher-forced decode match, streamed and in memory: identical but for the reference's
    own cached decode steps, which transformers computes block by block when streamed and through
    Mamba2ForCausalLM in memory (measured on trained-bytes: 2.9e-6 apart, float32 rounding of logits
    ~10): the reference-consistency verdict must agree (its error metrics differ by that rounding)
    and the median margin to 1e-5 relative."""
    a, b = in_memory.to_dict(), streamed.to_dict()
    loose = ("reference_consistency", "median_reference_margin")
    assert {k: v for k, v in a.items() if k not in loose} == {k: v for k, v in b.items() if k not in loose}
    assert a["reference_consistency"]["verdict"] == b["reference_consistency"]["verdict"]
    assert a["median_reference_margin"] == pytest.approx(b["median_reference_margin"], rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Mamba-2: streamed == in memory


def in_memory_sides(path: Path):
    from equiv.ports import resolve_port
    from equiv.references import load_reference

    fam = family("mamba2")
    reference = lambda dtype: load_reference(None, path, dtype, family=fam)  # noqa: E731
    return resolve_port("builtin", fam).load(path, "float32"), reference("float32"), reference("float64")


def streamed_sides(path: Path):
    from equiv.mamba2.layer_stream import stream_port
    from equiv_reference.mamba2.layer_stream import stream_transformers

    reader = TensorIndex(path)
    return (stream_port(path, "float32", reader=reader), stream_transformers(path, "float32", reader=reader),
            stream_transformers(path, "float64", reader=reader))


def compare_paths(path: Path, ids, mask, sides=None, streamed_path: Path | None = None):
    """In memory on `path`, streamed on `streamed_path` (default: the same): both modes, and the
    teacher-forced decode of the last DECODE_STEPS tokens."""
    model, ref, oracle = sides or in_memory_sides(path)
    port_s, ref_s, oracle_s = streamed_sides(streamed_path or path)
    prompt = ids.shape[1] - DECODE_STEPS
    runs = {}
    for mode in ("accumulated", "isolated"):
        expected = run_layerwise(model, ref, oracle, ids, mask, mode=mode, seed=0)
        lines = []
        got = run_streamed(port_s, ref_s, oracle_s, ids, mask, mode=mode, seed=0, progress=lines.append,
                           decode_prompt_len=prompt if mode == "accumulated" else None)
        assert_same_result(expected, got.result,
                           (streamed_path, path) if streamed_path else None)
        assert len(lines) == len(got.stages) == len(port_s.stages)
        rss = [s.peak_rss_bytes for s in got.stages]
        assert rss[0] > 0 and rss == sorted(rss)  # a high-water mark, recorded after every stage
        runs[mode] = expected, got
    tf = teacher_forced_decode(model, ref, oracle, ids, mask, prompt)
    assert_same_decode(tf, runs["accumulated"][1].decode)
    return runs["accumulated"]


@pytest.mark.parametrize("name", MAMBA2)
def test_streamed_equals_in_memory_on_every_mamba2_fixture(name):
    model, ref, oracle = sides = in_memory_sides(fixture(name))
    ids = plan_for(fixture(name), model.vocab_size, model.decode_lengths).layerwise_ids
    expected, got = compare_paths(fixture(name), ids, None, sides)
    assert expected.verdict == "equivalent" and got.decode.verdict == "pass"


def test_streamed_equals_in_memory_with_left_padding():
    """The padding mask reaches every streamed block as transformers' model makes it (and the
    use_bias leak into the conv, docs/porting-bugs.md #6, comes out the same)."""
    path = fixture("tiny-dtlimit-bias")
    ids = np.random.default_rng(3).integers(0, 96, (2, 40)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :9] = 0
    compare_paths(path, ids, mask)


def reshard(src: Path, dst: Path, shards: int = 3) -> Path:
    """`src`'s model.safetensors as a sharded model.safetensors.index.json checkpoint."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = read_safetensors(src / "model.safetensors")
    names = sorted(tensors)
    weight_map = {}
    for j, part in enumerate(np.array_split(np.arange(len(names)), shards)):
        file = f"model-{j + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(dst / file, {names[k]: tensors[names[k]] for k in part})
        weight_map |= {names[k]: file for k in part}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def test_sharded_index_streams_the_same_result(tmp_path):
    src = fixture("trained-bytes")
    sharded = reshard(src, tmp_path / "sharded")
    reader = TensorIndex(sharded)
    assert reader.source == "model.safetensors.index.json"
    assert len({s.path for s in reader.specs.values()}) == 3
    model, ref, oracle = sides = in_memory_sides(src)
    ids = plan_for(src, model.vocab_size, model.decode_lengths).layerwise_ids
    compare_paths(src, ids, None, sides, streamed_path=sharded)


# ---------------------------------------------------------------------------------------------
# the generic driver, on the numpy fake staged by layer


class _FakeStage:
    """One stage of the fake (tests/fake_port.py): the embedding, layer i, or the head."""

    def __init__(self, side, k: int):
        self.side, self.k = side, k
        n = side.cfg.n_layers
        self.label = "embedding" if k == 0 else "head" if k == n + 1 else f"layer {k}/{n}"
        i, extra = k - 1, tuple(f"layers.{k - 1}.{e}" for e in side.extra)
        # in the order each side lists them: the port its tap_names, the reference its run's output
        block = (f"layers.{i}", *extra) if side.port else (*extra, f"layers.{i}")
        self.tap_names = (("embed",) if k == 0 else ("norm_f", "logits") if k == n + 1 else
                          (f"layers.{i}.a", f"layers.{i}.mix", *block))

    def load(self):
        self.side.loads.append(self.k)
        return _FakeLoaded(self.side, self.k)


class _FakeLoaded:
    def __init__(self, side, k):
        self.side, self.k, self.w = side, k, weights(side.cfg)

    def forward(self, carry, mask):
        s, k, n = self.side, self.k, self.side.cfg.n_layers
        ops, out = s.ops, {}

        def tap(name, x):
            out[name] = _perturb(name, x, s.defects)
            return out[name]

        if k == 0:
            h = tap("embed", ops.round(self.w["E"].astype(ops.np_dtype)[carry]))
        elif k <= n:
            i, h = k - 1, carry
            a = tap(f"layers.{i}.a", ops.a(h, self.w[f"W{i}"]))
            mix = tap(f"layers.{i}.mix", ops.mix(a, _mask(h[..., 0], mask)))
            for e in s.extra:
                out[f"layers.{i}.{e}"] = a
            h = tap(f"layers.{i}", ops.block(h, mix, self.w[f"U{i}"]))
        else:
            h = None
            tap("logits", ops.logits(tap("norm_f", ops.norm(carry)), self.w["E"]))
        return h, out

    def forward_isolated(self, ids, mask, fed):
        s, k, n, ops = self.side, self.k, self.side.cfg.n_layers, self.side.ops
        if not s.isolated:
            from equiv.ports import TapUnavailable
            raise TapUnavailable("fake port: isolated mode switched off")
        get = lambda name: np.asarray(fed[name], ops.np_dtype)  # noqa: E731
        if k == 0:
            out = {"embed": ops.round(self.w["E"][ids])}
        elif k <= n:
            i, prev = k - 1, "embed" if k == 1 else f"layers.{k - 2}"
            out = {f"layers.{i}.a": ops.a(get(prev), self.w[f"W{i}"]),
                   f"layers.{i}.mix": ops.mix(get(f"layers.{i}.a"), _mask(ids, mask)),
                   f"layers.{i}": ops.block(get(prev), get(f"layers.{i}.mix"), self.w[f"U{i}"])}
        else:
            out = {"norm_f": ops.norm(get(f"layers.{n - 1}")),
                   "logits": ops.logits(get("norm_f"), self.w["E"])}
        return {name: _perturb(name, v, s.defects) for name, v in out.items()}


class FakeSide:
    """The fake's port (cumsum mean, defects) or reference/oracle (triangular matmul) as stages."""

    def __init__(self, dtype, port: bool, defects=(), extra=(), isolated=True):
        self.cfg, self.port, self.defects, self.extra = FakeConfig(), port, list(defects), tuple(extra)
        self.isolated, self.ops, self.loads = isolated, _Ops(dtype, cumsum_mean=port), []
        self.stages = [_FakeStage(self, k) for k in range(self.cfg.n_layers + 2)]
        self.tap_names = [t for s in self.stages for t in s.tap_names]
        self._in_memory = (FakeModel(self.cfg, dtype, defects, extra, isolated) if port
                           else FakeRunner(self.cfg, dtype, tuple(extra)))

    def info(self):
        return self._in_memory.info()

    def provenance(self):
        return self._in_memory.provenance()


IDS = np.random.default_rng(0).integers(0, FakeConfig().vocab_size, (2, 24))


def fake_pair(mode="accumulated", defects=(), port_extra=(), ref_extra=(), isolated=True):
    model = FakeModel(FakeConfig(), "float32", defects, port_extra, isolated)
    expected = run_layerwise(model, FakeRunner(FakeConfig(), "float32", tuple(ref_extra)),
                             FakeRunner(FakeConfig(), "float64", tuple(ref_extra)), IDS, None, mode=mode)
    port = FakeSide("float32", True, defects, port_extra, isolated)
    reference = lambda dtype: FakeSide(dtype, False, extra=ref_extra)  # noqa: E731
    got = run_streamed(port, reference("float32"), reference("float64"), IDS, None, mode=mode)
    return expected, got.result, port


@pytest.mark.parametrize("mode", ["accumulated", "isolated"])
def test_driver_finds_the_first_divergence_as_the_in_memory_run(mode):
    defects = [Defect("layers.0.mix", 1e-4), Defect("layers.2.a", 1e-4)]
    expected, got, port = fake_pair(mode, defects)
    assert_same_result(expected, got)
    assert got.verdict == "divergent" and got.first_divergence.tap == "layers.0.mix"
    assert port.loads == list(range(len(port.stages)))  # each stage loaded once, in order


def test_driver_keeps_one_sided_taps_in_execution_order():
    expected, got, _ = fake_pair(port_extra=("port_extra",), ref_extra=("ref_extra",))
    assert_same_result(expected, got)
    assert got.port_only == [f"layers.{i}.port_extra" for i in range(3)]


def test_driver_port_without_isolated_mode_is_inconclusive_with_its_reason():
    expected, got, _ = fake_pair("isolated", isolated=False)
    assert_same_result(expected, got)
    assert got.verdict == "inconclusive" and any("isolated mode switched off" in n for n in got.notes)


def test_driver_refuses_sides_whose_stages_do_not_line_up():
    port, ref = FakeSide("float32", True), FakeSide("float32", False)
    ref.stages = ref.stages[:-1]
    with pytest.raises(EquivError, match="expected the same stages on every side"):
        run_streamed(port, ref, FakeSide("float64", False), IDS)


# ---------------------------------------------------------------------------------------------
# the reader


def test_reader_reads_only_declared_bytes_and_keeps_one_group(tmp_path):
    src = fixture("tiny-g2") / "model.safetensors"
    reader = TensorIndex(fixture("tiny-g2"))
    whole = read_safetensors(src)
    assert set(reader.names()) == set(whole)
    group = ["backbone.layers.1.mixer.D", "backbone.layers.1.norm.weight"]
    first = reader.read(group)
    assert reader.read(list(reversed(group))) is first  # the sides of one process read it once
    for k in group:
        np.testing.assert_array_equal(first[k], whole[k])
        assert not first[k].flags.writeable
    assert reader.nbytes(group) == sum(whole[k].nbytes for k in group)
    placeholder = reader.placeholders()["backbone.embeddings.weight"]
    assert placeholder.shape == whole["backbone.embeddings.weight"].shape and placeholder.strides == (0, 0)


def test_reader_refuses_a_file_that_changed_after_its_header_was_read(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    blob = (fixture("tiny-g2") / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(blob)
    reader = TensorIndex(ckpt)
    (ckpt / "model.safetensors").write_bytes(blob[:-64])
    with pytest.raises(CheckpointError, match="the file changed during the run"):
        reader.read_one("backbone.norm_f.weight")


def test_reader_refuses_a_pickle_and_a_lying_index(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"PK")
    with pytest.raises(CheckpointError, match="loads only whole"):
        TensorIndex(tmp_path / "bin")
    sharded = reshard(fixture("tiny-g2"), tmp_path / "sharded", shards=2)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    key = "backbone.norm_f.weight"
    files = set(index["weight_map"].values())
    index["weight_map"][key] = next(f for f in sorted(files) if f != index["weight_map"][key])
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="index and shards disagree"):
        TensorIndex(sharded)


# ---------------------------------------------------------------------------------------------
# equiv diff --stream


LAYER_LINE = re.compile(r"^equiv: layer (\d+)/2: 3 sides, \d+\.\d s, peak RSS \d[\d.]* [KMG]B$")


def test_diff_stream_prints_a_line_per_layer_and_records_peak_memory(capsys, tmp_path):
    out = tmp_path / "report"
    code = main(["diff", str(fixture("tiny-g2")), "--stream", "--seq-len", "24", "--decode-steps", "4",
                 "--mode", "isolated", "--out", str(out)])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    layers = [m.group(1) for line in stderr.splitlines() if (m := LAYER_LINE.match(line))]
    assert layers == ["1", "2"], stderr
    assert "EQUIVALENT" in stdout and "decode, teacher-forced (4 steps x 2 rows" in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["peak_rss_bytes"] > 10**7
    assert report["settings"]["streamed"]["stages"] == 4 and report["mode"] == "isolated"
    assert json.loads((out / "decode.json").read_text())["verdict"] == "pass"


def test_in_memory_diff_records_peak_memory_too(capsys, tmp_path):
    code = main(["diff", str(fixture("tiny-g2")), "--seq-len", "24", "--out", str(tmp_path)])
    _, stderr = capsys.readouterr()
    assert code == 0 and "layer 1/2" not in stderr
    assert json.loads((tmp_path / "report.json").read_text())["settings"]["peak_rss_bytes"] > 10**7


def test_diff_streams_by_itself_when_the_in_memory_run_would_not_fit(capsys, monkeypatch):
    from equiv.mamba2.layer_stream import stream_port
    from equiv.stream.memory import in_memory_need, streamed_need

    path, batch, seq = fixture("tiny-g2"), 2, 24
    reader = TensorIndex(path)
    side = stream_port(path, reader=reader)
    need = in_memory_need(reader.nbytes(itemsize=4), side, "builtin", batch, seq)
    streamed = streamed_need(side, batch, seq)
    assert streamed < need
    monkeypatch.setenv("SSM_EQUIV_MAX_MEMORY", str((need + streamed) // 2))
    code = main(["diff", str(path), "--seq-len", str(seq), "--batch", str(batch)])
    _, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert "an in-memory diff needs about" in stderr and "streaming layer by layer (--stream)" in stderr
    assert "equiv: layer 2/2: 3 sides" in stderr


@pytest.mark.parametrize("argv, fragment", [
    (["tiny-g2", "--decode-steps", "4"], "--decode-steps: expected --stream"),
    (["tiny-g2", "--stream", "--port", "mamba2-jax"], "--stream: expected --port builtin"),
    (["tiny-g2", "--stream", "--decode-steps", "24"], "expected fewer steps than --seq-len 24"),
    (["mamba1-tiny-oddrank", "--stream"], "--stream: expected a checkpoint of a family with layer runners"),
])
def test_diff_stream_usage_errors_are_one_line(capsys, argv, fragment):
    code = main(["diff", str(fixture(argv[0])), "--seq-len", "24", *argv[1:]])
    _, stderr = capsys.readouterr()
    assert code == 2 and "Traceback" not in stderr
    assert fragment in stderr.splitlines()[-1], stderr
