"""The PyTorch reference for Mamba-1 and Falcon-Mamba: transformers `MambaForCausalLM` /
`FalconMambaForCausalLM` (chosen by config.json's model_type), on its torch path, with taps.

Everything in and out is numpy, as for Mamba-2: ids int32 (b, l), mask None or (b, l) of 0/1 with
sequences left-padded (passed as attention_mask), taps keyed by the canonical names of
equiv/mamba1/taps.py, in the run dtype (float64 for the oracle, bf16 values as float32). Taps come from
forward hooks / pre-hooks on the library's own modules, never from editing it. Mirrors
`MambaMixer.forward` / `FalconMambaMixer.forward`, `mamba_scan_forward` and `mamba_selective_scan` of
transformers/models/{mamba,falcon_mamba}/modeling_*.py (5.25). Where no module boundary exists, the tap
is recomputed after the forward from tensors captured while it ran, with the library's own operations
(see DERIVED): the dispatch recorder hands the runner the exact arguments the mixer passed to
`mamba_selective_scan`.

Float64 is the oracle: transformers casts to float32 inside the model whatever its dtype
(`A = -torch.exp(A_log.float())`, `dt_proj.bias.float()`, `D.float()`, B and x `.float()` in the
scan, the decode step's `.float()`s, MambaRMSNorm's `.to(torch.float32)`, the residual's
`.to(torch.float32)`, Falcon-Mamba's dt/B/C norms' `x.float()`, the logits' `.float()`), so float64
runs go through `equiv_reference.float64_oracle.Float64Lift`, which turns every float64 -> float32 cast
into a no-op, unless `lift_float32_casts=False` asks for the library's literal behaviour.
"""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path

import numpy as np
import torch

from equiv.errors import CheckpointError, ConfigError, EquivError, first_line
from equiv.inputs import check_tokens
from equiv.mamba1.taps import tap_names
from equiv.ports import GenerateResult
from equiv_reference import provenance as prov
from equiv_reference.float64_oracle import Float64Lift
from equiv_reference.mamba1.provenance import (
    CLASSES,
    SCAN,
    STATE_UPDATE,
    DispatchRecorder,
    import_modeling,
    import_record,
)
from equiv_reference.torch_taps import to_numpy

# ---------------------------------------------------------------------------------------------
# canonical tap -> (module of the model, what is captured)
#   output  : the module's forward output (forward hook)
#   input0  : the module's first positional input (forward pre-hook)
#   split k : x_proj's output split [r, n, n] as the mixer splits it, part k
#   derived : recomputed after the forward from the scan's captured arguments (DERIVED)
COMMON_TAPS = (
    ("embed", "backbone.embeddings", "output"),
    ("layers.{i}.norm", "backbone.layers.{i}.norm", "output"),
    ("layers.{i}.mixer.in_proj", "backbone.layers.{i}.mixer.in_proj", "output"),
    # x_proj's input is the conv output after SiLU and apply_mask_to_padding_states, batch-first
    ("layers.{i}.mixer.conv", "backbone.layers.{i}.mixer.x_proj", "input0"),
    ("layers.{i}.mixer.dt_proj", "backbone.layers.{i}.mixer", "derived"),
    ("layers.{i}.mixer.ssm", "backbone.layers.{i}.mixer", "derived"),
    ("layers.{i}.mixer.gate", "backbone.layers.{i}.mixer.out_proj", "input0"),
    ("layers.{i}.mixer.out_proj", "backbone.layers.{i}.mixer.out_proj", "output"),
    ("layers.{i}", "backbone.layers.{i}", "output"),
    ("norm_f", "backbone.norm_f", "output"),
    ("logits", "lm_head", "output"),  # before the CausalLM's `.float()`: the run dtype
)
DT_B_C_TAPS = {
    "mamba": (("layers.{i}.mixer.x_proj.dt", "backbone.layers.{i}.mixer.x_proj", "split 0"),
              ("layers.{i}.mixer.x_proj.B", "backbone.layers.{i}.mixer.x_proj", "split 1"),
              ("layers.{i}.mixer.x_proj.C", "backbone.layers.{i}.mixer.x_proj", "split 2")),
    "falcon_mamba": (("layers.{i}.mixer.x_proj.dt", "backbone.layers.{i}.mixer.dt_layernorm", "output"),
                     ("layers.{i}.mixer.x_proj.B", "backbone.layers.{i}.mixer.b_layernorm", "output"),
                     ("layers.{i}.mixer.x_proj.C", "backbone.layers.{i}.mixer.c_layernorm", "output")),
}
DERIVED = {
    "layers.{i}.mixer.dt_proj": f"{SCAN}'s own first step on its captured arguments: "
                                "dt + delta_bias.to(dt.dtype)[..., None], where the mixer passed "
                                "dt = dt_proj.weight @ dt_low and delta_bias = dt_proj.bias.float() "
                                "(dt_proj is never called as a module)",
    "layers.{i}.mixer.ssm": f"{SCAN}'s torch body rerun on the arguments the mixer passed it, with z=None: "
                            "the same scan and D * x, before the gate (which happens inside that function)",
}

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


