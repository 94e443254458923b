"""The built-in Mamba-1 / Falcon-Mamba port against transformers' `MambaForCausalLM` and
`FalconMambaForCausalLM` (torch path, CPU, float32) on tiny random checkpoints written here: every
tap and the logits, isolated mode, cached decode == forward across the conv width, left padding ==
each sequence alone, greedy generation, the mamba_ssm layout, strict conversion and config reading.

The bounds are sanity bounds (a few e-5 of each tap's scale); the harness judges precisely.
"""

from __future__ import annotations

import copy
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from equiv.errors import CheckpointError, ConfigError, UnsupportedFeatureError
from equiv.mamba1.config import Mamba1Config
from equiv.mamba1.convert import load_checkpoint
from equiv.mamba1.port import Mamba1Port
from equiv.mamba1.taps import tap_names

TAP_RTOL = 5e-5  # max |port - reference| / max |reference|, per tap
BASE = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4,
            time_step_rank=5, pad_token_id=0, eos_token_id=0, bos_token_id=0)
VARIANTS = {
    "mamba": ("mamba", {}),
    # every switch away from the default at once: odd dt_rank, untied head, biases, bf16-style residual
    "mamba-bias-untied": ("mamba", dict(time_step_rank=3, tie_word_embeddings=False, use_bias=True,
                                        use_conv_bias=False, residual_in_fp32=False)),
    "falcon": ("falcon_mamba", dict(tie_word_embeddings=False, mixer_rms_eps=1e-3)),
}


def _modeling(model_type):
    if model_type == "mamba":
        import transformers.models.mamba.modeling_mamba as mm

        return mm, mm.MambaForCausalLM
    import transformers.models.falcon_mamba.modeling_falcon_mamba as mm

    return mm, mm.FalconMambaForCausalLM


