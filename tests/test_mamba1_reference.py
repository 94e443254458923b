"""The Mamba-1 / Falcon-Mamba reference runner (equiv_reference/mamba1/transformers_runner.py) on the tiny
fixtures and the trained byte model: every tap with its documented shape; hooked and recomputed taps
against what the model computed and against hand computations; the cache against the full forward;
generate against transformers' own; which scan ran, and refusal of any other; left padding; the
float64 oracle really float64; the fixtures' claimed edge cases."""

from __future__ import annotations

import hashlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from equiv.errors import ConfigError, ReferenceChanged
from equiv.mamba1.taps import tap_names
from equiv_reference import byte_tokenizer as tok

torch = pytest.importorskip("torch")
F = torch.nn.functional

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
TINY = ("mamba1-tiny-oddrank", "mamba1-tiny-untied-bias", "mamba1-tiny-noconvbias", "falcon-mamba-tiny")
NO_BIAS = ("mamba1-tiny-oddrank", "mamba1-tiny-noconvbias", "falcon-mamba-tiny")
TRAINED = FIXTURES / "mamba1-trained-bytes"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as the harness runs references (equiv.references.DEFAULT_THREADS)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def runners():
    """{(fixture, dtype, lift): runner}, built on demand and shared by the module's tests."""
    from equiv_reference.mamba1.transformers_runner import MambaTransformersRunner

    cache = {}

    def get(fixture, dtype="float32", lift=None):
        if (fixture, dtype, lift) not in cache:
            cache[(fixture, dtype, lift)] = MambaTransformersRunner(FIXTURES / fixture, dtype,
                                                                    lift_float32_casts=lift)
        return cache[(fixture, dtype, lift)]

    return get


def fresh(fixture, dtype="float32"):
    """A runner of its own, for tests that change its model or count its calls."""
    from equiv_reference.mamba1.transformers_runner import MambaTransformersRunner

    return MambaTransformersRunner(FIXTURES / fixture, dtype)


def _cfg(fixture):
    return json.loads((FIXTURES / fixture / "config.json").read_text())


def _ids(b, l, seed=0, vocab=96):
    return np.random.default_rng(seed).integers(3, vocab, (b, l)).astype(np.int32)


def _left_pad(seqs, width):
    ids, mask = np.zeros((len(seqs), width), np.int32), np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):], mask[i, width - len(s):] = s, 1
    return ids, mask


def _padded_batch(l=20):
    seqs = [_ids(1, 6, seed=1)[0], _ids(1, l, seed=2)[0], _ids(1, 13, seed=3)[0]]
    return seqs, *_left_pad(seqs, l)


def _rel(a, b):
    b = np.asarray(b, np.float64)
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _softplus(x):
    return np.logaddexp(0.0, x)


def _param(runner, name):
    return dict(runner.model.named_parameters())[name].detach().double().numpy()


# ---------------------------------------------------------------------------------------------
# taps


@pytest.mark.parametrize("fixture", TINY)
def test_every_tap_has_its_documented_shape_and_dtype(runners, fixture):
    cfg = _cfg(fixture)
    d, v, n, r = cfg["hidden_size"], cfg["vocab_size"], cfg["state_size"], cfg["time_step_rank"]
    e = cfg["expand"] * d
    width = {"embed": d, "norm": d, "mixer.in_proj": 2 * e, "mixer.conv": e, "mixer.x_proj.dt": r,
             "mixer.x_proj.B": n, "mixer.x_proj.C": n, "mixer.dt_proj": e, "mixer.ssm": e, "mixer.gate": e,
             "mixer.out_proj": d, "block": d, "norm_f": d, "logits": v}
    b, l = 2, 11
    for dtype, np_dtype in (("float32", np.float32), ("float64", np.float64), ("bfloat16", np.float32)):
        taps = runners(fixture, dtype).run(_ids(b, l, vocab=v))
        assert list(taps) == tap_names(cfg["num_hidden_layers"])
        for name, arr in taps.items():
            key = (name.split(".", 2)[2] if name.count(".") >= 2
                   else "block" if name.startswith("layers.") else name)
            assert arr.shape == (b, l, width[key]), (dtype, name, arr.shape)
            assert arr.dtype == np_dtype, (dtype, name, arr.dtype)
            assert np.isfinite(arr).all(), (dtype, name)


