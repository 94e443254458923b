"""The PyTorch reference: transformers `Mamba2ForCausalLM` (5.23 to 5.25, torch fallback path) with taps.

Everything in and out is numpy: ids int32 (b, l), mask (b, l) of 0/1 or None, taps keyed by the
canonical names of equiv/mamba2/taps.py, in the run dtype (float64 for the oracle, bf16 values as
float32). Taps are captured with forward hooks / forward pre-hooks on the library's own modules,
never by editing it. Mirrors `Mamba2Mixer.forward` / `Mamba2Block.forward` of
transformers/models/mamba2/modeling_mamba2.py.

Float64 is the oracle: transformers casts to float32 internally whatever the model dtype
(equiv_reference/float64_oracle.py lists where), so float64 runs go through `Float64Lift` unless
`lift_float32_casts=False` asks for the library's literal behaviour.
"""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path

import numpy as np
import torch

from equiv.errors import CheckpointError, ConfigError, EquivError, first_line
from equiv.inputs import check_tokens
from equiv.mamba2.taps import tap_names
from equiv.ports import GenerateResult
from equiv_reference import provenance as prov
from equiv_reference.float64_oracle import Float64Lift
from equiv_reference.mamba2 import dispatch
from equiv_reference.torch_taps import tap_modules, to_numpy

# ---------------------------------------------------------------------------------------------
# The tap map for Mamba-2: canonical tap -> (module of Mamba2ForCausalLM, what is captured).
#   output : the module's forward output (forward hook)
#   input0 : the module's first positional input (forward pre-hook)
#   derived: recomputed after the forward from other captured taps (no module runs it: since 5.23
#            the conv is the module-level function `causal_conv1d_fn`, called with conv1d's weights)
TAP_MAP = (
    ("embed", "backbone.embeddings", "output"),
    ("layers.{i}.norm", "backbone.layers.{i}.norm", "output"),
    ("layers.{i}.mixer.in_proj", "backbone.layers.{i}.mixer.in_proj", "output"),
    ("layers.{i}.mixer.conv", "backbone.layers.{i}.mixer", "derived"),
    ("layers.{i}.mixer.ssm", "backbone.layers.{i}.mixer.norm", "input0"),  # scan output incl. D skip
    ("layers.{i}.mixer.gated_norm", "backbone.layers.{i}.mixer.norm", "output"),
    ("layers.{i}.mixer.out_proj", "backbone.layers.{i}.mixer.out_proj", "output"),
    ("layers.{i}", "backbone.layers.{i}", "output"),
    ("norm_f", "backbone.norm_f", "output"),
    ("logits", "lm_head", "output"),  # before Mamba2ForCausalLM's `.float()`: the run dtype
)
DERIVED = {"layers.{i}.mixer.conv": "modeling_mamba2.causal_conv1d_fn (torch body) on the captured in_proj "
                                    "xBC slice with mixer.conv1d's weight/bias and SiLU, then "
                                    "apply_mask_to_padding_states with the mask the mixer received, "
                                    "exactly as Mamba2Mixer.forward (no-cache branch)"}

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


class ReferenceError(EquivError):
    """The reference cannot run as asked (bad dtype, missing checkpoint, wrong device)."""


def attach_taps(modules) -> tuple[dict[str, torch.Tensor], dict[int, torch.Tensor | None], list]:
    """Hooks capturing each (tap name, module, kind) of a resolved tap map: the module's output, its
    first input, or (derived) the padding mask its mixer received. -> (captured taps, mixer masks by
    layer, hook handles to remove)."""
    captured: dict[str, torch.Tensor] = {}
    mixer_masks: dict[int, torch.Tensor | None] = {}
    handles = []

    def keep(name, kind):
        if kind == "output":
            return lambda mod, args, out: captured.__setitem__(name, out)
        return lambda mod, args: captured.__setitem__(name, args[0])

    for name, module, kind in modules:
        if kind == "output":
            handles.append(module.register_forward_hook(keep(name, kind)))
        elif kind == "input0":
            handles.append(module.register_forward_pre_hook(keep(name, kind)))
        else:  # derived conv: remember the padding mask this mixer actually received
            i = int(name.split(".")[1])
            handles.append(module.register_forward_pre_hook(
                lambda mod, args, kwargs, i=i: mixer_masks.__setitem__(i, kwargs.get("attention_mask")),
                with_kwargs=True))
    return captured, mixer_masks, handles


