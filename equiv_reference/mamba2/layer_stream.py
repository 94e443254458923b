"""transformers' Mamba-2 reference (and its float64 oracle) stage by stage (Family.streaming
["reference"]; equiv/stream/protocol.py): the embedding, one `Mamba2Block` at a time, the head.

Each block is transformers' own `Mamba2Block`, built (on the meta device: no random init) for its
layer index from the config and given that layer's tensors, so its forward is the library's own code
path: the same dispatched functions run through the same dispatch recorder, the float64 oracle
through the same `Float64Lift`, the taps come from the same hooks (transformers_runner.TAP_MAP), and
the padding mask is the one `Mamba2Model.forward` makes (`create_recurrent_attention_mask`). On every
bundled fixture the taps and the cached-decode logits are bit-identical to the whole model's
(tests/test_layer_streaming.py). Weights are converted as `from_pretrained(dtype=float32)` then
`.to(dtype)` converts them.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import torch
from torch import nn

from equiv.errors import CheckpointError, EquivError, first_line
from equiv.io.layer_reader import TensorIndex
from equiv.mamba2.taps import layer_taps
from equiv_reference.mamba2.transformers_runner import (
    DTYPES,
    TAP_MAP,
    TransformersRunner,
    attach_taps,
    derived_conv,
)
from equiv_reference.provenance import reference_changed
from equiv_reference.torch_taps import to_numpy

EMBED_KEYS = ("backbone.embeddings.weight", "backbone.embedding.weight")  # the second: Mamba2Model.load_hook


def _stage_modules(root: nn.Module, taps, prefix: str = "", i: int | None = None):
    """(tap, module, kind) of TAP_MAP for `taps`, with module paths relative to `root` (which sits
    at `prefix` in the whole model)."""
    named = dict(root.named_modules())
    for tap, path, kind in TAP_MAP:
        name = tap.format(i=i)
        if name in taps:
            yield name, named[path.format(i=i).removeprefix(prefix).removeprefix(".")], kind


class _Root(nn.Module):
    """The whole model's module paths (backbone.embeddings, backbone.norm_f, lm_head), holding only
    what one stage needs, so TAP_MAP resolves unchanged."""

    def __init__(self, **backbone):
        super().__init__()
        self.backbone = nn.Module()
        for name, module in backbone.items():
            setattr(self.backbone, name, module)


def _assign(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> nn.Module:
    """`module` (built on the meta device) holding exactly these tensors; a missing, unexpected or
    misshapen key is one CheckpointError line."""
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{what}: expected the tensors transformers' module takes, load_state_dict "
                              f"refused: {first_line(e)}") from None
    meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if meta:
        raise CheckpointError(f"{what}: expected every parameter from the checkpoint, got none for "
                              f"{meta[:4]}")
    return module.eval()


class _Stage:
    def __init__(self, side: StreamedTransformers, label: str, tap_names):
        self.side, self.label, self.tap_names = side, label, tuple(tap_names)


class _Loaded:
    def __init__(self, side: StreamedTransformers, root: nn.Module):
        self.side, self.root = side, root

    def close(self) -> None:
        self.root = None


class _EmbedStage(_Stage):
    def __init__(self, side):
        super().__init__(side, "embedding", ("embed",))

    def load(self):
        side = self.side
        key = next((k for k in EMBED_KEYS if k in side.reader), EMBED_KEYS[0])
        weight = side.tensors([key])[key]
        with torch.device("meta"):
            root = _Root(embeddings=nn.Embedding(*weight.shape))
        _assign(root.backbone.embeddings, {"weight": weight}, f"{side.checkpoint}: {key}")
        return _LoadedEmbed(side, root)


class _LoadedEmbed(_Loaded):
    def _embed(self, t_ids, t_mask):
        emb = self.root.backbone.embeddings(t_ids)
        mm, config = self.side.mm, self.side.config
        return emb, mm.create_recurrent_attention_mask(config=config, inputs_embeds=emb,
                                                       attention_mask=t_mask, cache=None)

    def forward(self, ids, mask):
        t_ids, t_mask = self.side._inputs(ids, mask)
        captured, _, handles = attach_taps(_stage_modules(self.root, {"embed"}))
        try:
            with self.side._running():
                carry = self._embed(t_ids, t_mask)
        finally:
            for h in handles:
                h.remove()
        return carry, {"embed": to_numpy(captured["embed"])}

    def decode(self, prompt, steps, mask):
        t_ids, t_mask = self.side._inputs(prompt, mask)
        with self.side._running():
            first = self._embed(t_ids, t_mask)
            rest = [self._embed(self.side._inputs(np.asarray(t)[:, None], None)[0], None) for t in steps]
        return first, rest


class _BlockStage(_Stage):
    def __init__(self, side, i: int):
        super().__init__(side, f"layer {i + 1}/{side.n_layers}", layer_taps(i))
        self.i = i

    def load(self):
        side, prefix = self.side, f"backbone.layers.{self.i}."
        state = side.tensors([k for k in side.reader.names() if k.startswith(prefix)])
        with torch.device("meta"):
            block = side.mm.Mamba2Block(side.config, layer_idx=self.i)
        state = {k.removeprefix(prefix): v for k, v in state.items()}
        return _LoadedBlock(side, _assign(block, state, f"{side.checkpoint}: layer {self.i}"), self.i)


class _LoadedBlock(_Loaded):
    def __init__(self, side, block, i):
        super().__init__(side, block)
        self.i = i

    def forward(self, carry, mask):
        hidden, mixer_mask = carry
        side, i = self.side, self.i
        taps = layer_taps(i)
        modules = _stage_modules(self.root, set(taps), f"backbone.layers.{i}", i)
        captured, mixer_masks, handles = attach_taps(modules)
        try:
            with side._running():
                out = self.root(hidden, cache=None, attention_mask=mixer_mask)
                captured[f"layers.{i}.mixer.conv"] = derived_conv(side.mm, side.recorder, self.root.mixer,
                                                                  captured[f"layers.{i}.mixer.in_proj"],
                                                                  mixer_masks[i])
        finally:
            for h in handles:
                h.remove()
        side.recorder.require_called("mamba2_chunk_scan", "causal_conv1d_fn", what=f"layer {i}'s forward")
        return (out, mixer_mask), {name: to_numpy(captured[name]) for name in taps}

    def decode(self, prompt, steps, mask):
        """The block as step_logits drives the whole model: the prompt with use_cache (a fresh
        cache, of which only this layer's slot fills), then one token at a time."""
        from transformers import DynamicCache

        side = self.side
        cache = DynamicCache(config=side.config)
        kw = side.cache_kwarg
        with side._running():
            first = (self.root(prompt[0], **{kw: cache}, attention_mask=prompt[1]), prompt[1])
            rest = [(self.root(h, **{kw: cache}, attention_mask=m), m) for h, m in steps]
        if steps:
            side.recorder.require_called("mamba2_selective_state_update", what="a cached decode step")
        return first, rest


class _HeadStage(_Stage):
    def __init__(self, side):
        super().__init__(side, "head", ("norm_f", "logits"))

    def load(self):
        side, cfg = self.side, self.side.config
        embed_key = next((k for k in EMBED_KEYS if k in side.reader), EMBED_KEYS[0])
        head_key = embed_key if cfg.tie_word_embeddings else "lm_head.weight"
        tensors = side.tensors(["backbone.norm_f.weight", head_key])
        with torch.device("meta"):
            root = _Root(norm_f=side.mm.Mamba2RMSNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon))
            root.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        _assign(root.backbone.norm_f, {"weight": tensors["backbone.norm_f.weight"]},
                f"{side.checkpoint}: norm_f")
        _assign(root.lm_head, {"weight": tensors[head_key]}, f"{side.checkpoint}: {head_key}")
        return _LoadedHead(side, root)