@pytest.mark.parametrize("fixture", TINY)
def test_hooked_and_recomputed_taps_are_what_the_model_computed(runners, fixture):
    """float32, left-padded: logits are the model's own output (called outside the runner); the gate
    tap, captured as out_proj's input inside the scan's caller, is exactly the recomputed ssm tap times
    silu(z); each block output is exactly its residual plus its mixer output."""
    r = runners(fixture)
    _, ids, mask = _padded_batch()
    taps = r.run(ids, mask)
    with torch.no_grad():
        own = r.model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
    np.testing.assert_array_equal(taps["logits"], own.logits.numpy())
    e = taps["layers.0.mixer.ssm"].shape[-1]
    for i in range(r.n_layers):
        z = torch.from_numpy(taps[f"layers.{i}.mixer.in_proj"][..., e:])
        gated = torch.from_numpy(taps[f"layers.{i}.mixer.ssm"]) * F.silu(z)
        np.testing.assert_array_equal(taps[f"layers.{i}.mixer.gate"], gated.numpy())
        residual = taps[f"layers.{i - 1}"] if i else taps["embed"]
        np.testing.assert_array_equal(taps[f"layers.{i}"], residual + taps[f"layers.{i}.mixer.out_proj"])
    assert np.abs(taps["layers.0.mixer.ssm"] - taps["layers.0.mixer.gate"]).max() > 0.1  # a gate was applied


@pytest.mark.parametrize("fixture", TINY)
def test_taps_agree_with_a_hand_computed_mixer(runners, fixture):
    """float64, left-padded: conv (causal, + bias, SiLU, padded positions zeroed), dt/B/C (Falcon-Mamba:
    RMS-normed with mixer_rms_eps), dt_proj (with its bias) and the ssm tap (a numpy sequential scan
    with D) recomputed from the runner's own upstream taps and the checkpoint's weights."""
    r = runners(fixture, "float64")
    cfg = _cfg(fixture)
    _, ids, mask = _padded_batch()
    taps = r.run(ids, mask)
    e, k = cfg["expand"] * cfg["hidden_size"], cfg["conv_kernel"]
    r_, n, (b, l) = cfg["time_step_rank"], cfg["state_size"], ids.shape
    for i in range(cfg["num_hidden_layers"]):
        p = f"backbone.layers.{i}.mixer."
        x = taps[f"layers.{i}.mixer.in_proj"][..., :e]
        w = _param(r, p + "conv1d.weight")[:, 0, :]
        padded = np.concatenate([np.zeros((b, k - 1, e)), x], axis=1)
        conv = sum(padded[:, j:j + l] * w[:, j] for j in range(k))
        if cfg["use_conv_bias"]:
            conv = conv + _param(r, p + "conv1d.bias")
        conv = _silu(conv) * mask[..., None]
        assert _rel(taps[f"layers.{i}.mixer.conv"], conv) < 1e-12
        assert (taps[f"layers.{i}.mixer.conv"][mask == 0] == 0).all()

        dt, B, C = np.split(conv @ _param(r, p + "x_proj.weight").T, [r_, r_ + n], axis=-1)
        if cfg["model_type"] == "falcon_mamba":
            eps = cfg["mixer_rms_eps"]
            dt, B, C = (t / np.sqrt((t * t).mean(-1, keepdims=True) + eps) for t in (dt, B, C))
        for name, hand in (("dt", dt), ("B", B), ("C", C)):
            assert _rel(taps[f"layers.{i}.mixer.x_proj.{name}"], hand) < 1e-12, name
        dt_proj = taps[f"layers.{i}.mixer.x_proj.dt"] @ _param(r, p + "dt_proj.weight").T \
            + _param(r, p + "dt_proj.bias")
        assert _rel(taps[f"layers.{i}.mixer.dt_proj"], dt_proj) < 1e-12

        delta, A = _softplus(taps[f"layers.{i}.mixer.dt_proj"]), -np.exp(_param(r, p + "A_log"))
        xs, Bs, Cs = conv, taps[f"layers.{i}.mixer.x_proj.B"], taps[f"layers.{i}.mixer.x_proj.C"]
        state, ys = np.zeros((b, e, n)), []
        for t in range(l):
            dBx = (delta[:, t] * xs[:, t])[..., None] * Bs[:, t, None]
            state = np.exp(delta[:, t, :, None] * A) * state + dBx
            ys.append(np.einsum("ben,bn->be", state, Cs[:, t]))
        ssm = np.stack(ys, axis=1) + xs * _param(r, p + "D")
        assert _rel(taps[f"layers.{i}.mixer.ssm"], ssm) < 1e-10