def derived_conv(mm, recorder, mixer, zxbcdt: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The `mixer.conv` tap: mirrors Mamba2Mixer.forward steps 2-3 (no cache): causal conv + SiLU,
    then the mask."""
    e, conv_dim = mixer.intermediate_size, mixer.conv_dim
    xbc = zxbcdt[..., e:e + conv_dim].transpose(1, 2)  # b c l
    causal_conv1d_fn = recorder.torch_body("causal_conv1d_fn")
    conv = causal_conv1d_fn(xbc, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias,
                            activation=mixer.activation)
    return mm.apply_mask_to_padding_states(conv.transpose(1, 2), mask)  # b l c


class TransformersRunner:
    """`run`, `step_logits`, `generate`, `provenance` over one checkpoint in one dtype."""

    name = "transformers"

    def __init__(self, checkpoint_dir: str | Path, dtype: str = "float32", *, device: str = "cpu",
                 lift_float32_casts: bool | None = None):
        checkpoint_dir = self._check_args(checkpoint_dir, dtype, device, lift_float32_casts)
        from transformers import GenerationConfig
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        try:
            with prov.kernel_packages_hidden():
                model = self.mm.Mamba2ForCausalLM.from_pretrained(checkpoint_dir, local_files_only=True,
                                                                  dtype=torch.float32)
        except Exception as e:  # files the port never reads (generation_config.json) or reads more
            # leniently: transformers' own exception would escape the CLI as a traceback
            raise CheckpointError(f"{checkpoint_dir}: expected a checkpoint transformers' "
                                  f"Mamba2ForCausalLM.from_pretrained can load, it raised "
                                  f"{type(e).__name__}: {first_line(e)}") from e
        self.model = model.to(device=device, dtype=DTYPES[dtype]).eval()
        self._set_config(model.config, checkpoint_dir)
        self.model.generation_config = GenerationConfig(pad_token_id=self.pad_id)
        # 5.24 renamed forward's `cache_params` to `cache` (the old name warns until 5.40)
        forward_params = inspect.signature(self.model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in forward_params else "cache_params"

    def _check_args(self, checkpoint_dir, dtype: str, device: str, lift_float32_casts: bool | None) -> Path:
        """Validate the arguments and set what every runner of this checkpoint needs before a model
        exists: the library module, dtype, device, the float64 lift (also for the layer-streamed
        runner, equiv_reference/mamba2/layer_stream.py)."""
        if dtype not in DTYPES:
            raise ReferenceError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
        checkpoint_dir = Path(checkpoint_dir)
        if not (checkpoint_dir / "config.json").is_file():
            raise ReferenceError(f"checkpoint: expected {checkpoint_dir}/config.json, it does not exist")
        self.mm = dispatch.import_modeling_mamba2()
        self.dtype, self.device, self.checkpoint = dtype, device, str(checkpoint_dir)
        self.lift = (dtype == "float64") if lift_float32_casts is None else bool(lift_float32_casts)
        if self.lift and dtype != "float64":
            raise ReferenceError(f"lift_float32_casts: only meaningful for float64, got dtype {dtype!r}")
        return checkpoint_dir

    def _set_config(self, config, checkpoint_dir: Path) -> None:
        """The model's config and what follows from it: the tap names and the dispatch recorder."""
        self.config = config
        if self.config.model_type != "mamba2":
            raise ConfigError(f"{checkpoint_dir}: expected model_type 'mamba2', "
                              f"got {self.config.model_type!r}")
        # generation stops only at the eos a caller passes (the checkpoint's own eos/bos ignored)
        self.pad_id = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        self.n_layers = self.config.num_hidden_layers
        self.tap_names = tap_names(self.n_layers)
        self.recorder = dispatch.DispatchRecorder(self.mm)
        self.lifted_sites: dict[str, int] = {}

    # ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _running(self):
        """no_grad + the dispatch recorder + (float64) the cast lift, for every model call."""
        lift = Float64Lift() if self.lift else contextlib.nullcontext()
        with torch.no_grad(), self.recorder, lift:
            yield
        if self.lift:
            for site, n in lift.sites.items():
                self.lifted_sites[site] = self.lifted_sites.get(site, 0) + n

    def _inputs(self, ids, mask):
        ids, mask = check_tokens(ids, self.config.vocab_size, mask)
        t_ids = torch.from_numpy(ids.astype(np.int64)).to(self.device)
        t_mask = None if mask is None else torch.from_numpy(mask.astype(np.int64)).to(self.device)
        return t_ids, t_mask

    def _modules(self):
        return tap_modules(self.model, TAP_MAP, self.n_layers)

    def run(self, ids, mask=None) -> dict[str, np.ndarray]:
        """Full forward without a cache; every canonical tap."""
        t_ids, t_mask = self._inputs(ids, mask)
        captured, mixer_masks, handles = attach_taps(self._modules())
        try:
            with self._running():
                self.model(input_ids=t_ids, attention_mask=t_mask, use_cache=False)
                for i in range(self.n_layers):
                    captured[f"layers.{i}.mixer.conv"] = self._derived_conv(
                        i, captured[f"layers.{i}.mixer.in_proj"], mixer_masks[i])
        finally:
            for h in handles:
                h.remove()
        self.recorder.require_called("mamba2_chunk_scan", "causal_conv1d_fn", what="a full forward")
        return {name: to_numpy(captured[name]) for name in self.tap_names}

    def _derived_conv(self, i: int, zxbcdt: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return derived_conv(self.mm, self.recorder, self.model.backbone.layers[i].mixer, zxbcdt, mask)

    def step_logits(self, ids, mask, prompt_len: int) -> np.ndarray:
        """Teacher forcing through the cache, as `generate` drives it: prefill ids[:, :prompt_len]
        (use_cache=True, a fresh DynamicCache), then one token per call with the cache; the
        padding mask only reaches the prefill (Mamba2ForCausalLM.prepare_inputs_for_generation
        drops it after the first iteration). Returns (b, l - prompt_len + 1, v)."""
        t_ids, t_mask = self._inputs(ids, mask)
        l = t_ids.shape[1]
        if isinstance(prompt_len, bool) or not isinstance(prompt_len, int | np.integer) \
                or not 1 <= prompt_len <= l:
            raise ReferenceError(f"prompt_len: expected an int in [1, l={l}], got {prompt_len!r}")
        from transformers import DynamicCache

        steps = []
        with self._running():
            cache = DynamicCache(config=self.config)  # what generate hands the prefill
            out = self.model(input_ids=t_ids[:, :prompt_len], use_cache=True, **{self.cache_kwarg: cache},
                             attention_mask=None if t_mask is None else t_mask[:, :prompt_len])
            steps.append(out.logits[:, -1])
            for t in range(prompt_len, l):
                out = self.model(input_ids=t_ids[:, t:t + 1], use_cache=True, **{self.cache_kwarg: cache})
                steps.append(out.logits[:, -1])
        if l > prompt_len:
            self.recorder.require_called("mamba2_selective_state_update", what="a cached decode step")
        return to_numpy(torch.stack(steps, dim=1))

    def generate(self, prompt, mask=None, max_new_tokens: int = 32,
                 eos_id: int | None = None) -> GenerateResult:
        """transformers `generate(do_sample=False)`; margins = top-1 minus top-2 raw logit per step,
        NaN after a row's eos (its later tokens are pad, as in the port)."""
        t_ids, t_mask = self._inputs(prompt, mask)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ReferenceError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
        if eos_id is not None and not 0 <= eos_id < self.config.vocab_size:
            raise ReferenceError(f"eos_id: expected None or an id in [0, {self.config.vocab_size}), "
                                 f"got {eos_id}")
        if t_mask is None:
            t_mask = torch.ones_like(t_ids)
        with self._running():
            out = self.model.generate(input_ids=t_ids, attention_mask=t_mask, do_sample=False, num_beams=1,
                                      max_new_tokens=max_new_tokens, eos_token_id=eos_id,
                                      pad_token_id=self.pad_id, output_logits=True,
                                      return_dict_in_generate=True)
        if out.sequences.shape[1] > t_ids.shape[1] + 1:
            self.recorder.require_called("mamba2_selective_state_update", what="generate's decode steps")
        tokens = out.sequences[:, t_ids.shape[1]:].cpu().numpy().astype(np.int32)
        logits = torch.stack(out.logits, dim=1).double()  # b T v
        top2 = torch.topk(logits, 2, dim=-1).values
        margins = (top2[..., 0] - top2[..., 1]).cpu().numpy().astype(np.float32)
        if eos_id is not None:
            after_eos = np.cumsum(tokens == eos_id, axis=1) - (tokens == eos_id) > 0
            margins[after_eos] = np.nan
        return GenerateResult(tokens, margins, int(tokens.shape[1]))

    # ----------------------------------------------------------------------------------------
    def _known_defects(self) -> list[str]:
        """Where this reference is known to be wrong for this checkpoint (so a report can say so)."""
        out = []
        lo, hi = self.config.time_step_limit
        if (lo, hi) != (0.0, float("inf")):
            out.append(f"time_step_limit={[lo, hi]}: transformers' cached decode step "
                       "(mamba2_selective_state_update) does not clamp dt, its full forward does: "
                       "step_logits and generate differ from run() "
                       "(docs/porting-bugs.md #4, transformers#35154)")
        if self.config.use_bias:
            out.append("use_bias=True: Mamba2Mixer masks in_proj's input, not its output, so a padded "
                       "position's in_proj output is the bias and reaches the causal conv of the next "
                       "k-1 real tokens: a left-padded row differs from the sequence alone "
                       "(docs/porting-bugs.md #6)")
        return out

    def provenance(self) -> dict:
        """JSON-serialisable: versions, which code path ran, precision settings, derived taps."""
        paths = self.recorder.record()
        return {
            "reference": "transformers Mamba2ForCausalLM",
            "checkpoint": Path(self.checkpoint).name,  # the name only: recordings stay location-free
            "dtype": self.dtype,
            "versions": prov.versions(),
            "untested_versions": prov.untested_versions(),
            "code_paths": paths,
            "path": "torch fallback",
            "kernel_control": {
                **dispatch.import_record(),
                "blocked_packages": list(prov.KERNEL_PACKAGES),
                "why": "transformers binds mamba_ssm / causal_conv1d kernels when they are importable at its "
                       "first import of modeling_mamba2, and they crash a CPU forward; the reference is "
                       "defined as the torch fallback (docs/architecture.md), so the packages are hidden at "
                       "that import and every dispatched call runs the torch body",
            },
            "float64_lift": {"active": self.lift, "lifted_casts": dict(sorted(self.lifted_sites.items()))}
            if self.dtype == "float64" else None,
            "known_reference_defects": self._known_defects(),
            "environment": prov.environment(self.device),
            "derived_taps": {k.replace("{i}", "*"): v for k, v in DERIVED.items()},
            "tap_map": {tap: f"{path} ({kind})" for tap, path, kind in TAP_MAP},
        }
