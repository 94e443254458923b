"""The built-in Mamba-2 port over a device mesh (equiv/mamba2/sharding.py), on 8 CPU devices.

JAX fixes its device count when it initialises, so the mesh runs in a child process started with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (this file run as a script); it writes what it
measured to JSON and the tests here judge it. Per fixture and mesh: the sharded port against the
unsharded port (the same float64 oracle) in both layer-wise modes, against the transformers
reference in both modes, greedy decode against the unsharded port's tokens, and the shardings the
parameters, activations and decode cache really have. Mesh 1x1 is the identity: its forward is bit
for bit the unsharded port's. The mesh layout's refusals and `equiv diff --mesh`'s one-line errors
need no second device and run here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEVICES = 8
# (fixture, (data, model)). tiny-g2 (8 heads, 2 groups) over every mesh, checked in full: a group's
# heads span 4 devices (1x8), 2 (2x4) or one device holds a whole group (4x2, whose data axis pads
# the batch of 2 to 4). The others check the forward only (each case compiles a sharded forward,
# isolated layer, prefill, decode step and decode loop, the bulk of the test's time): tiny-gh puts 2
# groups on a device, tiny-dtlimit-bias has every bias (out_proj's added once, after the all-reduce)
# and the dt limit. 1x1 is the identity.
FULL = [("tiny-g2", (1, 8)), ("tiny-g2", (2, 4)), ("tiny-g2", (4, 2))]
FORWARD = [("tiny-gh", (2, 4)), ("tiny-dtlimit-bias", (4, 2))]
IDENTITY = ("tiny-g2", (1, 1))
CASES = FULL + FORWARD
NEW_TOKENS = 32
MODES = ("accumulated", "isolated")


def case_id(case) -> str:
    return f"{case[0]}@{case[1][0]}x{case[1][1]}"


# ---------------------------------------------------------------------------------------------
# the child: runs on 8 simulated devices, writes JSON


def _summary(result) -> dict:
    ratios = {t.name: t.ratio for t in result.taps if t.verdict in ("pass", "fail")}
    return {"verdict": result.verdict, "ratios": ratios,
            "failing": [t.name for t in result.taps if t.verdict == "fail"]}


def _shards(a) -> dict:
    return {"spec": str(tuple(a.sharding.spec)), "devices": len(a.sharding.device_set),
            "replicated": a.sharding.is_fully_replicated,
            "shapes": sorted({tuple(s.data.shape) for s in a.addressable_shards})}


def _child(out_path: str) -> None:
    import jax
    import numpy as np

    import tests.conftest  # noqa: F401 - the suite's JAX settings (strict ranks, precision, compile cache)
    from equiv.check import plan_for
    from equiv.decode import match_greedy
    from equiv.families import family_of_checkpoint
    from equiv.layerwise import run_layerwise
    from equiv.mamba2.port import Mamba2Port
    from equiv.mamba2.sharded_vs_unsharded import Remembered, UnshardedPort, against_unsharded, shard
    from equiv.references import load_reference

    assert jax.device_count() == DEVICES, jax.devices()
    out = {}
    for name in dict.fromkeys(n for n, _ in [*CASES, IDENTITY]):
        path = ROOT / "fixtures" / name
        fam = family_of_checkpoint(path)
        unsharded = Mamba2Port().load(path)
        reference = load_reference(None, path, "float32", family=fam)
        oracle = Remembered(load_reference(None, path, "float64", family=fam))
        plan = plan_for(path, unsharded.vocab_size, unsharded.decode_lengths)
        ids = plan.layerwise_ids
        prompts, mask = plan.decode_batches[-1]
        if IDENTITY[0] == name:
            a, b = unsharded.forward(ids), shard(unsharded, *IDENTITY[1]).forward(ids)
            out["identity_max_abs"] = max(float(np.abs(a[k] - b[k]).max()) for k in a)
        for case in [c for c in CASES if c[0] == name]:
            sharded = shard(unsharded, *case[1])
            r = {"layout": {"heads": sharded.layout.local.n_heads, "groups": sharded.layout.local.n_groups,
                            "share": sharded.layout.share}}
            for mode in MODES if case in FULL else MODES[:1]:
                r[mode] = {"unsharded": _summary(against_unsharded(sharded, unsharded, oracle, ids, mode=mode,
                                                                   dtype="float32")),
                           "reference": _summary(run_layerwise(sharded, reference, oracle, ids, None,
                                                               mode=mode))}
            lp = sharded.params["layers"][0]
            acts = sharded.forward_arrays(ids)
            r["shardings"] = {
                "in_proj": _shards(lp["in_proj"][0]), "out_proj": _shards(lp["out_proj"][0]),
                "conv_w": _shards(lp["conv_w"]), "A_log": _shards(lp["A_log"]),
                "embed": _shards(sharded.params["embed"]), "norm": _shards(lp["norm"]),
                **{f"tap {t}": _shards(acts[t]) for t in ("layers.0.mixer.in_proj", "layers.0.mixer.ssm",
                                                          "layers.0.mixer.gated_norm", "layers.0", "logits")}}
            if case in FULL:
                d = match_greedy(sharded, UnshardedPort(unsharded), oracle, prompts, mask, NEW_TOKENS,
                                 plan.eos_id)
                r["decode"] = {"verdict": d.verdict, "reason": d.reason, "matched": sum(d.matched_steps),
                               "total": sum(d.total_steps),
                               "mismatches": [m.classification for m in d.mismatches]}
                _, cache = sharded._prefill(prompts, mask)  # the shapes generate compiled
                r["shardings"] |= {"cache ssm": _shards(cache.ssm), "cache conv": _shards(cache.conv)}
                r["decode_batch"] = len(prompts)
            out[case_id(case)] = r
    Path(out_path).write_text(json.dumps(out))


# ---------------------------------------------------------------------------------------------
# the parent: starts the child once, then judges each case


@pytest.fixture(scope="module")
def mesh_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("mesh") / "runs.json"
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES}"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags.strip())
    proc = subprocess.run([sys.executable, __file__, str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def _config(name: str) -> dict:
    from equiv.mamba2.config_file import load_config

    return load_config(ROOT / "fixtures" / name)[0]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_sharded_port_within_budget_of_unsharded_and_reference(mesh_runs, case):
    r = mesh_runs[case_id(case)]
    for mode in MODES if case in FULL else MODES[:1]:
        for against in ("unsharded", "reference"):
            s = r[mode][against]
            assert s["verdict"] == "equivalent", (mode, against, s["failing"], s["ratios"])
            assert len(s["ratios"]) == 17, (mode, against, sorted(s["ratios"]))  # every tap compared


@pytest.mark.parametrize("case", FULL, ids=case_id)
def test_sharded_greedy_decode_matches_unsharded(mesh_runs, case):
    d = mesh_runs[case_id(case)]["decode"]
    assert d["verdict"] == "pass", d["reason"]
    assert d["matched"] == d["total"] or set(d["mismatches"]) <= {"near-tie"}, d


def _spec(text: str, data: int, model: int) -> tuple:
    """A PartitionSpec's text as a tuple, an axis of size 1 as None (JAX reports it so), trailing
    Nones dropped."""
    import ast

    size = {"data": data, "model": model}
    spec = [a if a is None or size[a] > 1 else None for a in ast.literal_eval(text)]
    while spec and spec[-1] is None:
        spec.pop()
    return tuple(spec)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_arrays_really_are_sharded(mesh_runs, case):
    name, (data, model) = case
    cfg = _config(name)
    s = mesh_runs[case_id(case)]["shardings"]
    h, g, n, e, d = cfg.n_heads, cfg.n_groups, cfg.d_state, cfg.d_inner, cfg.d_model
    g_loc = max(1, g // model)
    in_loc = 2 * e // model + 2 * g_loc * n + h // model
    b = -(-2 // data) * data  # the layer-wise batch of 2, padded to the data axis
    l = 2 * max(cfg.decode_lengths) + 5
    assert mesh_runs[case_id(case)]["layout"] == {"heads": h // model, "groups": g_loc,
                                                  "share": max(1, model // g)}
    expect = {
        "in_proj": ("(None, 'model')", [(d, in_loc)]),
        "out_proj": ("('model', None)", [(e // model, d)]),
        "conv_w": ("(None, 'model')", [(cfg.conv_kernel, in_loc - e // model - h // model)]),
        "A_log": ("('model',)", [(h // model,)]),
        "tap layers.0.mixer.in_proj": ("('data', None, 'model')", [(b // data, l, in_loc)]),
        "tap layers.0.mixer.ssm": ("('data', None, 'model')", [(b // data, l, e // model)]),
        "tap layers.0.mixer.gated_norm": ("('data', None, 'model')", [(b // data, l, e // model)]),
        "tap layers.0": ("('data',)", [(b // data, l, d)]),
        "tap logits": ("('data',)", [(b // data, l, cfg.vocab_size)]),
    }
    if case in FULL:  # the decode batch's cache, its rows padded to the data axis too
        rows = -(-mesh_runs[case_id(case)]["decode_batch"] // data)
        expect["cache ssm"] = ("(None, 'data', 'model')", [(cfg.n_layers, rows, h // model, cfg.head_dim, n)])
    for key, (spec, shapes) in expect.items():
        got = (_spec(s[key]["spec"], data, model), s[key]["shapes"])
        assert got == (_spec(spec, data, model), [list(x) for x in shapes]), (key, s[key])
        assert s[key]["devices"] == data * model, (key, s[key])
    for key in ("embed", "norm"):
        assert s[key]["replicated"] and s[key]["devices"] == data * model, (key, s[key])


def test_a_one_device_mesh_is_the_identity(mesh_runs):
    assert mesh_runs["identity_max_abs"] == 0.0


# ---------------------------------------------------------------------------------------------
# no second device needed


def test_layout_refuses_in_one_line_and_lays_whole_heads_per_device():
    import dataclasses

    from equiv.mamba2.sharding import MeshError, layout

    cfg = _config("tiny-g2")  # h=8, g=2, n=16, p=16
    with pytest.raises(MeshError, match=r"--mesh 1x3: expected a model axis that divides num_heads = 8"):
        layout(cfg, 1, 3, devices=8)
    with pytest.raises(MeshError, match=r"--mesh 2x8: expected data x model <= the 8 .* device\(s\).*got 16"):
        layout(cfg, 2, 8, devices=8)
    twelve = dataclasses.replace(cfg, n_heads=12, n_groups=3, head_dim=8, d_model=48)
    with pytest.raises(MeshError, match=r"--mesh 1x4: expected a model axis that divides n_groups = 3 or"):
        layout(twelve, 1, 4, devices=8)
    lay = layout(cfg, 1, 8, devices=8)  # a group's 4 heads over 4 devices: its B and C on each
    e, gn = cfg.d_inner, cfg.n_groups * cfg.d_state
    per = 2 * e // 8 + 2 * cfg.d_state + 1
    for k in range(8):
        cols = lay.in_cols[k * per:(k + 1) * per].tolist()
        group = k // 4
        B = list(range(2 * e + group * 16, 2 * e + group * 16 + 16))
        assert cols == (list(range(k * 16, k * 16 + 16)) + list(range(e + k * 16, e + k * 16 + 16)) + B
                        + [c + gn for c in B] + [2 * e + 2 * gn + k]), k
    assert (lay.in_cols[lay.in_natural] == range(cfg.in_proj_dim)).all()
    assert (lay.conv_cols[lay.conv_natural] == range(cfg.conv_dim)).all()


def _run_cli(capsys, *argv):
    from equiv.cli import main

    code = main([str(a) for a in argv])
    return code, *capsys.readouterr()


@pytest.mark.parametrize("argv, fragments", [
    (["--mesh", "2"], ["--mesh 1x2: expected data x model <= the 1", "XLA_FLAGS=--xla_force_host_platform"]),
    (["--mesh", "3"], ["--mesh 1x3: expected a model axis that divides num_heads = 8"]),
    (["--mesh", "0"], ["argument --mesh: expected MODEL or DATAxMODEL", "'0'"]),
    (["--mesh", "2x4x1"], ["argument --mesh: expected MODEL or DATAxMODEL"]),
])
def test_diff_mesh_errors_are_one_line_exit_2(capsys, argv, fragments):
    if jax_devices() > 1:
        pytest.skip("expects a process with one device (the default on CPU)")
    code, out, err = _run_cli(capsys, "diff", ROOT / "fixtures" / "tiny-g2", *argv)
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err, err
    assert lines[-1].startswith("equiv: error: ") or lines[-1].startswith("equiv diff: error: "), err
    for f in fragments:
        assert f in lines[-1], (f, lines[-1])


def test_diff_mesh_refuses_a_mamba1_checkpoint(capsys):
    code, out, err = _run_cli(capsys, "diff", ROOT / "fixtures" / "mamba1-tiny-oddrank", "--mesh", "1")
    line = err.strip().splitlines()[-1]
    assert code == 2, err
    assert "expected a checkpoint of a family with a sharded port (Mamba-2), got Mamba-1" in line, err


def jax_devices() -> int:
    import jax

    return jax.device_count()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _child(sys.argv[1])