# ---------------------------------------------------------------------------------------------
# the cache, generate


@pytest.mark.parametrize("fixture", TINY)
def test_step_logits_start_at_the_full_forward_and_follow_it(runners, fixture):
    """Prompt lengths straddling conv_kernel (where the cached conv state starts to hold real tokens):
    the first row is run()'s logits at prompt_len - 1 (float32: the same code on a shorter input, so
    only the matmuls' blocking differs), and in float64 every decode step equals the full forward."""
    k = _cfg(fixture)["conv_kernel"]
    ids = _ids(2, 2 * k + 3, seed=4)
    full32, full64 = runners(fixture).run(ids)["logits"], runners(fixture, "float64").run(ids)["logits"]
    for prompt_len in (1, k - 1, k, k + 1, ids.shape[1]):
        s32 = runners(fixture).step_logits(ids, None, prompt_len)
        assert s32.shape == (2, ids.shape[1] - prompt_len + 1, full32.shape[-1])
        assert _rel(s32[:, 0], full32[:, prompt_len - 1]) < 1e-6, prompt_len
        s64 = runners(fixture, "float64").step_logits(ids, None, prompt_len)
        assert _rel(s64, full64[:, prompt_len - 1:]) < 1e-12, prompt_len


@pytest.mark.parametrize("fixture", NO_BIAS)
def test_step_logits_after_a_left_padded_prompt(runners, fixture):
    r = runners(fixture, "float64")
    ids, mask = _left_pad([_ids(1, 5, seed=5)[0], _ids(1, 12, seed=6)[0]], 12)
    ids = np.concatenate([ids, _ids(2, 6, seed=7)], axis=1)
    mask = np.concatenate([mask, np.ones((2, 6), np.int32)], axis=1)
    assert _rel(r.step_logits(ids, mask, 12), r.run(ids, mask)["logits"][:, 11:]) < 1e-12


@pytest.mark.parametrize("fixture", ("mamba1-tiny-untied-bias", "falcon-mamba-tiny"))
def test_generate_equals_transformers_own_greedy_generate(runners, fixture):
    """The runner's generate against `model.generate` called directly (no recorder, no shims) on a
    left-padded batch, with an eos that one row emits mid-way."""
    r = runners(fixture)
    _, ids, mask = _padded_batch()

    def own(eos):
        with torch.no_grad():
            out = r.model.generate(input_ids=torch.from_numpy(ids).long(),
                                   attention_mask=torch.from_numpy(mask).long(), do_sample=False,
                                   max_new_tokens=12, eos_token_id=eos, pad_token_id=r.pad_id,
                                   output_logits=True, return_dict_in_generate=True)
        top2 = torch.stack(out.logits, dim=1).double().topk(2, dim=-1).values
        return out.sequences[:, ids.shape[1]:].numpy(), (top2[..., 0] - top2[..., 1]).numpy()

    ours = r.generate(ids, mask, 12)
    tokens, margins = own(None)
    np.testing.assert_array_equal(ours.tokens, tokens)
    np.testing.assert_allclose(ours.margins, margins, rtol=0, atol=1e-5)
    assert ours.steps == 12 and len({int(t) for t in tokens.ravel()}) > 5  # not one repeated token

    eos = int(tokens[0, 4])
    ours = r.generate(ids, mask, 12, eos_id=eos)
    tokens, _ = own(eos)
    np.testing.assert_array_equal(ours.tokens, tokens)
    first = int(np.argmax(tokens[0] == eos))
    assert (tokens[0, first + 1:] == r.pad_id).all() and np.isnan(ours.margins[0, first + 1:]).all()


