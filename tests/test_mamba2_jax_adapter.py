"""The mamba2-jax adapter (equiv/mamba2/mamba2_jax_adapter.py) against the built-in port on tiny checkpoints.

Both ports compute the same Mamba-2 in float32 with different op orders (and mamba2-jax's
cumsum-difference segsum, docs/porting-bugs.md #10), so they agree to float32 rounding, not bit for
bit: measured worst tap difference ~5e-6 of the tap's scale on these checkpoints. The bound below
(5e-5 of scale) leaves 10x for other CPUs while any real defect (wrong gate order, a missing D skip,
a wrong group mapping) moves a tap by O(1) of its scale.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import jax
import numpy as np
import pytest

from equiv.errors import ConfigError
from equiv.io.safetensors_io import write_safetensors
from equiv.mamba2.mamba2_jax_adapter import Mamba2JaxPort
from equiv.ports import PortError, TapUnavailable

pytestmark = [
    pytest.mark.needs_mamba2_jax,
    pytest.mark.skipif(importlib.util.find_spec("mamba2_jax") is None,
                       reason="mamba2-jax not installed (pip install 'ssm-equiv[mamba2-jax]')"),
]

REL_TOL = 5e-5  # of the tap's max |value|; see the module docstring for the measurement behind it


def write_tiny_checkpoint(path, *, n_groups=1, tie=True, use_bias=False, seed=0, **config):
    """A transformers-format checkpoint (config.json + model.safetensors) with weights scaled so the
    dynamics are not trivial: decays in (0, 3], dt_bias ~ N(0, 1), matmul weights ~ N(0, 0.3^2)."""
    rng = np.random.default_rng(seed)
    v, d, n_layers, n, p, h, k = 96, 64, 2, 16, 16, 8, 4
    e = 2 * d
    conv_dim, in_dim = e + 2 * n_groups * n, 2 * e + 2 * n_groups * n + h
    raw = dict(model_type="mamba2", vocab_size=v, hidden_size=d, num_hidden_layers=n_layers, state_size=n,
               head_dim=p, num_heads=h, n_groups=n_groups, expand=2, conv_kernel=k, chunk_size=16,
               tie_word_embeddings=tie, use_bias=use_bias, use_conv_bias=True, layer_norm_epsilon=1e-5,
               residual_in_fp32=True, eos_token_id=0, pad_token_id=1) | config
    w = lambda *shape, scale=0.3: (rng.standard_normal(shape) * scale).astype(np.float32)  # noqa: E731
    t = {"backbone.embeddings.weight": w(v, d, scale=1.0), "backbone.norm_f.weight": 1 + w(d, scale=0.1)}
    if not tie:
        t["lm_head.weight"] = w(v, d)
    for i in range(n_layers):
        pre = f"backbone.layers.{i}"
        t |= {f"{pre}.norm.weight": 1 + w(d, scale=0.1), f"{pre}.mixer.in_proj.weight": w(in_dim, d),
              f"{pre}.mixer.conv1d.weight": w(conv_dim, 1, k), f"{pre}.mixer.conv1d.bias": w(conv_dim),
              f"{pre}.mixer.dt_bias": w(h, scale=1.0), f"{pre}.mixer.D": w(h, scale=1.0),
              f"{pre}.mixer.A_log": np.log(rng.uniform(0.05, 3.0, h)).astype(np.float32),
              f"{pre}.mixer.norm.weight": 1 + w(e, scale=0.1), f"{pre}.mixer.out_proj.weight": w(d, e)}
        if use_bias:
            t |= {f"{pre}.mixer.in_proj.bias": w(in_dim), f"{pre}.mixer.out_proj.bias": w(d)}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(raw))
    write_safetensors(path / "model.safetensors", t)
    return path


@pytest.fixture(autouse=True)
def strict_rank_promotion():
    """The adapter must work under the suite's strict setting (it relaxes it only around the package)."""
    with jax.numpy_rank_promotion("raise"):
        yield


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    from equiv.mamba2.port import Mamba2Port

    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-g1"))
    return Mamba2JaxPort().load(ckpt), Mamba2Port().load(ckpt)


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(1).integers(0, 96, (2, 40))  # 40 = two full chunks of 16 and a partial one


def assert_close_to_scale(name, got, want):
    scale = float(np.abs(want).max())
    worst = float(np.abs(got - want).max())
    assert worst <= REL_TOL * scale, f"{name}: max |adapter - builtin| = {worst:.3g}, scale {scale:.3g}"