def _randomize(model, seed):
    """Random but sensible weights: norms and D away from 1, biases nonzero, softplus(dt bias) in
    [1e-3, 1e-1], A = -exp(A_log) in [-16, -1]."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.empty(p.shape).uniform_(1.0, 16.0, generator=g)))
            elif name.endswith("dt_proj.bias"):
                dt = torch.exp(torch.empty(p.shape).uniform_(math.log(1e-3), math.log(1e-1), generator=g))
                p.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1
            elif name.endswith("norm.weight") or name.endswith("norm_f.weight") or name.endswith(".D"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1] if p.ndim > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))


@pytest.fixture(scope="module", params=list(VARIANTS))
def case(request, tmp_path_factory):
    """(transformers model float32, its modeling module, checkpoint dir, port model) per variant."""
    model_type, over = VARIANTS[request.param]
    mm, cls = _modeling(model_type)
    config_cls = cls.config_class
    torch.manual_seed(0)
    model = cls(config_cls(**(BASE | over))).eval()
    _randomize(model, seed=sum(map(ord, request.param)))
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return model, mm, path, Mamba1Port().load(path)


def _ids(vocab, b=2, l=13, seed=0):
    return np.random.default_rng(seed).integers(1, vocab, (b, l)).astype(np.int32)


def _reference_taps(model, mm, ids, mask=None) -> dict[str, np.ndarray]:
    """Every canonical tap from transformers' own modules (hooks) and its own scan function: the
    dt_proj and ssm taps from the arguments the mixer passes `mamba_selective_scan` (the ssm tap is
    that function rerun with z=None, i.e. before the gate)."""
    cap, layer, handles = {}, [0], []
    hook = lambda name: lambda mod, args, out: cap.__setitem__(name, out)  # noqa: E731
    pre = lambda name: lambda mod, args: cap.__setitem__(name, args[0])  # noqa: E731
    handles.append(model.backbone.embeddings.register_forward_hook(hook("embed")))
    for i, block in enumerate(model.backbone.layers):
        t, mixer = f"layers.{i}", block.mixer
        handles += [block.register_forward_hook(hook(t)), block.norm.register_forward_hook(hook(f"{t}.norm")),
                    mixer.register_forward_pre_hook(lambda mod, args, i=i: layer.__setitem__(0, i)),
                    mixer.in_proj.register_forward_hook(hook(f"{t}.mixer.in_proj")),
                    mixer.x_proj.register_forward_pre_hook(pre(f"{t}.mixer.conv")),
                    mixer.out_proj.register_forward_pre_hook(pre(f"{t}.mixer.gate")),
                    mixer.out_proj.register_forward_hook(hook(f"{t}.mixer.out_proj"))]
        sizes = [mixer.time_step_rank, mixer.ssm_state_size, mixer.ssm_state_size]
        if hasattr(mixer, "dt_layernorm"):
            handles += [mixer.dt_layernorm.register_forward_hook(hook(f"{t}.mixer.x_proj.dt")),
                        mixer.b_layernorm.register_forward_hook(hook(f"{t}.mixer.x_proj.B")),
                        mixer.c_layernorm.register_forward_hook(hook(f"{t}.mixer.x_proj.C"))]
        else:
            def split(mod, args, out, t=t, sizes=sizes):
                for name, part in zip(("dt", "B", "C"), torch.split(out, sizes, dim=-1)):
                    cap[f"{t}.mixer.x_proj.{name}"] = part
            handles.append(mixer.x_proj.register_forward_hook(split))
    handles.append(model.backbone.norm_f.register_forward_hook(hook("norm_f")))
    original = mm.mamba_selective_scan

    def scan(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, **kw):
        t = f"layers.{layer[0]}.mixer"
        cap[f"{t}.dt_proj"] = (dt + delta_bias.to(dt.dtype)[..., None]).transpose(1, 2)
        ungated = original(hidden_states, dt, A, B, C, D, None, delta_bias,
                           **(kw | {"return_last_state": False}))
        cap[f"{t}.ssm"] = ungated.transpose(1, 2)
        return original(hidden_states, dt, A, B, C, D, z, delta_bias, **kw)

    mm.mamba_selective_scan = scan
    try:
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(ids.astype(np.int64)), use_cache=False,
                        attention_mask=None if mask is None else torch.from_numpy(mask.astype(np.int64)))
    finally:
        mm.mamba_selective_scan = original
        for h in handles:
            h.remove()
    cap["logits"] = out.logits
    return {k: v.detach().float().numpy() for k, v in cap.items()}


def _rel(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / max(np.max(np.abs(b)), 1e-30))


def test_every_tap_and_logits_match_transformers(case):
    model, mm, _, port = case
    ids = _ids(port.vocab_size)
    p, r = port.forward(ids), _reference_taps(model, mm, ids)
    assert list(p) == sorted(tap_names(port.cfg.n_layers)) and sorted(r) == sorted(p)
    worst = {name: _rel(p[name], r[name]) for name in port.tap_names}
    print("max relative difference per tap:", max(worst.values()), max(worst, key=worst.get))
    assert all(p[n].shape == r[n].shape for n in port.tap_names)
    assert max(worst.values()) < TAP_RTOL, worst


def test_isolated_taps_match_transformers(case):
    """Each tap recomputed from the reference's values of its inputs: mis-wired inputs (e.g. the
    gate reading x instead of z, the ssm reading the pre-mask conv) would be far off."""
    model, mm, _, port = case
    ids = _ids(port.vocab_size, seed=3)
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    r = _reference_taps(model, mm, ids, mask)
    p = port.forward_isolated(ids, mask, r)
    real = mask.astype(bool)
    worst = {n: _rel(p[n][real], r[n][real]) for n in port.tap_names}
    assert max(worst.values()) < TAP_RTOL, worst


def test_cached_decode_equals_forward_across_the_conv_width(case):
    """prefill (associative scan) + O(1) decode steps (conv window and float32 state) == the full
    forward, for prompts of conv_kernel - 1, conv_kernel and conv_kernel + 1 tokens."""
    port = case[3]
    ids = _ids(port.vocab_size, l=11, seed=1)
    full = port.forward(ids, taps=False)["logits"]
    for prompt_len in (port.decode_lengths[0] - 1, port.decode_lengths[0], port.decode_lengths[0] + 1, 1):
        steps = port.step_logits(ids, None, prompt_len)
        assert steps.shape == (2, ids.shape[1] - prompt_len + 1, port.vocab_size)
        assert _rel(steps, full[:, prompt_len - 1:]) < 2e-5, prompt_len


def test_step_logits_match_transformers_cached_decode(case):
    model, _, _, port = case
    ids = _ids(port.vocab_size, l=9, seed=2)
    prompt_len = port.decode_lengths[0]
    from transformers import DynamicCache

    t_ids = torch.from_numpy(ids.astype(np.int64))
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        ref = [model(input_ids=t_ids[:, :prompt_len], cache=cache, use_cache=True).logits[:, -1]]
        for t in range(prompt_len, ids.shape[1]):
            ref.append(model(input_ids=t_ids[:, t:t + 1], cache=cache, use_cache=True).logits[:, -1])
    assert _rel(port.step_logits(ids, None, prompt_len), torch.stack(ref, 1).numpy()) < TAP_RTOL


def test_left_padded_batch_equals_each_sequence_alone(case):
    model, _, _, port = case
    ids = _ids(port.vocab_size, b=3, l=12, seed=4)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :8] = 0
    padded = port.forward(ids, mask, taps=False)["logits"]
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids.astype(np.int64)), use_cache=False,
                    attention_mask=torch.from_numpy(mask.astype(np.int64))).logits.numpy()
    for row, pad in ((0, 0), (1, 3), (2, 8)):
        alone = port.forward(ids[row:row + 1, pad:], taps=False)["logits"][0]
        assert _rel(padded[row, pad:], ref[row, pad:]) < TAP_RTOL  # the reference's padding, whatever it is
        if not port.cfg.use_bias:  # with an in_proj bias the reference itself leaks padding into the conv
            assert _rel(padded[row, pad:], alone) < 2e-5, row
    if port.cfg.use_bias:
        assert _rel(padded[2, 8:], port.forward(ids[2:, 8:], taps=False)["logits"][0]) > 1e-3


def test_generate_matches_transformers_greedy(case):
    model, _, _, port = case
    prompt = _ids(port.vocab_size, b=2, l=6, seed=5)
    mask = np.ones_like(prompt)
    mask[1, :2] = 0
    t_prompt, t_mask = torch.from_numpy(prompt.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))

    def reference(eos):
        with torch.no_grad():
            out = model.generate(input_ids=t_prompt, attention_mask=t_mask, do_sample=False, max_new_tokens=8,
                                 eos_token_id=eos, pad_token_id=0, output_logits=True,
                                 return_dict_in_generate=True)
        return out.sequences[:, prompt.shape[1]:].numpy(), torch.stack(out.logits, 1)

    want, logits = reference(None)
    got = port.generate(prompt, mask, max_new_tokens=8)
    np.testing.assert_array_equal(got.tokens, want)
    top2 = torch.topk(logits, 2, dim=-1).values.numpy()
    np.testing.assert_allclose(got.margins, top2[..., 0] - top2[..., 1], atol=1e-4)
    eos = int(want[0, 2])  # row 0 stops at its third token; row 1 may go on: pad after eos
    want_eos, _ = reference(eos)
    got_eos = port.generate(prompt, mask, max_new_tokens=8, eos_id=eos)
    np.testing.assert_array_equal(got_eos.tokens, want_eos[:, :got_eos.steps])
    assert got_eos.steps == want_eos.shape[1] and np.isnan(got_eos.margins[0, 3:]).all()


def _mamba_ssm_checkpoint(src, dst, cfg: Mamba1Config, vocab_size: int):
    """The transformers checkpoint in mamba_ssm's layout: embedding renamed, a mamba_ssm config."""
    tensors = {k.replace("backbone.embeddings.", "backbone.embedding."): v
               for k, v in load_file(src / "model.safetensors").items()}
    save_file(tensors, dst / "model.safetensors")
    (dst / "config.json").write_text(json.dumps({
        "d_model": cfg.d_model, "n_layer": cfg.n_layers, "vocab_size": vocab_size,
        "pad_vocab_size_multiple": 8,
        "ssm_cfg": {"layer": "Mamba1", "d_state": cfg.d_state, "d_conv": cfg.conv_kernel,
                    "expand": cfg.expand, "dt_rank": cfg.dt_rank, "bias": cfg.use_bias,
                    "conv_bias": cfg.use_conv_bias},
        "rms_norm": True, "fused_add_norm": True, "residual_in_fp32": cfg.residual_in_fp32,
        "tie_embeddings": cfg.tie_embeddings}))