# ---------------------------------------------------------------------------------------------
# which code ran


def test_provenance_names_the_sequential_scan_that_ran():
    r = fresh("mamba1-tiny-oddrank")
    assert r.provenance()["code_paths"]["scan"]["implementation"] == "not run yet"
    ids = _ids(2, 9)
    r.run(ids)
    r.step_logits(ids, None, 5)
    p = r.provenance()
    scan = p["code_paths"]["scan"]
    assert scan["implementation"] == "sequential loop"
    assert scan["calls_by_branch"] == {"sequential loop": 4}  # run + prefill, 2 layers each
    functions = p["code_paths"]["functions"]
    assert functions["state_update"]["calls"] == functions["conv_update"]["calls"] == 4 * 2  # 4 steps
    assert all(f["ran"] in ("torch fallback", "not called") for f in functions.values())
    assert functions["fused_training_path"]["ran"] == "not called"  # eval mode
    import transformers

    assert p["class"] == "transformers.models.mamba.modeling_mamba.MambaForCausalLM"
    assert p["module_file"] == "transformers/models/mamba/modeling_mamba.py"
    assert p["versions"]["transformers"] == transformers.__version__
    assert (p["dtype"], p["device"], p["threads"], p["float64_lift"]) == ("float32", "cpu", 1, None)
    json.dumps(p)  # a report can embed it

    falcon = fresh("falcon-mamba-tiny", "float64")
    falcon.run(ids)
    p = falcon.provenance()
    assert p["class"].endswith("modeling_falcon_mamba.FalconMambaForCausalLM")
    assert p["code_paths"]["scan"]["implementation"] == "sequential loop"
    assert p["float64_lift"]["active"] and p["tap_map"]["layers.{i}.mixer.x_proj.B"].startswith(
        "backbone.layers.{i}.mixer.b_layernorm")


def _fake_mambapy():
    """A stand-in `mambapy.pscan` (the real package is not a dependency) computing the same recurrence,
    so that only the branch the scan takes differs."""

    def pscan(A, X):  # (b, l, e, n) each
        states, h = [], torch.zeros_like(X[:, 0])
        for t in range(X.shape[1]):
            h = A[:, t] * h + X[:, t]
            states.append(h)
        return torch.stack(states, dim=1)

    package, module = types.ModuleType("mambapy"), types.ModuleType("mambapy.pscan")
    module.pscan, package.pscan = pscan, module
    return package, module


def test_a_scan_other_than_the_sequential_loop_is_refused(monkeypatch):
    """With mambapy importable and use_mambapy on, transformers' scan takes mambapy's parallel scan:
    the runner sees it (line tracer) and refuses in one line; the same runner is fine without it."""
    r = fresh("mamba1-tiny-oddrank")
    ids = _ids(1, 7)
    package, module = _fake_mambapy()
    monkeypatch.setitem(sys.modules, "mambapy", package)
    monkeypatch.setitem(sys.modules, "mambapy.pscan", module)
    monkeypatch.setattr(r.mm, "is_mambapy_available", lambda: True)
    for block in r.model.backbone.layers:
        monkeypatch.setattr(block.mixer, "use_mambapy", True)
    with pytest.raises(ReferenceChanged) as e:
        r.run(ids)
    message = str(e.value)
    assert "\n" not in message and "pscan" in message and "sequential loop" in message
    assert "transformers " in message
    assert r.provenance()["code_paths"]["scan"]["calls_by_branch"]["mambapy parallel scan (pscan)"] == 2
    monkeypatch.undo()
    r.run(ids)  # the sequential loop again


def test_a_changed_module_structure_is_refused():
    """A library that stops calling a hooked module (here Falcon-Mamba's B norm replaced by a plain
    function) leaves a tap uncaptured: refused by name, never returned half-filled."""
    r = fresh("falcon-mamba-tiny")
    mixer = r.model.backbone.layers[1].mixer
    norm = mixer.b_layernorm
    del mixer.b_layernorm
    mixer.b_layernorm = norm.forward  # same values, no module call, so no hook
    with pytest.raises(ReferenceChanged, match=r"tap layers\.1\.mixer\.x_proj\.B: .*hook never fired"):
        r.run(_ids(1, 5))
    with pytest.raises(ReferenceChanged, match=r"no module backbone\.layers\.1\.mixer\.b_layernorm"):
        r._resolve_modules()


