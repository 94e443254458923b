"""mamba_ssm 2.3.2.post1's `MambaLMHeadModel` built from a transformers-format Mamba-2 checkpoint.

Three steps, each checked:

1. import: `load_mamba_ssm_model()` imports `mamba_ssm.models.mixer_seq_simple` without running
   `mamba_ssm/__init__.py` (a bare package object, as mamba_ssm_refs.py does). That module
   imports `mamba_ssm.modules.mamba_simple` (Mamba-1), which imports the compiled
   `selective_scan_cuda` at module level; where that extension is not built, a stub module (named
   `selective_scan_cuda`, every attribute access raising) stands in for the import only. Mamba-2
   layers never call it. sys.modules is then put back exactly as found for `mamba_ssm*` and the
   stubs, so a later `import mamba_ssm` (transformers' kernel binding, docs/architecture.md) still fails and
   transformers keeps its torch fallback. The classes keep working: each holds its module globals.
2. config: `translate_config(dir)` reads config.json with the port's strict reader (every attribute
   mapped, harmless or refused), then maps it onto `MambaConfig`; any attribute with no faithful
   MambaLMHeadModel counterpart is refused by name (UnsupportedFeatureError, one line).
3. weights: `map_state_dict` renames transformers keys to mamba_ssm's (only the embedding differs),
   refusing any key it does not know; `build_model` loads the result with strict=True.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import math
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from equiv.errors import CheckpointError, ConfigError, UnsupportedFeatureError
from equiv_reference.mamba_ssm_refs import PACKAGE, bare_package, restore_modules

MODEL_MODULE = "mamba_ssm.models.mixer_seq_simple"
STUBBED = ("selective_scan_cuda",)
"""Compiled extensions imported at module level on the import path of MambaLMHeadModel but used
only by Mamba-1 (mamba_ssm.ops.selective_scan_interface)."""


class MambaSsmModelUnavailable(ImportError):
    """mamba_ssm (or what its model code imports: torch, einops, triton, huggingface_hub) is missing."""


@dataclass(frozen=True)
class MambaSsmModules:
    """The mamba_ssm modules the runner needs (held here: they are not left in sys.modules)."""

    mixer_seq_simple: types.ModuleType  # MambaLMHeadModel, MixerModel
    config_mamba: types.ModuleType  # MambaConfig
    mamba2: types.ModuleType  # Mamba2 and the kernel globals it dispatches to
    block: types.ModuleType  # Block (fused add + norm)
    generation: types.ModuleType  # InferenceParams, decode
    version: str
    stubs_installed: tuple[str, ...]


def _stub(name: str) -> types.ModuleType:
    """A module that imports but refuses every use, saying why. AttributeError, so that hasattr()
    probes (inspect.getmodule walks sys.modules asking for __file__) see a plain missing attribute."""
    mod = types.ModuleType(name)
    mod.__doc__ = (f"stub installed by equiv_reference.mamba2.mamba_ssm_model: the compiled {name} "
                   "is not built")

    def __getattr__(attr):
        raise AttributeError(f"{name}.{attr}: {name} is a stub "
                             "(equiv_reference.mamba2.mamba_ssm_model); the compiled "
                           "extension is not installed, and Mamba-2 layers never need it")

    mod.__getattr__ = __getattr__
    return mod


def _owned(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".") or name in STUBBED


def _load() -> MambaSsmModules:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MambaSsmModelUnavailable("mamba_ssm is not installed (pip install mamba-ssm==2.3.2.post1, see "
                                       "equiv_reference/mamba_ssm_refs.py for a CPU-only install)")
    try:
        version = importlib.metadata.version("mamba-ssm")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    before = {k: v for k, v in sys.modules.items() if _owned(k)}
    stubs = tuple(n for n in STUBBED if n not in sys.modules and importlib.util.find_spec(n) is None)
    sys.modules[PACKAGE] = bare_package(spec)  # shadows a real one too: its __init__ must not run here
    sys.modules.update({n: _stub(n) for n in stubs})
    try:
        mods = {name: importlib.import_module(f"{PACKAGE}.{path}") for name, path in (
            ("mixer_seq_simple", "models.mixer_seq_simple"), ("config_mamba", "models.config_mamba"),
            ("mamba2", "modules.mamba2"), ("block", "modules.block"), ("generation", "utils.generation"))}
    except ImportError as e:
        raise MambaSsmModelUnavailable(
            f"mamba_ssm {version}: {MODEL_MODULE} failed to import ({type(e).__name__}: {e}); it needs "
            "torch, einops, triton and huggingface_hub") from e
    finally:
        restore_modules(before, _owned)  # the stubs too
    return MambaSsmModules(version=version, stubs_installed=stubs, **mods)


_CACHE: list[MambaSsmModules] = []


def load_mamba_ssm_model() -> MambaSsmModules:
    """mamba_ssm's model modules, imported once per process, sys.modules left as found."""
    if not _CACHE:
        _CACHE.append(_load())
    return _CACHE[0]