class ReferenceError(EquivError):
    """The reference cannot run as asked (bad dtype, missing checkpoint)."""


def _model_type(checkpoint_dir: Path) -> str:
    from equiv.io.json_reader import read_json_object

    path = checkpoint_dir / "config.json"
    raw = read_json_object(path, "config.json", error=CheckpointError)  # bounded, strict
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in CLASSES:
        raise ConfigError(f"{path}: expected model_type 'mamba' or 'falcon_mamba', got {model_type!r}")
    return model_type


class MambaTransformersRunner:
    """`run`, `step_logits`, `generate`, `provenance` over one Mamba-1 / Falcon-Mamba checkpoint in one
    dtype."""

    name = "transformers"

    def __init__(self, checkpoint_dir: str | Path, dtype: str = "float32", *, device: str = "cpu",
                 lift_float32_casts: bool | None = None):
        if dtype not in DTYPES:
            raise ReferenceError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
        checkpoint_dir = Path(checkpoint_dir)
        if not (checkpoint_dir / "config.json").is_file():
            raise ReferenceError(f"checkpoint: expected {checkpoint_dir}/config.json, it does not exist")
        self.lift = (dtype == "float64") if lift_float32_casts is None else bool(lift_float32_casts)
        if self.lift and dtype != "float64":
            raise ReferenceError(f"lift_float32_casts: only meaningful for float64, got dtype {dtype!r}")
        self.model_type = _model_type(checkpoint_dir)
        self.mm = import_modeling(self.model_type)
        self.dtype, self.device, self.checkpoint = dtype, device, str(checkpoint_dir)
        from transformers import GenerationConfig
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        cls = getattr(self.mm, CLASSES[self.model_type][1])
        try:
            with prov.kernel_packages_hidden():
                model = cls.from_pretrained(checkpoint_dir, local_files_only=True, dtype=torch.float32)
        except Exception as e:  # transformers' own exception would escape the CLI as a traceback
            raise CheckpointError(f"{checkpoint_dir}: expected a checkpoint transformers' "
                                  f"{cls.__name__}.from_pretrained can load, it raised "
                                  f"{type(e).__name__}: {first_line(e)}") from e
        self.model = model.to(device=device, dtype=DTYPES[dtype]).eval()
        self.config = model.config
        self.pad_id = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        # generation stops only at the eos a caller passes (the checkpoint's own eos/bos ignored)
        self.model.generation_config = GenerationConfig(pad_token_id=self.pad_id)
        self.n_layers = self.config.num_hidden_layers
        self.tap_names = tap_names(self.n_layers)
        self.tap_map = COMMON_TAPS[:4] + DT_B_C_TAPS[self.model_type] + COMMON_TAPS[4:]
        self.recorder = DispatchRecorder(self.mm)
        self.lifted_sites: dict[str, int] = {}
        self.hook_points = self._resolve_modules()
        # 5.24 renamed forward's `cache_params` to `cache` (the old name warns until 5.40)
        self.cache_kwarg = "cache" if "cache" in inspect.signature(self.model.forward).parameters \
            else "cache_params"
        scan_params = inspect.signature(self.recorder.torch_body(SCAN)).parameters
        missing = [p for p in ("hidden_states", "dt", "delta_bias", "z", "return_last_state")
                   if p not in scan_params]
        if missing:
            raise prov.reference_changed(f"{self.mm.__name__}.{SCAN} no longer takes {missing}: the dt_proj "
                                         "and ssm taps cannot be recomputed from its arguments")

    # ----------------------------------------------------------------------------------------
    def _resolve_modules(self) -> list[tuple[str, torch.nn.Module, str]]:
        """(tap, module, kind) for every hooked tap; a module the tap map names but the model lacks
        means the library's structure changed."""
        named = dict(self.model.named_modules())
        out, missing = [], []
        for tap, path, kind in self.tap_map:
            for i in range(self.n_layers) if "{i}" in tap else [None]:
                module = named.get(path.format(i=i))
                if module is None:
                    missing.append(path.format(i=i))
                else:
                    out.append((tap.format(i=i), module, kind))
        if missing:
            raise prov.reference_changed(f"{type(self.model).__name__} has no module {missing[0]}, where the "
                                         f"taps of equiv/mamba1/taps.py are captured")
        return out

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

    def _hook(self, tap: str, module: torch.nn.Module, kind: str, captured: dict):
        if kind == "output":
            return module.register_forward_hook(lambda mod, args, out: captured.__setitem__(tap, out))
        if kind == "input0":
            return module.register_forward_pre_hook(lambda mod, args: captured.__setitem__(tap, args[0]))
        if kind.startswith("split "):
            mixer = self.model.backbone.layers[int(tap.split(".")[1])].mixer
            sizes = [mixer.time_step_rank, mixer.ssm_state_size, mixer.ssm_state_size]
            part = int(kind.split()[1])
            return module.register_forward_hook(  # exactly MambaMixer.forward's torch.split
                lambda mod, args, out: captured.__setitem__(tap, torch.split(out, sizes, dim=-1)[part]))
        raise AssertionError(kind)

    def run(self, ids, mask=None) -> dict[str, np.ndarray]:
        """Full forward without a cache; every canonical tap."""
        t_ids, t_mask = self._inputs(ids, mask)
        captured: dict[str, torch.Tensor] = {}
        scan_args: dict[int, list[inspect.BoundArguments]] = {}
        layer = [None]  # the mixer running now (set by its pre-hook), for the scan's arguments
        handles = [self._hook(tap, module, kind, captured)
                   for tap, module, kind in self.hook_points if kind != "derived"]
        for i, block in enumerate(self.model.backbone.layers):
            handles.append(block.mixer.register_forward_pre_hook(
                lambda mod, args, i=i: layer.__setitem__(0, i)))

        def listener(name, args, kwargs):
            if name == SCAN:
                scan_args.setdefault(layer[0], []).append(self._bind_scan(args, kwargs))

        self.recorder.listener = listener
        try:
            with self._running():
                self.model(input_ids=t_ids, attention_mask=t_mask, use_cache=False)
                self.recorder.listener = None
                for i in range(self.n_layers):
                    calls = scan_args.get(i, [])
                    if len(calls) != 1:
                        raise prov.reference_changed(f"layer {i}'s mixer called {SCAN} {len(calls)} times "
                                                     "in a forward without cache; expected once")
                    captured[f"layers.{i}.mixer.dt_proj"], captured[f"layers.{i}.mixer.ssm"] = \
                        self._derived(calls[0])
        finally:
            self.recorder.listener = None
            for h in handles:
                h.remove()
        self.recorder.require_called(SCAN, "causal_conv1d_fn", what="a full forward")
        self.recorder.require_sequential_scan(what="a full forward")
        self._check_taps(captured, *t_ids.shape)
        return {name: to_numpy(captured[name]) for name in self.tap_names}

    def _bind_scan(self, args, kwargs) -> inspect.BoundArguments:
        bound = inspect.signature(self.recorder.torch_body(SCAN)).bind(*args, **kwargs)
        bound.apply_defaults()
        return bound

    def _derived(self, bound: inspect.BoundArguments) -> tuple[torch.Tensor, torch.Tensor]:
        """(dt_proj, ssm) taps, batch-first, from the scan's arguments (DERIVED says how)."""
        a = bound.arguments
        dt = a["dt"] if a["delta_bias"] is None else a["dt"] + a["delta_bias"].to(a["dt"].dtype)[..., None]
        ungated = dict(a, z=None, return_last_state=False)
        ungated.update(ungated.pop("kwargs", {}))
        ssm = self.recorder.torch_body(SCAN)(**ungated)
        return dt.transpose(1, 2), ssm.transpose(1, 2)

    def _check_taps(self, captured: dict, b: int, l: int) -> None:
        """Every tap captured, with its documented shape: a hook that never fired or a changed layout
        means the library's structure changed."""
        cfg = self.config
        e, r, n = cfg.intermediate_size, int(cfg.time_step_rank), cfg.state_size
        d = cfg.hidden_size
        width = {"embed": d, "norm": d, "mixer.in_proj": 2 * e, "mixer.conv": e, "mixer.x_proj.dt": r,
                 "mixer.x_proj.B": n, "mixer.x_proj.C": n, "mixer.dt_proj": e, "mixer.ssm": e,
                 "mixer.gate": e, "mixer.out_proj": d, "block": d, "norm_f": d, "logits": cfg.vocab_size}
        for tap in self.tap_names:
            parts = tap.split(".", 2)
            want = (b, l, width[parts[2] if len(parts) == 3 else "block" if len(parts) == 2 else tap])
            got = captured.get(tap)
            if got is None or tuple(got.shape) != want:
                raise prov.reference_changed(
                    f"tap {tap}: expected a {want} tensor from {type(self.model).__name__}, got "
                    f"{'nothing (its hook never fired)' if got is None else tuple(got.shape)}")

    def step_logits(self, ids, mask, prompt_len: int) -> np.ndarray:
        """Teacher forcing through the cache, as `generate` drives it: prefill ids[:, :prompt_len]
        (use_cache=True, a fresh DynamicCache), then one token per call with the cache; the padding
        mask only reaches the prefill (MambaForCausalLM.prepare_inputs_for_generation drops it after
        the first iteration). Returns (b, l - prompt_len + 1, v)."""
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
        self.recorder.require_called(SCAN, what="a prefill")
        self.recorder.require_sequential_scan(what="a prefill")
        if l > prompt_len:
            self.recorder.require_called(STATE_UPDATE, "causal_conv1d_update", what="a cached decode step")
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
        self.recorder.require_called(SCAN, what="generate's prefill")
        self.recorder.require_sequential_scan(what="generate's prefill")
        if out.sequences.shape[1] > t_ids.shape[1] + 1:
            self.recorder.require_called(STATE_UPDATE, what="generate's decode steps")
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
        if self.config.use_bias:
            out.append("use_bias=True: the mixer masks in_proj's input, not its output, so a padded "
                       "position's in_proj output is the bias and reaches the causal conv of the next "
                       "conv_kernel-1 real tokens: a left-padded row differs from the sequence alone")
        return out

    def provenance(self) -> dict:
        """JSON-serialisable: class, versions, which code ran (scan branch included), precision settings."""
        import transformers

        package = Path(transformers.__file__).resolve().parent.parent
        module_file = Path(self.mm.__file__).resolve()
        return {
            "reference": f"transformers {type(self.model).__name__}",
            "class": f"{type(self.model).__module__}.{type(self.model).__qualname__}",
            "module_file": module_file.relative_to(package).as_posix()
            if module_file.is_relative_to(package) else str(module_file),
            "checkpoint": Path(self.checkpoint).name,  # the name only: recordings stay location-free
            "model_type": self.model_type,
            "dtype": self.dtype,
            "device": self.device,
            "threads": torch.get_num_threads(),
            "versions": prov.versions(),
            "untested_versions": prov.untested_versions(),
            "code_paths": self.recorder.record(),
            "path": "torch path, sequential selective scan",
            "scan_config": {"use_mambapy": bool(getattr(self.config, "use_mambapy", False)),
                            "use_associative_scan": bool(getattr(self.config, "use_associative_scan", False)),
                            "note": "what the config asks for; code_paths.scan says which branch ran"},
            "kernel_control": {
                **import_record(self.mm),
                "blocked_packages": list(prov.KERNEL_PACKAGES),
                "why": "the module binds mamba_ssm / causal_conv1d kernels when they import at its first "
                       "import; the reference is defined as the torch path, so the packages are hidden at "
                       "that import and every dispatched call runs its torch body",
            },
            "float64_lift": {"active": self.lift, "lifted_casts": dict(sorted(self.lifted_sites.items()))}
            if self.dtype == "float64" else None,
            "known_reference_defects": self._known_defects(),
            "environment": prov.environment(self.device),
            "derived_taps": {k.replace("{i}", "*"): v for k, v in DERIVED.items()},
            "tap_map": {tap: f"{path} ({kind})" for tap, path, kind in self.tap_map},
        }