def test_bad_arguments_are_refused_in_one_line(tmp_path):
    from equiv_reference.mamba1.transformers_runner import MambaTransformersRunner, ReferenceError

    with pytest.raises(ReferenceError, match="dtype"):
        MambaTransformersRunner(FIXTURES / "mamba1-tiny-oddrank", "float16")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba2"}))
    with pytest.raises(ConfigError, match="model_type"):
        MambaTransformersRunner(tmp_path)
    with pytest.raises(ReferenceError, match="prompt_len"):
        fresh("mamba1-tiny-oddrank").step_logits(_ids(1, 4), None, 5)


# ---------------------------------------------------------------------------------------------
# padding, the float64 oracle


@pytest.mark.parametrize("fixture", NO_BIAS)
def test_left_padded_rows_equal_each_sequence_alone(runners, fixture):
    r = runners(fixture, "float64")
    seqs, ids, mask = _padded_batch()
    batch = r.run(ids, mask)
    for row, seq in enumerate(seqs):
        alone = r.run(seq[None])
        real = slice(ids.shape[1] - len(seq), None)
        for name, arr in alone.items():
            assert _rel(batch[name][row, real], arr[0]) < 1e-12, (row, name)


def test_use_bias_leaks_padding_into_the_conv(runners):
    """The reference's own defect, pinned (the port must mirror it): the mixer masks in_proj's input,
    not its output, so with use_bias a padded position's in_proj output is the bias and reaches the
    conv of the first conv_kernel - 1 real tokens."""
    r = runners("mamba1-tiny-untied-bias", "float64")
    seqs, ids, mask = _padded_batch()
    batch, alone = r.run(ids, mask), r.run(seqs[0][None])
    start, k = ids.shape[1] - len(seqs[0]), _cfg("mamba1-tiny-untied-bias")["conv_kernel"]
    np.testing.assert_array_equal(batch["layers.0.mixer.in_proj"][0, 0],
                                  _param(r, "backbone.layers.0.mixer.in_proj.bias"))
    conv_batch, conv_alone = batch["layers.0.mixer.conv"][0, start:], alone["layers.0.mixer.conv"][0]
    assert _rel(conv_batch[:k - 1], conv_alone[:k - 1]) > 1e-3
    assert _rel(conv_batch[k - 1:], conv_alone[k - 1:]) < 1e-12
    assert "use_bias=True" in r.provenance()["known_reference_defects"][0]