def test_mamba_ssm_layout_loads_the_same_params(case, tmp_path):
    _, _, path, port = case
    if port.cfg.is_falcon:
        pytest.skip("mamba_ssm has no Falcon-Mamba")
    _mamba_ssm_checkpoint(path, tmp_path, port.cfg, vocab_size=port.vocab_size - 3)  # padded back to 64
    cfg_t, params_t, fmt_t = load_checkpoint(path)
    cfg_m, params_m, fmt_m = load_checkpoint(tmp_path)
    assert (fmt_t, fmt_m) == ("transformers", "mamba_ssm")
    assert cfg_m == cfg_t.replace(eos_token_id=None, pad_token_id=None)
    flat_t, flat_m = ({f"{i}.{k}": v for i, lp in enumerate(p["layers"]) for k, v in lp.items()}
                      | {k: v for k, v in p.items() if k != "layers"} for p in (params_t, params_m))
    assert sorted(flat_t) == sorted(flat_m)
    for k in flat_t:
        np.testing.assert_array_equal(np.asarray(flat_t[k]), np.asarray(flat_m[k]), err_msg=k)
    ids = _ids(port.vocab_size)
    np.testing.assert_array_equal(Mamba1Port().load(tmp_path).forward(ids, taps=False)["logits"],
                                  port.forward(ids, taps=False)["logits"])


