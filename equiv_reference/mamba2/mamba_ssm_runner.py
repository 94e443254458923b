"""The mamba_ssm reference: `MambaLMHeadModel` (mamba_ssm 2.3.2.post1) on CUDA, with taps.

Same interface as equiv_reference/mamba2/transformers_runner.py (`run`, `step_logits`, `generate`,
`provenance`), everything in and out numpy. The model comes from equiv_reference/mamba2/mamba_ssm_model.py
(strict config translation and key mapping). What runs, per Mamba2 layer (`use_mem_eff_path=False`:
the fused path needs causal_conv1d's CUDA extension, which is not installed):

    Block: Triton `layer_norm_fn` (fused residual add + RMSNorm)  -> mixer input
    Mamba2.forward: in_proj -> conv (causal_conv1d_fn if installed, else torch nn.Conv1d + SiLU)
      -> Triton `mamba_chunk_scan_combined` (SSD incl. D) -> Triton RMSNormGated -> out_proj
    Mamba2.step (decode): torch conv update (or causal_conv1d_update) -> Triton
      `selective_state_update` -> Triton RMSNormGated

Taps come from forward hooks / pre-hooks on the library's modules, never from editing it; call
counters (module hooks, and the mamba2/block modules' kernel globals swapped for counting wrappers
while the runner calls the model) record which path actually ran. mamba_ssm takes no attention
mask: a left-padded batch is refused, never computed with its pad tokens as input.

float64 is not offered: the float64 oracle for a mamba_ssm comparison is transformers' model in
float64 (the same math; equiv_reference.mamba2.references.load_oracle). device="cpu" is for tests
only: it runs the same Triton kernel sources through Triton's interpreter (TRITON_INTERPRET=1, set
before the first import of mamba_ssm), numpy arithmetic, no TF32.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import torch

from equiv.errors import EquivError
from equiv.inputs import check_tokens
from equiv.mamba2.taps import tap_names
from equiv.ports import GenerateResult
from equiv_reference import provenance as prov
from equiv_reference.mamba2.mamba_ssm_model import build_model, config_for_json, load_mamba_ssm_model
from equiv_reference.torch_taps import tap_modules, to_numpy

# canonical tap -> (module of MambaLMHeadModel, what is captured): output | input0 | derived
TAP_MAP = (
    ("embed", "backbone.embedding", "output"),
    ("layers.{i}.norm", "backbone.layers.{i}.mixer", "input0"),  # fused add+norm is no module call
    ("layers.{i}.mixer.in_proj", "backbone.layers.{i}.mixer.in_proj", "output"),
    ("layers.{i}.mixer.conv", "backbone.layers.{i}.mixer.act", "output"),  # torch conv path only
    ("layers.{i}.mixer.ssm", "backbone.layers.{i}.mixer.norm", "input0"),  # scan output incl. D skip
    ("layers.{i}.mixer.gated_norm", "backbone.layers.{i}.mixer.norm", "output"),
    ("layers.{i}.mixer.out_proj", "backbone.layers.{i}.mixer.out_proj", "output"),
    ("layers.{i}", "backbone.layers.{i}", "derived"),
    ("norm_f", "backbone", "output"),  # MixerModel ends with the (fused) final norm
    ("logits", "lm_head", "output"),
)
NOTES = {
    "layers.*.norm": "the input of backbone.layers.*.mixer: Block.forward's fused add + RMSNorm (Triton "
                     "layer_norm_fn) is a function call, so its output is taken where the mixer receives it",
    "layers.*.mixer.conv": "the output of mixer.act: Mamba2.forward's torch conv path computes "
                           "act(conv1d(xBC)[:, :, :l]) and the SiLU module's output is exactly the tap; with "
                           "causal_conv1d installed no module runs the conv and the tap is unavailable",
    "layers.*": "derived: Block returns (mixer output, residual) and the next Block's Triton kernel adds "
                "them; the tap is that sum, one float32 add, in float32 if residual_in_fp32 (as the kernel "
                "stores residual_out)",
    "norm_f": "the output of backbone (MixerModel): its last op is the fused add + final RMSNorm",
}
TF32_NOTE = ("mamba_ssm's Triton kernels (chunk scan, selective_state_update) run float32 tl.dot at Triton's "
             "default precision, TF32 tensor cores on sm80+, whatever torch's allow_tf32 flags say; "
             "docs/gpu.md measured mamba_chunk_scan_combined at 3200-5200x the torch float32 reference's "
             "error against the float64 oracle. As the budget's denominator, a large reference error makes "
             "the error budget lenient: read the raw port-vs-reference and port-vs-oracle errors too")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
COUNTED_GLOBALS = {  # module attr -> provenance key; swapped for counting wrappers during calls
    "mamba2": ("mamba_chunk_scan_combined", "mamba_split_conv1d_scan_combined", "selective_state_update",
               "causal_conv1d_fn", "causal_conv1d_update"),
    "block": ("layer_norm_fn",),
    "mixer_seq_simple": ("layer_norm_fn",),
}


class ReferenceError(EquivError):
    """The mamba_ssm reference cannot run as asked (dtype, device, mask, arguments)."""


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class _NoCudaDevice:
    """torch.cuda.device stand-in for the interpreter: mamba_ssm wraps kernel launches in
    `with torch.cuda.device(x.device.index)`, which fails for a CPU tensor (index None)."""

    def __init__(self, device):
        self.idx = device

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class MambaSsmRunner:
    """`run`, `step_logits`, `generate`, `provenance` over one checkpoint in one dtype."""

    name = "mamba_ssm"

    def __init__(self, checkpoint_dir: str | Path, dtype: str = "float32", *, device: str = "cuda",
                 cuda_graphs: bool = False):
        if dtype not in DTYPES:
            raise ReferenceError(f"dtype: expected one of {sorted(DTYPES)} for mamba_ssm (its float64 "
                                 "oracle is transformers in float64: "
                                 "equiv_reference.mamba2.references.load_oracle), "
                                 f"got {dtype!r}")
        if device == "cpu" and not _interpreted():
            raise ReferenceError("device: expected 'cuda' (mamba_ssm's Triton kernels), got 'cpu' without "
                                 "TRITON_INTERPRET=1 (the interpreter mode meant for tests)")
        if device != "cpu" and not torch.cuda.is_available():
            raise ReferenceError(f"device: expected a CUDA device for mamba_ssm's Triton kernels, got "
                                 f"{device!r} and torch.cuda.is_available() is False")
        checkpoint_dir = Path(checkpoint_dir)
        if not (checkpoint_dir / "config.json").is_file():
            raise ReferenceError(f"checkpoint: expected {checkpoint_dir}/config.json, it does not exist")
        self.mods = load_mamba_ssm_model()
        self.dtype, self.device, self.checkpoint = dtype, device, str(checkpoint_dir)
        self.cuda_graphs = bool(cuda_graphs)
        self.model, self.kwargs, self.cfg = build_model(checkpoint_dir, DTYPES[dtype], device)
        self.pad_id = self.cfg.pad_token_id if self.cfg.pad_token_id is not None else 0
        self.n_layers = self.cfg.n_layers
        self.tap_names = tap_names(self.n_layers)
        self.calls: dict[str, int] = {}
        self.unavailable: dict[str, str] = {}
        self._count_modules()

    # ----------------------------------------------------------------------------------------
    def _count_modules(self) -> None:
        """Permanent counting hooks: torch conv fallback, Triton gated norm, SiLU (conv tap source)."""
        for block in self.model.backbone.layers:
            mixer = block.mixer
            for key, module in (("torch_conv1d", mixer.conv1d), ("triton_rmsnorm_gated", mixer.norm)):
                module.register_forward_hook(lambda *_, key=key: self._count(key))

    def _count(self, key: str) -> None:
        self.calls[key] = self.calls.get(key, 0) + 1

    def _counting(self, key, fn):
        def wrapper(*args, **kwargs):
            self._count(key)
            return fn(*args, **kwargs)
        return wrapper

    @contextlib.contextmanager
    def _running(self):
        """no_grad, the kernel-global counters, and (interpreter) the torch.cuda.device stand-in."""
        saved = []
        for mod_name, attrs in COUNTED_GLOBALS.items():
            mod = getattr(self.mods, mod_name)
            for attr in attrs:
                fn = getattr(mod, attr, None)
                if fn is not None:
                    saved.append((mod, attr, fn))
                    setattr(mod, attr, self._counting(f"{mod_name}.{attr}", fn))
        cuda_device = torch.cuda.device
        if self.device == "cpu":
            torch.cuda.device = _NoCudaDevice
        try:
            with torch.no_grad():
                yield
        finally:
            torch.cuda.device = cuda_device
            for mod, attr, fn in saved:
                setattr(mod, attr, fn)

    def _inputs(self, ids, mask):
        ids, mask = check_tokens(ids, self.cfg.vocab_size, mask)
        if mask is not None and not mask.all():
            rows = np.flatnonzero(~mask.all(axis=1))
            raise ReferenceError(f"mask: mamba_ssm's MambaLMHeadModel takes no attention mask, expected None "
                                 f"or all ones, got {int((mask == 0).sum())} padded positions in rows "
                                 f"{rows[:8].tolist()}; run each sequence alone (batch 1)")
        return torch.from_numpy(ids.astype(np.int64)).to(self.device)

    def _modules(self):
        return tap_modules(self.model, TAP_MAP, self.n_layers)

    def run(self, ids, mask=None) -> dict[str, np.ndarray]:
        """Full forward without a cache; every canonical tap this model exposes (the rest are listed
        in provenance()['unavailable_taps'] and absent here, so the harness reports them)."""
        t_ids = self._inputs(ids, mask)
        captured: dict[str, torch.Tensor] = {}
        residual_fp32 = self.kwargs["residual_in_fp32"]

        def keep(name, kind):
            if kind == "output":
                return lambda mod, args, out: captured.__setitem__(name, out)
            if kind == "input0":
                return lambda mod, args: captured.__setitem__(name, args[0])

            def block_sum(mod, args, out):  # (mixer output, residual) -> the residual stream after it
                hidden, residual = out
                total = hidden.float() + residual.float()
                captured[name] = total if residual_fp32 else total.to(hidden.dtype)
            return block_sum

        handles = []
        for name, module, kind in self._modules():
            if kind == "input0":
                handles.append(module.register_forward_pre_hook(keep(name, kind)))
            else:
                handles.append(module.register_forward_hook(keep(name, kind)))
        try:
            with self._running():
                self.model(t_ids)
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in self.tap_names if n not in captured]
        for n in missing:
            self.unavailable[n] = ("no module of MambaLMHeadModel produced it in this run (causal_conv1d's "
                                   "fused conv runs as a function call)" if ".mixer.conv" in n
                                   else "no module of MambaLMHeadModel produced it in this run")
        return {n: to_numpy(captured[n]) for n in self.tap_names if n in captured}

    def _step(self, token: torch.Tensor, params) -> torch.Tensor:
        """One cached decode step, as mamba_ssm.utils.generation.decode's get_logits does it."""
        b = token.shape[0]
        pos = torch.full((b, 1), params.seqlen_offset, dtype=torch.long, device=token.device)
        logits = self.model(token, position_ids=pos, inference_params=params, num_last_tokens=1).logits[:, -1]
        params.seqlen_offset += 1
        return logits

    def step_logits(self, ids, mask, prompt_len: int) -> np.ndarray:
        """Teacher forcing through mamba_ssm's inference cache, as its `decode` drives it: prefill
        ids[:, :prompt_len] with a fresh InferenceParams, then Mamba2.step one token at a time.
        Returns (b, l - prompt_len + 1, v)."""
        t_ids = self._inputs(ids, mask)
        b, l = t_ids.shape
        if isinstance(prompt_len, bool) or not isinstance(prompt_len, int | np.integer) \
                or not 1 <= prompt_len <= l:
            raise ReferenceError(f"prompt_len: expected an int in [1, l={l}], got {prompt_len!r}")
        prompt_len = int(prompt_len)
        params = self.mods.generation.InferenceParams(max_seqlen=l + 1, max_batch_size=b)
        with self._running():
            prefill = self.model(t_ids[:, :prompt_len], inference_params=params, num_last_tokens=1)
            steps = [prefill.logits[:, -1]]
            params.seqlen_offset += prompt_len
            for t in range(prompt_len, l):
                steps.append(self._step(t_ids[:, t:t + 1], params))
        return to_numpy(torch.stack(steps, dim=1))

    def generate(self, prompt, mask=None, max_new_tokens: int = 32,
                 eos_id: int | None = None) -> GenerateResult:
        """mamba_ssm's own `MambaLMHeadModel.generate` (utils.generation.decode), greedy (top_k=1),
        output_scores for the top-1/top-2 margins. As TransformersRunner.generate returns it: a row's
        tokens after its eos are pad with NaN margins, and columns after every row's eos are dropped
        (mamba_ssm itself stops only when all rows emit eos at the same step)."""
        t_ids = self._inputs(prompt, mask)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ReferenceError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
        if eos_id is not None and not 0 <= eos_id < self.cfg.vocab_size:
            raise ReferenceError(f"eos_id: expected None or an id in [0, {self.cfg.vocab_size}), "
                                 f"got {eos_id}")
        P = t_ids.shape[1]
        with self._running(), self._cuda_events():
            out = self.model.generate(input_ids=t_ids, max_length=P + max_new_tokens, top_k=1,
                                      output_scores=True, return_dict_in_generate=True,
                                      eos_token_id=eos_id, cg=self.cuda_graphs)
        tokens = out.sequences[:, P:].cpu().numpy().astype(np.int32)
        scores = torch.stack(out.scores, dim=1).double()  # b T v: the raw logits of each step
        top2 = torch.topk(scores, 2, dim=-1).values
        margins = (top2[..., 0] - top2[..., 1]).cpu().numpy().astype(np.float32)
        if eos_id is not None:
            after_eos = np.cumsum(tokens == eos_id, axis=1) - (tokens == eos_id) > 0
            tokens[after_eos], margins[after_eos] = self.pad_id, np.nan
            done = (tokens == eos_id).any(axis=1)
            if done.all():
                width = int(max(np.argmax(tokens == eos_id, axis=1))) + 1
                tokens, margins = tokens[:, :width], margins[:, :width]
        return GenerateResult(tokens, margins, int(tokens.shape[1]))

    @contextlib.contextmanager
    def _cuda_events(self):
        """decode() creates torch.cuda.Event objects even with timing off; a CPU-only torch cannot."""
        if self.device != "cpu":
            yield
            return
        event = torch.cuda.Event
        torch.cuda.Event = lambda *a, **k: None
        try:
            yield
        finally:
            torch.cuda.Event = event

    # ----------------------------------------------------------------------------------------
    def code_paths(self) -> dict:
        """What ran, from the counters (calls so far), with the binding that decided it."""
        m2 = self.mods.mamba2
        c = self.calls.get
        conv_kernel = m2.causal_conv1d_fn is not None
        return {
            "add_norm": {"ran": "Triton layer_norm_fn (fused residual add + RMSNorm)",
                         "calls": c("block.layer_norm_fn", 0) + c("mixer_seq_simple.layer_norm_fn", 0)},
            "conv": {"ran": "causal_conv1d_fn (CUDA)" if conv_kernel else "torch nn.Conv1d + SiLU fallback",
                     "calls": c("mamba2.causal_conv1d_fn", 0) if conv_kernel else c("torch_conv1d", 0),
                     "why": "causal_conv1d is installed" if conv_kernel else "causal_conv1d is not "
                            "installed (mamba_ssm.modules.mamba2.causal_conv1d_fn is None)"},
            "chunk_scan": {"ran": "Triton mamba_chunk_scan_combined",
                           "calls": c("mamba2.mamba_chunk_scan_combined", 0)},
            "fused_mem_eff_path": {"ran": "not used",
                                   "calls": c("mamba2.mamba_split_conv1d_scan_combined", 0),
                                   "why": "use_mem_eff_path=False: mamba_split_conv1d_scan_combined needs "
                                          "causal_conv1d's CUDA extension, which is not installed"},
            "gated_norm": {"ran": "Triton RMSNormGated (layernorm_gated.rmsnorm_fn)",
                           "calls": c("triton_rmsnorm_gated", 0)},
            "decode_conv": {"ran": "causal_conv1d_update (CUDA)" if m2.causal_conv1d_update is not None
                            else "torch roll + sum (Mamba2.step fallback)",
                            "calls": c("mamba2.causal_conv1d_update", 0)},
            "decode_state_update": {"ran": "Triton selective_state_update"
                                    if m2.selective_state_update is not None
                                    else "torch einsum (Mamba2.step fallback, ngroups 1 only)",
                                    "calls": c("mamba2.selective_state_update", 0)},
            "generate_cuda_graphs": self.cuda_graphs,
        }

    def _known_defects(self) -> list[str]:
        out = []
        lo, hi = self.cfg.time_step_limit
        if (lo, hi) != (0.0, float("inf")):
            out.append(f"time_step_limit={[lo, hi]}: Mamba2.step calls selective_state_update without "
                       "dt_limit, Mamba2.forward clamps dt: step_logits and generate differ from run() "
                       "(docs/porting-bugs.md #4, mamba#448)")
        return out

    def provenance(self) -> dict:
        import triton

        versions = {**prov.versions(), "mamba_ssm": self.mods.version, "triton": triton.__version__}
        return {
            "reference": "mamba_ssm MambaLMHeadModel",
            "checkpoint": Path(self.checkpoint).name,
            "dtype": self.dtype,
            "parameter_dtypes": sorted({str(p.dtype).removeprefix("torch.")
                                        for p in self.model.parameters()}),
            "versions": versions,
            "code_paths": self.code_paths(),
            "path": "Triton kernels" + (" (Triton interpreter on CPU: numpy arithmetic, not the GPU's)"
                                        if self.device == "cpu" else ""),
            "precision": {"torch_cuda_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
                          "torch_cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
                          "triton_fp32_dot": TF32_NOTE},
            "translated_config": config_for_json(self.kwargs),
            "import": {"how": "mamba_ssm registered as a bare package (its __init__ needs the CUDA extension "
                              "selective_scan_cuda); sys.modules restored after the import",
                       "stubs_installed": list(self.mods.stubs_installed)},
            "attention_mask": "none: MambaLMHeadModel has no padding mask; masked batches are refused",
            "known_reference_defects": self._known_defects(),
            "environment": prov.environment(self.device),
            "derived_taps": {k: v for k, v in NOTES.items() if k == "layers.*"},
            "tap_notes": NOTES,
            "unavailable_taps": dict(sorted(self.unavailable.items())),
            "tap_map": {tap: f"{path} ({kind})" for tap, path, kind in TAP_MAP},
        }