class _Float32Spotter(torch.overrides.TorchFunctionMode):
    """Records every torch call that returns a float32 / bfloat16 / float16 tensor."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype in (torch.float32, torch.bfloat16, torch.float16):
                self.seen.add(getattr(func, "__name__", str(func)))
        return out


@pytest.mark.parametrize("fixture", ("mamba1-tiny-oddrank", "falcon-mamba-tiny"))
def test_the_float64_oracle_is_float64_throughout(runners, fixture):
    """No torch call of a lifted float64 forward or cached decode returns a float32 tensor; the
    library's literal float64 does (its internal casts). The oracle agrees with float32 to ~1e-6
    relative, matches a float64 RMSNorm by hand, and records the casts it lifted."""
    ids = _ids(2, 9)
    lifted = runners(fixture, "float64")
    literal = runners(fixture, "float64", False)
    seen = {}
    for name, r in (("lifted", lifted), ("literal", literal)):
        with _Float32Spotter() as spot:
            taps = r.run(ids)
            r.step_logits(ids, None, 5)
        seen[name] = spot.seen
        assert all(a.dtype == np.float64 for a in taps.values())
    assert seen["lifted"] == set()
    assert {"float", "to"} & seen["literal"], seen["literal"]

    t64, t32 = lifted.run(ids), runners(fixture).run(ids)
    errs = {name: _rel(t32[name], t64[name]) for name in t64}
    assert 0 < max(errs.values()) < 5e-6, errs

    x = t64["embed"]
    w = _param(lifted, "backbone.layers.0.norm.weight")
    hand = w * x / np.sqrt((x * x).mean(-1, keepdims=True) + _cfg(fixture)["layer_norm_epsilon"])
    assert _rel(t64["layers.0.norm"], hand) < 1e-14
    assert _rel(literal.run(ids)["layers.0.norm"], hand) > 1e-10

    source = Path(lifted.mm.__file__).read_text().splitlines()
    sites = lifted.provenance()["float64_lift"]["lifted_casts"]
    lines = {source[int(site.rsplit(":", 1)[1]) - 1].strip() for site in sites}
    assert all(".float()" in s or "torch.float32" in s for s in lines), lines
    for cast in ("A_log.float()", "B[:, None, :, :].float()", "residual.to(torch.float32)",
                 "hidden_states.to(torch.float32)", "dt.float()"):
        assert any(cast in s for s in lines), cast
    assert literal.provenance()["float64_lift"] == {"active": False, "lifted_casts": {}}


# ---------------------------------------------------------------------------------------------
# the fixtures


CLAIMS = {
    "mamba1-tiny-oddrank": dict(model_type="mamba", time_step_rank=5, tie_word_embeddings=True,
                                use_conv_bias=True, residual_in_fp32=True, use_bias=False),
    "mamba1-tiny-untied-bias": dict(model_type="mamba", tie_word_embeddings=False, use_bias=True,
                                    residual_in_fp32=False),
    "mamba1-tiny-noconvbias": dict(model_type="mamba", use_conv_bias=False, conv_kernel=3),
    "falcon-mamba-tiny": dict(model_type="falcon_mamba", mixer_rms_eps=1e-6),
}


@pytest.mark.parametrize("fixture", TINY)
def test_fixtures_load_and_have_the_edge_cases_they_claim(fixture):
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    cfg = _cfg(fixture)
    assert {k: cfg.get(k) for k in CLAIMS[fixture]} == CLAIMS[fixture]
    assert cfg["num_hidden_layers"] == 2 and cfg["vocab_size"] == 96 and 32 <= cfg["hidden_size"] <= 64
    assert 8 <= cfg["state_size"] <= 16 and cfg["expand"] == 2 and not cfg["use_mambapy"]
    assert cfg["time_step_rank"] % 2 == 1 if fixture == "mamba1-tiny-oddrank" else True
    generator = json.loads((FIXTURES / fixture / "generator.json").read_text())
    assert all(cfg[k] == v for k, v in generator["params"].items()), generator["params"]
    assert generator["seed"] and generator["purpose"] and "transformers" in generator["versions"]

    model = AutoModelForCausalLM.from_pretrained(FIXTURES / fixture)
    assert type(model).__name__ == ("FalconMambaForCausalLM" if cfg["model_type"] == "falcon_mamba"
                                    else "MambaForCausalLM")
    weights = load_file(FIXTURES / fixture / "model.safetensors")
    assert ("lm_head.weight" in weights) == (not cfg["tie_word_embeddings"])
    assert ("backbone.layers.0.mixer.conv1d.bias" in weights) == cfg["use_conv_bias"]
    assert ("backbone.layers.0.mixer.in_proj.bias" in weights) == cfg["use_bias"]
    assert ("backbone.layers.0.mixer.out_proj.bias" in weights) == cfg["use_bias"]
    assert weights["backbone.layers.0.mixer.conv1d.weight"].shape[-1] == cfg["conv_kernel"]
    x_proj_rows = weights["backbone.layers.0.mixer.x_proj.weight"].shape[0]
    assert x_proj_rows == cfg["time_step_rank"] + 2 * cfg["state_size"]
    for i in range(2):
        p = f"backbone.layers.{i}.mixer."
        dt = _softplus(weights[p + "dt_proj.bias"].astype(np.float64))
        assert 0.99e-3 <= dt.min() and dt.max() <= 1.01e-1 and dt.max() / dt.min() > 20
        log_n = np.log(np.arange(1, cfg["state_size"] + 1))
        assert np.abs(weights[p + "A_log"] - log_n).max() <= 0.3 + 1e-6
        assert np.abs(weights[p + "A_log"] - log_n).std() > 0.05  # channels decay differently
        assert abs(weights[p + "D"].mean() - 1) < 0.1 and weights[p + "D"].std() > 0.1


@pytest.mark.parametrize("fixture", TINY)
def test_fixtures_regenerate_bit_for_bit(tmp_path, fixture):
    from equiv_reference.mamba1.make_fixtures import SPECS, write_fixture

    out = write_fixture(next(s for s in SPECS if s.name == fixture), tmp_path)
    for name in ("config.json", "model.safetensors"):
        got, want = ((d / name).read_bytes() for d in (out, FIXTURES / fixture))
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(want).hexdigest(), name


# ---------------------------------------------------------------------------------------------
# the trained byte model


@pytest.fixture(scope="module")
def record():
    return json.loads((TRAINED / "training.json").read_text())


def test_trained_fixture_files_config_and_record(record):
    names = {p.name for p in TRAINED.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "training.json"} <= names
    assert sum(p.stat().st_size for p in TRAINED.iterdir()) < 10 * 2**20
    cfg = json.loads((TRAINED / "config.json").read_text())
    assert cfg["model_type"] == "mamba"
    assert (cfg["vocab_size"], cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (
        tok.VOCAB_SIZE, tok.BOS_ID, tok.EOS_ID, tok.PAD_ID)
    assert 0.5e6 <= record["parameters"] <= 2e6
    assert (record["eos_id"], record["pad_id"]) == (tok.EOS_ID, tok.PAD_ID)  # the decode plan reads these
    mamba2_keys = set(json.loads((FIXTURES / "trained-bytes" / "training.json").read_text()))
    assert mamba2_keys <= set(record), mamba2_keys - set(record)
    assert record["final"]["heldout_bits_per_byte"] < 3.0  # uniform bytes: 8; this is text
    assert record["total_wall_s"] <= 360 and record["threads"] == 1
    assert record["reference_path"]["evaluation_scan"]["implementation"] == "sequential loop"


def test_trained_model_decodes_today_what_it_decoded_when_trained(record):
    from equiv_reference.mamba1.transformers_runner import MambaTransformersRunner

    r = MambaTransformersRunner(TRAINED)
    for row in record["decodes"][:2]:
        out = r.generate(np.asarray([tok.encode(row["prompt"])], np.int32), None, 64, eos_id=tok.EOS_ID)
        got = out.tokens[0, :len(row["continuation_ids"])].tolist()
        assert got == row["continuation_ids"], row["prompt"]
        assert np.nanmedian(out.margins) > 0.5


def test_training_scan_equals_transformers_sequential_scan():
    """The training-time substitute (O(l) backward) computes what transformers' torch body computes:
    outputs, last state and gradients, in float64 (the body's `.float()` casts lifted, else they round
    B and x to float32)."""
    from equiv_reference.float64_oracle import Float64Lift
    from equiv_reference.mamba1.provenance import SCAN, DispatchRecorder, import_modeling
    from equiv_reference.mamba1.train_byte_model import training_scan

    body = DispatchRecorder(import_modeling("mamba")).torch_body(SCAN)
    g = torch.Generator().manual_seed(0)
    b, e, l, n = 2, 6, 9, 4
    args = [torch.randn(b, e, l, generator=g, dtype=torch.float64, requires_grad=True),  # x
            torch.randn(b, e, l, generator=g, dtype=torch.float64, requires_grad=True),  # dt
            -torch.rand(e, n, generator=g, dtype=torch.float64).add(0.5).requires_grad_(),  # A
            torch.randn(b, n, l, generator=g, dtype=torch.float64, requires_grad=True),  # B
            torch.randn(b, n, l, generator=g, dtype=torch.float64, requires_grad=True)]  # C
    kw = dict(D=torch.randn(e, dtype=torch.float64), z=torch.randn(b, e, l, dtype=torch.float64),
              delta_bias=torch.randn(e, dtype=torch.float64), delta_softplus=True, return_last_state=True)
    outs = []
    for fn in (body, training_scan):
        with Float64Lift():
            y, state = fn(*args, **kw)
        grads = torch.autograd.grad((y * y).sum() + state.sum(), args)
        outs.append([y, state, *grads])
    for want, got in zip(*outs, strict=True):
        assert _rel(got.detach().numpy(), want.detach().numpy()) < 1e-12
