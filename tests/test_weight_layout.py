"""The projection weight layouts (equiv/kblock.py): K-blocks (CPU's default), whole (K, N) columns,
and rows (the (N, K) weight, the default on GPU), chosen at load or by SSM_EQUIV_WEIGHT_LAYOUT.

Rows must compute what columns compute: the same dot_general arguments (precision, output dtype),
contracted on the weight's last axis, no transposed copy in the graph; forced on CPU, every tap and
every decode step's logits within float32 rounding of the columns form (bounds measured below, in
units of eps * sqrt(K) relative to each tap's scale). The sharded port and the layer-streamed port
accept a rows-loaded model, a bad value is one line, and gpu_bench records the layout of each row.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from equiv.errors import EquivError
from equiv.fixtures import fixtures_root
from equiv.kblock import LAYOUT_ENV, Rows, for_backend, host_dense, weight_layout
from equiv.mamba1 import model as m1
from equiv.mamba1.port import Mamba1Port
from equiv.mamba2 import model as m2
from equiv.mamba2.port import Mamba2Port

EPS = float(np.finfo(np.float32).eps)
# fixture, port: tiny-g2 (tied head), tiny-untied (its head stored as rows too), a Mamba-1
# with an untied head and biases (in_proj, x_proj, dt_proj, out_proj, lm_head all rows)
CASES = [("tiny-g2", Mamba2Port), ("tiny-untied", Mamba2Port), ("mamba1-tiny-untied-bias", Mamba1Port)]
# max |rows - columns| / max |columns| over every tap, in eps * sqrt(K) (K = the longest contraction,
# d_inner), measured: 0.74 (tiny-g2, layers.1.mixer.gated_norm), 0.63 (tiny-untied), 0.33 (mamba1);
# logits and decode-step logits 0.43 at most. A wrong contraction is O(1 / eps) over it.
TAP_BOUND = 2.0


def load(name, port, layout, monkeypatch):
    monkeypatch.setenv(LAYOUT_ENV, layout)
    return port().load(fixtures_root() / name)


def ids_for(model, seed=0, shape=(2, 19)):
    return np.random.default_rng(seed).integers(0, model.vocab_size, shape).astype(np.int32)


def rel_in_ulps(got, want, k):
    return float(np.abs(got - want).max() / np.abs(want).max()) / EPS / np.sqrt(k)


# ---------------------------------------------------------------------------------------------
# one product


@pytest.mark.parametrize("linear", [m2.linear, m1.linear], ids=["mamba2", "mamba1"])
def test_rows_product_is_the_columns_product_within_float32_rounding(linear):
    rng = np.random.default_rng(1)
    k, n = 1536, 200
    x = rng.standard_normal((3, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    exact = x.astype(np.float64) @ w.astype(np.float64) + b
    scale = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64)  # the sum's magnitude per output
    got = {name: np.asarray(linear(jnp.asarray(x), weight, jnp.asarray(b)))
           for name, weight in (("columns", jnp.asarray(w)), ("rows", Rows(jnp.asarray(w.T))))}
    for name, y in got.items():
        assert y.shape == (3, n) and y.dtype == np.float32
        assert np.max(np.abs(y - exact) / scale) <= 2 * EPS * np.sqrt(k), name
    assert np.max(np.abs(got["rows"] - got["columns"]) / scale) <= 4 * EPS * np.sqrt(k)


@pytest.mark.parametrize("linear", [m2.linear, m1.linear], ids=["mamba2", "mamba1"])
def test_rows_product_keeps_the_columns_output_dtype_in_bfloat16(linear):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((1, 64)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((64, 32)), jnp.bfloat16)
    cols, rows = linear(x, w), linear(x, Rows(w.T))
    assert rows.dtype == cols.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(rows, np.float32), np.asarray(cols, np.float32),
                               rtol=1e-2, atol=1e-2)


def _dots(fn, *args):
    with jax.default_matmul_precision("highest"):
        jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    return dots, [e for e in jaxpr.eqns if e.primitive.name == "transpose"]


@pytest.mark.parametrize("name,port", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_step_contracts_stored_rows_on_their_last_axis_with_the_same_arguments(
        name, port, dtype, monkeypatch):
    """The decode step's graph: each projection's dot takes the stored (N, K) weight as it is
    (contracting dims ((last), (1)), no transpose anywhere), with the precision and output dtype
    of the columns form's dot at the same position."""
    mm = m2 if port is Mamba2Port else m1
    graphs = {}
    for layout in ("columns", "rows"):
        monkeypatch.setenv(LAYOUT_ENV, layout)
        model = port().load(fixtures_root() / name, dtype)
        cache = mm.empty_cache(model.cfg, 1, model.params["embed"].dtype)
        graphs[layout] = _dots(lambda p, c, t, cfg=model.cfg: mm.decode_step(p, cfg, c, t),
                               model.params, cache, jnp.zeros((1,), jnp.int32))
    (cols, _), (rows, transposes) = graphs["columns"], graphs["rows"]
    assert not transposes
    assert len(rows) == len(cols)
    weights = [(c, r) for c, r in zip(cols, rows, strict=True) if c.params["dimension_numbers"][0][1] == (0,)
               and c.invars[1].aval.ndim == 2]  # the (K, N) projections of the columns graph
    assert len(weights) >= 2 * model.cfg.n_layers  # in_proj and out_proj of every layer at least
    for c, r in weights:
        assert r.params["dimension_numbers"] == (((1,), (1,)), ((), ()))
        assert r.invars[1].aval.shape == c.invars[1].aval.shape[::-1]
        for key in ("precision", "preferred_element_type"):
            assert r.params[key] == c.params[key], key