def test_strict_conversion_lists_every_problem_at_once(case, tmp_path):
    _, _, path, port = case
    tensors = load_file(path / "model.safetensors")
    del tensors["backbone.layers.1.mixer.D"]
    tensors["backbone.layers.0.mixer.extra.weight"] = np.zeros(3, np.float32)
    tensors["backbone.layers.0.mixer.dt_proj.weight"] = np.zeros((port.cfg.d_inner, 7), np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    msg = str(err.value)
    assert "missing (1): backbone.layers.1.mixer.D" in msg
    assert "unexpected keys (1): backbone.layers.0.mixer.extra.weight" in msg
    assert (f"backbone.layers.0.mixer.dt_proj.weight: expected (d_inner={port.cfg.d_inner}, "
            f"dt_rank={port.cfg.dt_rank}), got ({port.cfg.d_inner}, 7)") in msg


def test_unsupported_config_values_are_refused_by_name(case, tmp_path):
    _, _, path, port = case
    raw = json.loads((path / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    for change, error, named in (
            ({"hidden_act": "gelu"}, UnsupportedFeatureError, "hidden_act: expected 'silu'"),
            ({"mystery_switch": 1}, UnsupportedFeatureError, "may change the numerics: mystery_switch"),
            ({"intermediate_size": 7}, ConfigError, "intermediate_size: expected expand x hidden_size")):
        (tmp_path / "config.json").write_text(json.dumps(raw | change))
        with pytest.raises(error, match=named):
            load_checkpoint(tmp_path)
    if not port.cfg.is_falcon:  # Falcon-Mamba's own key means nothing to Mamba-1: refused, not ignored
        (tmp_path / "config.json").write_text(json.dumps(raw | {"mixer_rms_eps": 1e-6}))
        with pytest.raises(UnsupportedFeatureError, match="mixer_rms_eps"):
            load_checkpoint(tmp_path)


def test_bfloat16_logits_near_transformers_bfloat16(case):
    """bf16 mirrors the reference's casts (not bit for bit: the scan's read-out is float32)."""
    model, _, path, _ = case
    port = Mamba1Port().load(path, "bfloat16")
    ids = _ids(port.vocab_size, seed=6)
    with torch.no_grad():  # a copy: the float32 model is shared by the other tests
        ref = copy.deepcopy(model).to(torch.bfloat16)(input_ids=torch.from_numpy(ids.astype(np.int64)),
                                                      use_cache=False).logits
    got = port.forward(ids, taps=False)["logits"]
    assert port.params["layers"][0]["conv_w"].dtype == jnp.bfloat16
    assert _rel(got, ref.float().numpy()) < 3e-2


def test_scan_modes_agree(case):
    """The port's prefill scan may be any of equiv.mamba1.scan's forms; the default is the parallel one."""
    path, port = case[2], case[3]
    ids = _ids(port.vocab_size, l=10, seed=8)
    want = port.forward(ids, taps=False)["logits"]
    assert port.info().details["scan"] == "associative"
    for mode in ("sequential", "chunked"):
        assert _rel(Mamba1Port(scan_mode=mode).load(path).forward(ids, taps=False)["logits"], want) < 1e-5


# a transformers config converted from mamba_ssm keeps mamba_ssm's keys (which transformers ignores)
HUB_STYLE = {
    "architectures": ["MambaForCausalLM"], "model_type": "mamba", "hidden_size": 32, "d_model": 32,
    "num_hidden_layers": 2, "n_layer": 2, "intermediate_size": 64, "d_inner": 64, "expand": 2,
    "state_size": 16, "time_step_rank": 2, "vocab_size": 64, "pad_vocab_size_multiple": 8, "ssm_cfg": {},
    "rms_norm": True, "fused_add_norm": True, "residual_in_fp32": True, "layer_norm_epsilon": 1e-5,
    "hidden_act": "silu", "torch_dtype": "float32", "use_cache": True, "conv_kernel": 4,
}


def test_config_dialects(tmp_path):
    from equiv.mamba1.config_file import load_config

    (tmp_path / "config.json").write_text(json.dumps(HUB_STYLE))
    cfg, fmt = load_config(tmp_path)  # model_type decides: not read as a mamba_ssm config
    assert (fmt, cfg.n_layers, cfg.d_inner, cfg.dt_rank, cfg.is_falcon) == ("transformers", 2, 64, 2, False)
    (tmp_path / "config.json").write_text(json.dumps(HUB_STYLE | {"n_layer": 3}))
    with pytest.raises(ConfigError, match="n_layer: expected num_hidden_layers = 2"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 32, "n_layer": 2, "vocab_size": 61,
                                                      "ssm_cfg": {}}))
    cfg, fmt = load_config(tmp_path)  # mamba_ssm Mamba1 defaults, vocabulary padded to a multiple of 8
    assert (fmt, cfg.vocab_size, cfg.d_state, cfg.conv_kernel, cfg.dt_rank) == ("mamba_ssm", 64, 16, 4, 2)
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 32, "n_layer": 2,
                                                      "ssm_cfg": {"layer": "Mamba2"}}))
    with pytest.raises(UnsupportedFeatureError, match="ssm_cfg.layer: expected 'Mamba1'"):
        load_config(tmp_path)
    assert Mamba1Config.tiny(model_type="falcon_mamba", mixer_rms_eps=1e-6).decode_lengths == (4,)
    with pytest.raises(ConfigError, match="mixer_rms_eps: expected a number for model_type 'falcon_mamba'"):
        Mamba1Config.tiny(model_type="falcon_mamba")
