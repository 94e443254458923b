"""A Mamba-3 language model around mamba_ssm's own `Mamba3` mixer, in the layout of its
`MambaLMHeadModel` (which refuses `ssm_cfg.layer` "Mamba3": its create_block knows Mamba1/Mamba2).

    backbone.embedding                    nn.Embedding
    backbone.layers.{i}                   mamba_ssm's Block: RMSNorm (Triton) -> Mamba3 -> residual
      .norm, .mixer                       (fused add + norm when config.json's fused_add_norm)
    backbone.norm_f                       RMSNorm after the last residual add, as MixerModel does
    lm_head                               nn.Linear, or the embedding itself when tied

Everything is mamba_ssm's module code except the stack's glue, which copies MixerModel.forward and
MambaLMHeadModel.forward (2.3.2.post1) line for line, and one deviation at decode, `Mamba3Mixer`:
`Mamba3.forward` with a warm inference cache calls `self.step(u, ...)` with u of shape (b, 1, d),
while `Mamba3.step` splits and rearranges u as (b, d) and fails on it. A decoding language model
has to call `step` on u[:, 0]; this mixer does exactly that and nothing else (prefill and
cache-less forwards are Mamba3.forward unchanged).

The checkpoint is read with the port's strict config reader (equiv/mamba3/config_file.py) and loaded
with `load_state_dict(strict=True)`: no key missing, none unknown. A tied checkpoint has no
`lm_head.weight` (the head has no parameter of its own then).
"""

from __future__ import annotations

from collections import namedtuple
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from equiv.errors import CheckpointError, ConfigError, one_line, quote_path
from equiv.io.checkpoint_files import read_tensors
from equiv.io.json_reader import read_json_object
from equiv.mamba3.config import Mamba3Config
from equiv.mamba3.config_file import load_config
from equiv_reference.mamba3.kernels import Mamba3Code, load_mamba3

CausalLMOutput = namedtuple("CausalLMOutput", ["logits"])
MIXER_KWARGS = ("d_state", "expand", "headdim", "ngroups", "rope_fraction", "A_floor", "is_outproj_norm",
                "is_mimo", "mimo_rank", "chunk_size")


def mixer_kwargs(cfg: Mamba3Config) -> dict:
    """Mamba3.__init__'s arguments for this config (mimo_rank only matters with is_mimo)."""
    return {name: getattr(cfg, name) for name in MIXER_KWARGS}


def _mixer_class(code: Mamba3Code):
    class Mamba3Mixer(code.mamba3.Mamba3):
        """mamba_ssm's Mamba3; with a warm cache, its own `step` on the one token (module docstring)."""

        def forward(self, u, seq_idx=None, cu_seqlens=None, inference_params=None):
            if inference_params is not None and inference_params.seqlen_offset > 0:
                if u.shape[1] != 1:
                    raise ValueError(f"Mamba3 decode step: expected one token per sequence, got {u.shape[1]}")
                states = self._get_states_from_cache(inference_params, u.shape[0])
                return self.step(u[:, 0], *states)[0][:, None]
            return super().forward(u, seq_idx=seq_idx, cu_seqlens=cu_seqlens,
                                   inference_params=inference_params)

    return Mamba3Mixer