def test_every_provided_tap_matches_the_builtin_port(tiny_pair, ids):
    adapter, builtin = tiny_pair
    got, want = adapter.forward(ids), builtin.forward(ids)
    assert list(got) == adapter.tap_names and adapter.tap_names[-1] == "logits"
    assert "layers.0.mixer.ssm" not in got  # not observable in the package: left for the harness to list
    for name in adapter.tap_names:
        assert got[name].shape == want[name].shape, name
        assert_close_to_scale(name, got[name], want[name])


def test_cached_decode_matches_the_builtin_port(tiny_pair, ids):
    adapter, builtin = tiny_pair
    got_steps, want_steps = adapter.step_logits(ids, None, 20), builtin.step_logits(ids, None, 20)
    assert_close_to_scale("step_logits", got_steps, want_steps)
    got = adapter.generate(ids[:, :20], None, 12)
    # the built-in port teacher-forced on the adapter's own tokens must predict each of them
    # (same prompt length as above: no new compilation on either side)
    fed = np.concatenate([ids[:, :20], got.tokens[:, :-1]], axis=1)
    want = builtin.step_logits(fed, None, 20)  # b 12 v
    top2 = np.sort(want, axis=-1)[..., -2:]
    assert (top2[..., 1] - top2[..., 0]).min() > 1e-3  # decisive steps: equal tokens are required, not luck
    np.testing.assert_array_equal(got.tokens, want.argmax(-1))
    np.testing.assert_allclose(got.margins, top2[..., 1] - top2[..., 0], rtol=0, atol=1e-3)


def test_generate_stops_at_eos_and_pads_after_it(tiny_pair, ids):
    adapter, _ = tiny_pair
    first = adapter.generate(ids[:, :20], None, 6)
    eos = int(first.tokens[0, 2])  # sequence 0 emits it by step 3; sequence 1 may never
    stopped = adapter.generate(ids[:, :20], None, 6, eos_id=eos)
    hits = [int(np.argmax(row == eos)) if (row == eos).any() else None for row in first.tokens]
    assert stopped.steps == (6 if None in hits else max(hits) + 1)
    for row, hit in enumerate(hits):
        end = 6 if hit is None else hit + 1
        np.testing.assert_array_equal(stopped.tokens[row, :end], first.tokens[row, :end])
        assert (stopped.tokens[row, end:stopped.steps] == 1).all()  # pad_token_id after eos


def test_untied_head_with_biases_and_dt_limit_matches(tmp_path, ids):
    from equiv.mamba2.port import Mamba2Port

    ckpt = write_tiny_checkpoint(tmp_path, tie=False, use_bias=True, seed=3, time_step_limit=[0.05, 0.5])
    got = Mamba2JaxPort().load(ckpt).forward(ids, taps=False)["logits"]
    assert_close_to_scale("logits", got, Mamba2Port().load(ckpt).forward(ids, taps=False)["logits"])


def test_n_groups_above_one_is_refused_by_name(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path, n_groups=2)
    with pytest.raises(ConfigError, match=r"n_groups=2 \(mamba2-jax implements only n_groups=1"):
        Mamba2JaxPort().load(ckpt)


def test_every_missing_feature_is_named_at_once(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path, n_groups=2, layer_norm_epsilon=1e-6)
    with pytest.raises(ConfigError, match=r"n_groups=2.*layer_norm_epsilon=1e-06"):
        Mamba2JaxPort().load(ckpt)


def test_padding_mask_and_isolated_mode_are_unavailable(tiny_pair, ids):
    adapter, _ = tiny_pair
    mask = np.ones(ids.shape, int)
    np.testing.assert_array_equal(adapter.forward(ids, mask)["logits"], adapter.forward(ids)["logits"])
    mask[1, :5] = 0
    with pytest.raises(TapUnavailable, match="no padding mask"):
        adapter.forward(ids, mask)
    with pytest.raises(TapUnavailable):
        adapter.forward_isolated(ids, None, {})


def test_info_records_the_callers_precision_without_forcing_it(tiny_pair):
    adapter, _ = tiny_pair
    with jax.default_matmul_precision("highest"):
        assert adapter.info().details["jax_default_matmul_precision"] == "highest"
    with jax.default_matmul_precision("bfloat16"):
        assert adapter.info().details["jax_default_matmul_precision"] == "bfloat16"
    assert adapter.info().version == "1.1.2"


def test_registry_names_this_adapter():
    from equiv.mamba2.family import FAMILY

    assert FAMILY.ports["mamba2-jax"] == "equiv.mamba2.mamba2_jax_adapter:Mamba2JaxPort"


def test_missing_package_gives_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mamba2_jax", None)  # makes `import mamba2_jax` raise ImportError
    with pytest.raises(PortError, match=r"pip install 'mamba2-jax==1\.1\.2'"):
        Mamba2JaxPort().load(write_tiny_checkpoint(tmp_path))