# ---------------------------------------------------------------------------------------------
# whole models, forced on CPU


@pytest.mark.parametrize("name,port", CASES, ids=[c[0] for c in CASES])
def test_forced_rows_gives_the_columns_taps_and_decode_logits_within_float32_rounding(
        name, port, monkeypatch):
    runs = {}
    for layout in ("columns", "rows"):
        model = load(name, port, layout, monkeypatch)
        assert model.info().details["weight_layout"] == layout
        held = model.params["layers"][0]["in_proj"]
        assert isinstance(held, Rows) if layout == "rows" else not isinstance(held, (Rows, tuple))
        if "lm_head" in model.params:
            assert isinstance(model.params["lm_head"], Rows) == (layout == "rows")
        ids = ids_for(model)
        runs[layout] = model.forward(ids), model.step_logits(ids, None, 7)
    k = max(model.cfg.d_model, model.cfg.d_inner)
    (taps_c, steps_c), (taps_r, steps_r) = runs["columns"], runs["rows"]
    assert taps_r.keys() == taps_c.keys()
    worst = {t: rel_in_ulps(taps_r[t], taps_c[t], k) for t in taps_c}
    assert max(worst.values()) <= TAP_BOUND, sorted(worst.items(), key=lambda kv: -kv[1])[:3]
    assert rel_in_ulps(steps_r, steps_c, k) <= TAP_BOUND


def test_cpu_default_stays_k_blocks(monkeypatch):
    monkeypatch.delenv(LAYOUT_ENV, raising=False)
    assert weight_layout("cpu") == "kblocks" and weight_layout("gpu") == "rows"
    model = Mamba2Port().load(fixtures_root() / "trained-bytes")  # d_inner 512: two blocks of 256
    assert jax.default_backend() == "cpu"
    assert {"weight_layout": "kblocks", "matmul_k_block": 256}.items() <= model.info().details.items()
    assert [b.shape[0] for b in model.params["layers"][0]["out_proj"]] == [256, 256]


def test_one_stored_copy_and_every_form_gives_back_the_same_weight():
    w = np.arange(600 * 3, dtype=np.float32).reshape(600, 3)
    params = {"embed": w.T, "lm_head": w, "layers": [{"in_proj": w, "norm": w[0]}]}
    for layout in ("rows", "columns", "kblocks"):
        laid = for_backend(params, ("in_proj",), layout=layout)
        np.testing.assert_array_equal(host_dense(laid["layers"][0]["in_proj"]), w)
        np.testing.assert_array_equal(host_dense(laid["lm_head"]), w)
        assert laid["layers"][0]["norm"] is params["layers"][0]["norm"]
    rows = for_backend(params, ("in_proj",), layout="rows")["layers"][0]["in_proj"]
    assert rows.w.shape == (3, 600) and rows.w.flags["C_CONTIGUOUS"]  # transposed once, on the host
    assert [b.shape for b in for_backend(params, ("in_proj",), layout="kblocks")["layers"][0]["in_proj"]] == \
        [(256, 3), (256, 3), (88, 3)]


# ---------------------------------------------------------------------------------------------
# the sharded and the layer-streamed ports