class TiedHead(nn.Module):
    """lm_head = the embedding matrix, owning no parameter (a tied checkpoint stores none)."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self._embedding = [embedding]  # a list: not registered as a submodule, so no duplicate key

    def forward(self, hidden):
        return F.linear(hidden, self._embedding[0].weight)


class Backbone(nn.Module):
    """MixerModel (mamba_ssm/models/mixer_seq_simple.py) with Mamba3 mixers and no MLP."""

    def __init__(self, cfg: Mamba3Config, code: Mamba3Code, fused_add_norm: bool):
        super().__init__()
        rms_norm = partial(code.layer_norm.RMSNorm, eps=cfg.norm_eps)
        mixer = _mixer_class(code)
        self.residual_in_fp32, self.fused_add_norm = cfg.residual_in_fp32, fused_add_norm
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList([
            code.block.Block(cfg.d_model, partial(mixer, layer_idx=i, **mixer_kwargs(cfg)), nn.Identity,
                             norm_cls=rms_norm, fused_add_norm=fused_add_norm,
                             residual_in_fp32=cfg.residual_in_fp32)
            for i in range(cfg.n_layers)])
        self.norm_f = rms_norm(cfg.d_model)
        self._layer_norm_fn = code.layer_norm.layer_norm_fn

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        return {i: layer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)
                for i, layer in enumerate(self.layers)}

    def forward(self, input_ids, inference_params=None, **mixer_kwargs):
        hidden_states = self.embedding(input_ids)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(hidden_states, residual, inference_params=inference_params,
                                            **mixer_kwargs)
        if not self.fused_add_norm:
            residual = (hidden_states + residual) if residual is not None else hidden_states
            return self.norm_f(residual.to(dtype=self.norm_f.weight.dtype))
        return self._layer_norm_fn(hidden_states, self.norm_f.weight, self.norm_f.bias, eps=self.norm_f.eps,
                                   residual=residual, prenorm=False, residual_in_fp32=self.residual_in_fp32,
                                   is_rms_norm=True)


def _lm_class(code: Mamba3Code):
    class Mamba3LMHeadModel(nn.Module, code.generation.GenerationMixin):
        """MambaLMHeadModel's forward and generate (mamba_ssm.utils.generation) over Mamba3 blocks."""

        def __init__(self, cfg: Mamba3Config, fused_add_norm: bool):
            super().__init__()
            self.config = cfg
            self.backbone = Backbone(cfg, code, fused_add_norm)
            self.lm_head = TiedHead(self.backbone.embedding) if cfg.tie_embeddings \
                else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

        def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
            return self.backbone.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)

        def forward(self, input_ids, position_ids=None, inference_params=None, num_last_tokens=0,
                    **mixer_kwargs):
            hidden_states = self.backbone(input_ids, inference_params=inference_params, **mixer_kwargs)
            if num_last_tokens > 0:
                hidden_states = hidden_states[:, -num_last_tokens:]
            return CausalLMOutput(logits=self.lm_head(hidden_states))

    return Mamba3LMHeadModel


def fused_add_norm(checkpoint_dir: Path) -> bool:
    """config.json's fused_add_norm (MambaConfig's default: true). The strict reader accepts it as
    harmless (the same add + norm through one Triton kernel); the reference builds what it says."""
    raw = read_json_object(Path(checkpoint_dir) / "config.json", "config.json")
    value = raw.get("fused_add_norm", True)
    if not isinstance(value, bool):
        raise ConfigError(f"config.json: fused_add_norm: expected true or false, got {value!r}")
    return value


def build(cfg: Mamba3Config, fused: bool = False, code: Mamba3Code | None = None) -> nn.Module:
    """The model for `cfg` with mamba_ssm's default initialisation (float32, CPU)."""
    return _lm_class(code or load_mamba3())(cfg, fused)


def load_model(checkpoint_dir: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
               code: Mamba3Code | None = None) -> tuple[nn.Module, Mamba3Config]:
    """(model, config): the checkpoint's config read strictly, its tensors loaded with strict=True."""
    checkpoint_dir = Path(checkpoint_dir)
    cfg, _ = load_config(checkpoint_dir)
    model = build(cfg, fused_add_norm(checkpoint_dir), code)
    tensors = read_tensors(checkpoint_dir)
    if cfg.tie_embeddings and "lm_head.weight" in tensors and "backbone.embedding.weight" in tensors \
            and np.array_equal(tensors["lm_head.weight"], tensors["backbone.embedding.weight"]):
        del tensors["lm_head.weight"]  # mamba_ssm's own state_dict writes the tied head too
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{quote_path(checkpoint_dir)}: expected exactly the tensors of mamba_ssm's "
                              f"Mamba3 layout for this config.json, load_state_dict(strict=True) said: "
                              f"{one_line(str(e), 400)}") from None
    return to_dtype(model, dtype).to(device=device).eval(), cfg


FLOAT32_PARAMETERS = ("dt_bias", "B_bias", "C_bias", "D", "mimo_x", "mimo_z", "mimo_o")
"""Mamba3.__init__ creates these in float32 whatever its factory dtype; the rest follow it."""


def to_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The model as mamba_ssm builds it with `dtype=dtype`: every parameter in dtype except
    FLOAT32_PARAMETERS of the mixers."""
    for name, param in model.named_parameters():
        keep = ".mixer." in name and name.rsplit(".", 1)[-1] in FLOAT32_PARAMETERS
        param.data = param.data.to(torch.float32 if keep else dtype)
    return model