# ---------------------------------------------------------------------------------------------
# config

# transformers attribute -> where it goes in MambaConfig (values come from the strict reader)
TRANSLATED = {
    "hidden_size": "d_model", "num_hidden_layers": "n_layer", "vocab_size": "vocab_size",
    "state_size": "ssm_cfg.d_state", "conv_kernel": "ssm_cfg.d_conv", "expand": "ssm_cfg.expand",
    "head_dim": "ssm_cfg.headdim", "num_heads": "implied: expand x d_model / headdim (checked equal)",
    "n_groups": "ssm_cfg.ngroups", "chunk_size": "ssm_cfg.chunk_size", "time_step_limit": "ssm_cfg.dt_limit",
    "use_bias": "ssm_cfg.bias", "use_conv_bias": "ssm_cfg.conv_bias", "residual_in_fp32": "residual_in_fp32",
    "tie_word_embeddings": "tie_embeddings", "layer_norm_epsilon": "fixed at 1e-5 in mamba_ssm (checked)",
    "hidden_act": "silu in Mamba2 (checked)", "rms_norm": "rms_norm",
    "norm_before_gate": "ssm_cfg.norm_before_gate",
    "model_type": "mamba2 (checked)",
}
# attributes with no effect on inference numerics (initialisation, generation ids, bookkeeping)
NOT_NUMERIC = {
    "eos_token_id", "pad_token_id", "bos_token_id", "time_step_min", "time_step_max", "time_step_floor",
    "time_step_rank", "initializer_range", "rescale_prenorm_residual", "use_cache", "transformers_version",
    "architectures", "dtype", "torch_dtype", "_name_or_path", "output_hidden_states", "output_attentions",
    "return_dict", "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
    "tokenizer_class", "emb_layer_norm_before",  # the last: not a Mamba-2 attribute, transformers ignores it
}
MAMBA_SSM_EPS = 1e-5  # MambaConfig has no eps: MixerModel's norm_epsilon default; Mamba2's gated norm


def translate_config(checkpoint_dir: str | Path) -> tuple[dict, object]:
    """(MambaConfig kwargs, the port's Mamba2Config) for a transformers-format checkpoint."""
    from equiv.io.json_reader import read_json_object
    from equiv.mamba2.config import load_config

    path = Path(checkpoint_dir) / "config.json"
    cfg, fmt = load_config(checkpoint_dir)  # strict: types, consistency, unknown attributes
    if fmt != "transformers":
        raise ConfigError(f"{path}: expected a transformers Mamba2 config.json (model_type 'mamba2'), got a "
                          "mamba_ssm one: the mamba_ssm reference's float64 oracle is transformers' model")
    raw = read_json_object(path, "config.json")
    problems = [f"{k} (no MambaLMHeadModel counterpart)" for k in sorted(raw)
                if k not in TRANSLATED and k not in NOT_NUMERIC]
    if cfg.norm_eps != MAMBA_SSM_EPS:
        problems.append(f"layer_norm_epsilon: expected {MAMBA_SSM_EPS} (MambaConfig has no eps: every "
                        f"RMSNorm and Mamba2's gated norm use 1e-5), got {cfg.norm_eps}")
    if problems:
        raise UnsupportedFeatureError(f"{path}: not translatable to mamba_ssm MambaLMHeadModel: "
                                      + "; ".join(problems))
    lo, hi = cfg.time_step_limit
    ssm_cfg = {
        "layer": "Mamba2", "d_state": cfg.d_state, "d_conv": cfg.conv_kernel, "expand": cfg.expand,
        "headdim": cfg.head_dim, "ngroups": cfg.n_groups, "chunk_size": cfg.chunk_size,
        "dt_limit": (float(lo), float(hi)),  # a tuple: Mamba2 compares it with (0.0, inf) by ==
        "bias": cfg.use_bias, "conv_bias": cfg.use_conv_bias, "D_has_hdim": cfg.d_has_hdim,
        "rmsnorm": True, "norm_before_gate": False, "d_ssm": None,
        # the fused path needs causal_conv1d's CUDA extension; the split path runs the same kernels
        # for the scan and the gated norm and exposes every tap to module hooks
        "use_mem_eff_path": False,
    }
    kwargs = {"d_model": cfg.d_model, "d_intermediate": 0, "n_layer": cfg.n_layers,
              "vocab_size": cfg.vocab_size, "ssm_cfg": ssm_cfg, "attn_layer_idx": [], "attn_cfg": {},
              "rms_norm": True, "residual_in_fp32": cfg.residual_in_fp32, "fused_add_norm": True,
              "pad_vocab_size_multiple": 1, "tie_embeddings": cfg.tie_embeddings}
    return kwargs, cfg