class _LoadedHead(_Loaded):
    def _logits(self, hidden):
        """Mamba2Model's norm_f, then Mamba2ForCausalLM's head (its `.float()`: the steps' dtype)."""
        normed = self.root.backbone.norm_f(hidden)
        return self.root.lm_head(normed.to(self.root.lm_head.weight.dtype))

    def forward(self, carry, mask):
        captured, _, handles = attach_taps(_stage_modules(self.root, {"norm_f", "logits"}))
        try:
            with self.side._running():
                self._logits(carry[0])
        finally:
            for h in handles:
                h.remove()
        return None, {name: to_numpy(captured[name]) for name in ("norm_f", "logits")}

    def decode(self, prompt, steps, mask):
        with self.side._running():
            first = self._logits(prompt[0]).float()[:, -1]
            rest = [self._logits(h).float()[:, -1] for h, _ in steps]
        return to_numpy(first), [to_numpy(r) for r in rest]


class StreamedTransformers(TransformersRunner):
    """The transformers runner (its dispatch recorder, float64 lift, input checks and provenance)
    holding no model: its stages build one module at a time. Whole-model calls (run, step_logits,
    generate) are the in-memory runner's; here they are refused."""

    def __init__(self, checkpoint_dir: str | Path, dtype: str = "float32", *,
                 reader: TensorIndex | None = None, device: str = "cpu",
                 lift_float32_casts: bool | None = None):
        checkpoint_dir = self._check_args(checkpoint_dir, dtype, device, lift_float32_casts)
        try:
            config = self.mm.Mamba2Config.from_pretrained(checkpoint_dir, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - transformers' own exception, as one line
            raise CheckpointError(f"{checkpoint_dir}: expected a config transformers' Mamba2Config reads, it "
                                  f"raised {type(e).__name__}: {first_line(e)}") from e
        self._set_config(config, checkpoint_dir)
        if not hasattr(self.mm, "create_recurrent_attention_mask"):  # how Mamba2Model.forward masks (5.25)
            raise reference_changed("modeling_mamba2 has no create_recurrent_attention_mask, which the "
                                    "layer-streamed reference calls as Mamba2Model.forward does")
        block_params = inspect.signature(self.mm.Mamba2Block.forward).parameters
        self.cache_kwarg = "cache" if "cache" in block_params else "cache_params"
        self.reader = reader if reader is not None else TensorIndex(checkpoint_dir)
        self.stages = [_EmbedStage(self), *(_BlockStage(self, i) for i in range(self.n_layers)),
                       _HeadStage(self)]

    def tensors(self, keys) -> dict[str, torch.Tensor]:
        """These checkpoint tensors as the reference holds them: float32 (from_pretrained's dtype),
        then this runner's dtype; copies, so the reader's shared arrays are never written."""
        raw = self.reader.read(keys)

        def as_ref(a):
            a = np.asarray(a).astype(np.float32, copy=False)
            a = a.astype(np.float64) if self.dtype == "float64" else a.copy()  # one copy, exact
            return torch.from_numpy(a).to(self.device, DTYPES[self.dtype])

        return {k: as_ref(raw[k]) for k in keys}

    def _whole_model(self, *_args, **_kwargs):
        raise EquivError("the layer-streamed reference holds no whole model: run it through equiv.stream")

    run = step_logits = generate = _whole_model

    def provenance(self) -> dict:
        return {**super().provenance(), "streamed": (
            "layer by layer: transformers' own Mamba2Block per layer (built on the meta device, given "
            "that layer's tensors), nn.Embedding, Mamba2RMSNorm norm_f and the lm_head Linear as separate "
            "modules; the head's `.float()` of Mamba2ForCausalLM is applied to the decode logits only")}


def stream_transformers(checkpoint_dir: str | Path, dtype: str = "float32", *,
                        reader: TensorIndex | None = None, threads: int | None = 1,
                        device: str = "cpu") -> StreamedTransformers:
    """Family.streaming["reference"]: transformers' torch path as stages; float64 is the oracle."""
    if threads is not None:
        torch.set_num_threads(threads)
    return StreamedTransformers(checkpoint_dir, dtype, reader=reader, device=device)