def test_sharded_port_places_a_rows_loaded_model_as_a_k_block_loaded_one(monkeypatch):
    """The mesh keeps its own layout (K-blocks of each device's rows) whatever the unsharded model
    holds: on a 1x1 mesh the two placements are bit for bit the same forward."""
    from equiv.mamba2.sharding import shard

    ids = None
    out = {}
    for layout in ("rows", "kblocks"):
        unsharded = load("tiny-g2", Mamba2Port, layout, monkeypatch)
        ids = ids_for(unsharded) if ids is None else ids
        sharded = shard(unsharded, 1, 1)
        assert sharded.info().details["weight_layout"] == "kblocks"
        out[layout] = sharded.forward(ids)
    for t in out["kblocks"]:
        np.testing.assert_array_equal(out["rows"][t], out["kblocks"][t], err_msg=t)


def test_layer_streamed_port_follows_the_layout_and_equals_the_in_memory_port(monkeypatch):
    from equiv.check import plan_for
    from equiv.mamba2.layer_stream import stream_port
    from tests.test_layer_streaming import compare_paths, in_memory_sides

    monkeypatch.setenv(LAYOUT_ENV, "rows")
    path = fixtures_root() / "tiny-untied"
    streamed = stream_port(path, "float32")
    block, head = streamed.stages[1].load(), streamed.stages[-1].load()
    assert isinstance(block.params["in_proj"], Rows) and isinstance(head.params["lm_head"], Rows)
    assert streamed.info().details["weight_layout"] == "rows"
    sides = in_memory_sides(path)
    assert sides[0].info().details["weight_layout"] == "rows"
    ids = plan_for(path, sides[0].vocab_size, sides[0].decode_lengths).layerwise_ids
    expected, _ = compare_paths(path, ids, None, sides)  # streamed == in memory, number for number
    assert expected.verdict == "equivalent"


# ---------------------------------------------------------------------------------------------
# the setting


@pytest.mark.parametrize("value", ["diagonal", "ROWS x", "k-blocks"])
def test_a_bad_layout_is_one_line_naming_what_was_expected_and_what_came(value, monkeypatch):
    monkeypatch.setenv(LAYOUT_ENV, value)
    with pytest.raises(EquivError) as err:
        Mamba2Port().load(fixtures_root() / "tiny-g2")
    msg = str(err.value)
    assert "\n" not in msg and LAYOUT_ENV in msg and repr(value) in msg
    assert all(v in msg for v in ("auto", "rows", "columns", "kblocks"))


def test_a_bad_layout_stops_the_cli_before_any_work(monkeypatch, capsys, tmp_path):
    from equiv.cli import main

    monkeypatch.setenv(LAYOUT_ENV, "diagonal")
    assert main(["check", "--fixture", "tiny-g2", "--golden", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"equiv: error: {LAYOUT_ENV}: expected one of auto, rows, columns, kblocks, "
                   "got 'diagonal'"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value,want", [("", "kblocks"), ("auto", "kblocks"), (" Rows ", "rows"),
                                        ("columns", "columns")])
def test_accepted_values(value, want, monkeypatch):
    monkeypatch.setenv(LAYOUT_ENV, value)
    assert weight_layout("cpu") == want


def test_gpu_bench_measures_each_layout_and_records_it_per_row(tmp_path, monkeypatch):
    from equiv_reference.mamba2 import gpu_bench

    monkeypatch.setenv(LAYOUT_ENV, "columns")  # what "auto" resolves to
    argv = ["--models", "tiny", "--dtypes", "float32", "--impls", "port", "--prefill-lens", "32",
            "--sweep-lens", "", "--decode-positions", "8", "--repeats", "1", "--no-ceilings",
            "--out", str(tmp_path)]
    assert gpu_bench.main(argv + ["--weight-layouts", "rows,auto"]) == 0
    report = json.loads((tmp_path / "gpu-bench.json").read_text())
    assert report["weight_layouts"] == ["rows", "columns"] and not report["errors"]
    assert sorted((r["what"], r["weight_layout"]) for r in report["rows"]) == \
        [("decode", "columns"), ("decode", "rows"), ("prefill", "columns"), ("prefill", "rows")]
    lines = (tmp_path / "gpu-bench.txt").read_text().splitlines()
    assert len(lines) == 5 and {ln.split()[4] for ln in lines[1:]} == {"rows", "columns"}
    with pytest.raises(SystemExit, match="--weight-layouts"):
        gpu_bench.main(argv + ["--weight-layouts", "diagonal"])