def config_for_json(kwargs: dict) -> dict:
    """The translated config as JSON can hold it (inf as a string)."""
    out = {**kwargs, "ssm_cfg": dict(kwargs["ssm_cfg"])}
    out["ssm_cfg"]["dt_limit"] = [x if math.isfinite(x) else str(x) for x in kwargs["ssm_cfg"]["dt_limit"]]
    return out


# ---------------------------------------------------------------------------------------------
# weights

_LAYER_KEY = re.compile(r"backbone\.layers\.(\d+)\.(norm\.weight|mixer\.(?:A_log|D|dt_bias|conv1d\.weight|"
                        r"conv1d\.bias|in_proj\.weight|in_proj\.bias|norm\.weight|out_proj\.weight|out_proj\.bias))")
RENAMED = {"backbone.embeddings.weight": "backbone.embedding.weight"}
SAME = ("backbone.norm_f.weight", "lm_head.weight")


def map_state_dict(tensors: dict[str, np.ndarray], tie_embeddings: bool) -> dict[str, np.ndarray]:
    """transformers Mamba2ForCausalLM keys -> MambaLMHeadModel keys. Every key is matched by an
    explicit rule; an unknown one is a CheckpointError (a silently dropped tensor is a wrong model)."""
    out, unknown = {}, []
    for key, value in tensors.items():
        if key in RENAMED:
            out[RENAMED[key]] = value
        elif key in SAME or _LAYER_KEY.fullmatch(key):
            out[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"checkpoint: expected transformers Mamba2ForCausalLM keys, got keys with "
                              f"no MambaLMHeadModel counterpart ({len(unknown)}): "
                              f"{', '.join(sorted(unknown)[:8])}")
    emb = out.get("backbone.embedding.weight")
    if tie_embeddings and emb is not None:
        head = out.get("lm_head.weight")
        if head is not None and not np.array_equal(head, emb):
            raise CheckpointError("checkpoint: tie_word_embeddings is true, expected lm_head.weight absent "
                                  "or equal to backbone.embeddings.weight, got a different tensor")
        out["lm_head.weight"] = emb  # MambaLMHeadModel's state_dict lists the tied head under both names
    return out


def _torch_tensor(a: np.ndarray):
    import torch

    if a.dtype.kind == "V" or a.dtype.name == "bfloat16":  # ml_dtypes bf16: torch.from_numpy cannot
        return torch.from_numpy(np.asarray(a, np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def build_model(checkpoint_dir: str | Path, dtype, device: str = "cuda"):
    """(MambaLMHeadModel with the checkpoint's weights loaded strictly, translated kwargs, Mamba2Config).
    Constructed with `device`/`dtype` and then loaded, as mamba_ssm's own from_pretrained does (so D
    stays float32, as Mamba2 creates it, whatever the dtype)."""
    import torch

    from equiv.io.checkpoint_files import read_tensors

    mods = load_mamba_ssm_model()
    kwargs, cfg = translate_config(checkpoint_dir)
    state = map_state_dict(read_tensors(checkpoint_dir), cfg.tie_embeddings)
    torch.manual_seed(0)  # construction initialises weights randomly before they are overwritten
    model = mods.mixer_seq_simple.MambaLMHeadModel(mods.config_mamba.MambaConfig(**kwargs), device=device,
                                                   dtype=dtype)
    try:
        model.load_state_dict({k: _torch_tensor(v) for k, v in state.items()}, strict=True)
    except RuntimeError as e:  # missing / unexpected / shape: torch lists them over many lines
        detail = " ".join(str(e).split())
        raise CheckpointError(f"checkpoint: expected exactly MambaLMHeadModel's tensors (strict load), got: "
                              f"{detail[:600]}") from None
    return model.eval(), kwargs, cfg
