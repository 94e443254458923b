"""The mamba_ssm reference for Mamba-3: its `Mamba3` mixer (mamba_ssm 2.3.2.post1) in the language
model of equiv_reference/mamba3/lm.py, with the canonical taps of equiv/mamba3/taps.py.

Same interface as the other families' runners (`run`, `step_logits`, `generate`, `provenance`),
everything in and out numpy. What runs, per layer:

    Block: Triton RMSNorm (or the fused add + norm kernel)                    -> mixer input
    Mamba3.forward: in_proj -> Triton gated-RMSNorm kernel on B and C -> the SSM kernel:
        SISO: Triton mamba3_siso_combined (angle_dt_fwd, mamba3_siso_fwd; Z gate inside unless
              is_outproj_norm, then the Triton gated RMSNorm) ; MIMO: TileLang mamba3_mimo
        -> out_proj
    decode (lm.Mamba3Mixer -> Mamba3.step): Triton rotary step -> CuTe mamba3_step_fn

Taps come from forward hooks on the library's modules and from the SSM kernel's own arguments,
captured by a counting wrapper around the module's kernel global while the runner calls the model
(never by editing the library). Where no module boundary exists the tap is recomputed from captured
tensors with the module's own operations (DERIVED says how). mamba_ssm takes no attention mask: a
left-padded batch is refused.

device="cpu" runs the same Triton sources through Triton's interpreter (TRITON_INTERPRET=1 set
before the first import) with the adaptations of equiv_reference/mamba3/kernels.py, only when
`interpreter_adaptations=True` asks for them; without it the run stops in one line saying why.
TileLang MIMO has no CPU form: a MIMO checkpoint fails in one line on CPU.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from equiv.errors import EquivError
from equiv.inputs import check_tokens
from equiv.mamba3.taps import tap_names
from equiv.ports import GenerateResult
from equiv_reference import provenance as prov
from equiv_reference.mamba3 import kernels
from equiv_reference.mamba3.lm import load_model, mixer_kwargs
from equiv_reference.torch_taps import to_numpy

# canonical tap -> (module path, what is captured): output | input0 | block | derived
TAP_MAP = (
    ("embed", "backbone.embedding", "output"),
    ("layers.{i}.norm", "backbone.layers.{i}.mixer", "input0"),  # the fused add + norm is no module call
    ("layers.{i}.mixer.in_proj", "backbone.layers.{i}.mixer.in_proj", "output"),
    ("layers.{i}.mixer.dt", "backbone.layers.{i}.mixer", "derived"),
    ("layers.{i}.mixer.A", "backbone.layers.{i}.mixer", "derived"),
    ("layers.{i}.mixer.trap", "backbone.layers.{i}.mixer", "derived"),
    ("layers.{i}.mixer.angles", "backbone.layers.{i}.mixer", "derived"),
    ("layers.{i}.mixer.B", "backbone.layers.{i}.mixer.B_norm", "derived"),
    ("layers.{i}.mixer.C", "backbone.layers.{i}.mixer.C_norm", "derived"),
    ("layers.{i}.mixer.ssm", "backbone.layers.{i}.mixer", "derived"),
    ("layers.{i}.mixer.gate", "backbone.layers.{i}.mixer.out_proj", "input0"),
    ("layers.{i}.mixer.out_proj", "backbone.layers.{i}.mixer.out_proj", "output"),
    ("layers.{i}", "backbone.layers.{i}", "block"),
    ("norm_f", "backbone", "output"),  # the backbone ends with the (fused) final norm
    ("logits", "lm_head", "output"),
)
DERIVED = {
    "layers.*.mixer.dt": "the DT argument the mixer passed its SSM kernel (softplus(dd_dt + dt_bias), "
                         "computed by Mamba3.forward), transposed to (b, l, h)",
    "layers.*.mixer.A": "Mamba3.forward's own expression on the in_proj tap's dd_A slice: "
                        "clamp(-softplus(dd_A.float()), max=-A_floor), float32 as the module computes it",
    "layers.*.mixer.trap": "sigmoid of the Trap argument passed to the kernel (the kernel takes the raw "
                           "projection and applies sigmoid inside, after its bfloat16 cast on a GPU)",
    "layers.*.mixer.angles": "the kernel's own angle_dt_fwd output (reduced mod 2 pi by the kernel) with "
                             "the whole turns put back: + 2 pi round((theta64 - out) / 2 pi), theta64 the "
                             "float64 cumsum of pi tanh(angle) dt of the same arguments; the sum in float64, "
                             "rounded once to float32",
    "layers.*.mixer.B": "B_norm's output (Triton gated-RMSNorm kernel, ungated) repeated over each "
                        "group's heads, plus B_bias (h, R, n) as (R, h, n): what the kernel adds inside",
    "layers.*.mixer.C": "as B, with C_norm and C_bias",
    "layers.*.mixer.ssm": "the same SSM kernel called again on the same arguments with Z=None (and "
                          "MIMO_Out=None): y = C~ . h + D x per rank, before any gate; when the mixer "
                          "already passed Z=None (is_outproj_norm), the kernel's own output",
    "layers.*": "Block returns (mixer output, residual) and the next Block adds them; the tap is that "
                "sum, in float32 if residual_in_fp32",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
COUNTED = {  # Mamba3's kernel globals, wrapped while the runner calls the model
    "mamba3_siso_combined": "siso_prefill", "mamba3_mimo_combined": "mimo_prefill",
    "apply_rotary_qk_inference_fwd": "rotary_step", "mamba3_step_fn": "cute_step",
}
CPU_REFUSAL = ("device 'cpu': mamba_ssm's Triton SISO prefill cannot run in Triton's interpreter as "
               "shipped (mamba3_siso_fwd and angle_dt call PTX inline asm cos/sin/tanh.approx.f32, which the "
               "interpreter refuses, and it computes the kernel's bfloat16 tl.dot wrongly), and the CuTe "
               "decode step needs a CUDA GPU; pass interpreter_adaptations=True to run the kernel's "
               "algorithm in float32 with exact transcendentals and mamba_ssm's torch reference step "
               "(recorded in provenance: equiv_reference/mamba3/kernels.py)")


class ReferenceError(EquivError):
    """The mamba_ssm Mamba-3 reference cannot run as asked (dtype, device, mask, arguments)."""


class _NoCudaDevice:
    """torch.cuda.device stand-in for the interpreter: mamba_ssm wraps kernel launches in
    `with torch.cuda.device(x.device.index)`, which fails for a CPU tensor (index None)."""

    def __init__(self, device):
        self.idx = device

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class Mamba3SsmRunner:
    """`run`, `step_logits`, `generate`, `provenance` over one Mamba-3 checkpoint in one dtype."""

    name = "mamba_ssm"

    def __init__(self, checkpoint_dir: str | Path, dtype: str = "float32", *, device: str = "cuda",
                 interpreter_adaptations: bool = False, torch_step_fallback: bool = False):
        if dtype not in DTYPES:
            raise ReferenceError(f"dtype: expected one of {sorted(DTYPES)} for mamba_ssm (its float64 oracle "
                                 f"is equiv/mamba3/oracle.py: equiv_reference.mamba3.references.oracle), "
                                 f"got {dtype!r}")
        if device == "cpu" and not kernels.interpreted():
            raise ReferenceError("device: expected 'cuda' (mamba_ssm's Triton, TileLang and CuTe kernels), "
                                 "got 'cpu' without TRITON_INTERPRET=1 (the interpreter mode meant for "
                                 "tests)")
        if device == "cpu" and not interpreter_adaptations:
            raise ReferenceError(CPU_REFUSAL)
        if device != "cpu" and not torch.cuda.is_available():
            raise ReferenceError(f"device: expected a CUDA device for mamba_ssm's Mamba-3 kernels, got "
                                 f"{device!r} and torch.cuda.is_available() is False")
        checkpoint_dir = Path(checkpoint_dir)
        if not (checkpoint_dir / "config.json").is_file():
            raise ReferenceError(f"checkpoint: expected {checkpoint_dir}/config.json, it does not exist")
        self.code = kernels.load_mamba3()
        self.dtype, self.device, self.checkpoint = dtype, device, str(checkpoint_dir)
        self.adapt = device == "cpu"
        # where the CuTe step cannot import, decode through mamba_ssm's torch reference of it: only when
        # asked (or on CPU), and recorded; otherwise decode fails in one line naming the CuTe kernel
        self.torch_step = self.adapt or bool(torch_step_fallback)
        # on a GPU the SISO kernel rounds q, k, x, trap, angles and z to bfloat16 (kernel_precision in
        # provenance): the harness judges this reference's plausibility at that rounding, not float32's
        self.judged_precision = "bfloat16" if device != "cpu" else None
        self.model, self.cfg = load_model(checkpoint_dir, DTYPES[dtype], device, self.code)
        if self.cfg.is_mimo and "mamba3_mimo_combined" in self.code.missing:
            raise ReferenceError(f"checkpoint {checkpoint_dir.name}: MIMO needs mamba_ssm's TileLang kernel "
                                 f"(mamba3_mimo), which cannot run here: "
                                 f"{self.code.missing['mamba3_mimo_combined']}; TileLang has no CPU form")
        self.pad_id = 0
        self.n_layers = self.cfg.n_layers
        self.tap_names = tap_names(self.n_layers)
        self.calls: dict[str, int] = {}
        self.adaptations: list[str] = []

    # ----------------------------------------------------------------------------------------
    def _count(self, key: str) -> None:
        self.calls[key] = self.calls.get(key, 0) + 1

    @contextlib.contextmanager
    def _running(self, listener=None):
        """no_grad, the interpreter adaptations (CPU), counting wrappers around Mamba3's kernel globals
        (each call handed to `listener` too), the torch.cuda stand-ins (CPU); all undone after."""
        code, m3 = self.code, self.code.mamba3
        if self.adapt:
            self.adaptations = kernels.adapt_for_interpreter(code, ptx=True, float32_inputs=True)
        if self.torch_step and "mamba3_step_fn" in code.missing:
            step = kernels.use_torch_step(code)
            if step not in self.adaptations:
                self.adaptations.append(step)
        saved = {name: getattr(m3, name) for name in COUNTED}

        def counting(name, fn):
            def wrapper(*args, **kwargs):
                self._count(COUNTED[name])
                out = fn(*args, **kwargs)
                if listener is not None:
                    listener(name, fn, args, kwargs, out)
                return out
            return wrapper

        for name, fn in saved.items():
            setattr(m3, name, counting(name, fn))
        angle_saved = code.siso_combined.angle_dt_fwd
        # the SISO wrapper and the TileLang MIMO module each import angle_dt_fwd into their own namespace
        # (the MIMO one is reached through its function's globals: TileLang may be absent)
        namespaces = [vars(code.siso_combined)]
        mimo = saved.get("mamba3_mimo_combined")
        if getattr(mimo, "__globals__", {}).get("angle_dt_fwd") is angle_saved:
            namespaces.append(mimo.__globals__)
        if listener is not None:
            def angle_dt(*args, **kwargs):
                out = angle_saved(*args, **kwargs)
                listener("angle_dt_fwd", angle_saved, args, kwargs, out)
                return out
            for ns in namespaces:
                ns["angle_dt_fwd"] = angle_dt
        cuda_device, cuda_event = torch.cuda.device, torch.cuda.Event
        if self.device == "cpu":
            torch.cuda.device = _NoCudaDevice
            torch.cuda.Event = lambda *a, **k: None  # utils.generation.decode makes events, timing off
        try:
            with torch.no_grad():
                yield
        finally:
            torch.cuda.device, torch.cuda.Event = cuda_device, cuda_event
            for ns in namespaces:
                ns["angle_dt_fwd"] = angle_saved
            for name, fn in saved.items():
                setattr(m3, name, fn)
            kernels.restore(code)

    def _inputs(self, ids, mask):
        ids, mask = check_tokens(ids, self.cfg.vocab_size, mask)
        if mask is not None and not mask.all():
            rows = np.flatnonzero(~mask.all(axis=1))
            raise ReferenceError(f"mask: mamba_ssm's Mamba3 takes no attention mask, expected None or all "
                                 f"ones, got {int((mask == 0).sum())} padded positions in rows "
                                 f"{rows[:8].tolist()}; run each sequence alone (batch 1)")
        return torch.from_numpy(ids.astype(np.int64)).to(self.device)

    # ----------------------------------------------------------------------------------------
    def run(self, ids, mask=None) -> dict[str, np.ndarray]:
        """Full forward without a cache; every canonical tap."""
        t_ids = self._inputs(ids, mask)
        captured: dict[str, torch.Tensor] = {}
        calls: dict[int, dict] = {}
        layer = [None]
        handles = []
        named = dict(self.model.named_modules())
        for i in range(self.n_layers):
            p = f"backbone.layers.{i}"
            mixer = named[p + ".mixer"]
            handles += [
                mixer.register_forward_pre_hook(self._mixer_entry(captured, layer, i)),
                mixer.in_proj.register_forward_hook(self._keep(captured, f"layers.{i}.mixer.in_proj")),
                mixer.B_norm.register_forward_hook(self._keep(captured, f"B_norm.{i}")),
                mixer.C_norm.register_forward_hook(self._keep(captured, f"C_norm.{i}")),
                mixer.out_proj.register_forward_pre_hook(self._input0(captured, f"layers.{i}.mixer.gate")),
                mixer.out_proj.register_forward_hook(self._keep(captured, f"layers.{i}.mixer.out_proj")),
                named[p].register_forward_hook(self._block_sum(captured, f"layers.{i}")),
            ]
        handles += [named["backbone.embedding"].register_forward_hook(self._keep(captured, "embed")),
                    named["backbone"].register_forward_hook(self._keep(captured, "norm_f")),
                    named["lm_head"].register_forward_hook(self._keep(captured, "logits"))]

        def listener(name, fn, args, kwargs, out):  # the model's own calls only, not _derived's reruns
            if layer[0] is not None and name in ("mamba3_siso_combined", "mamba3_mimo_combined",
                                                 "angle_dt_fwd"):
                calls.setdefault(layer[0], {})[name] = (fn, args, kwargs, out)

        try:
            with self._running(listener):
                self.model(t_ids)
                layer[0] = None
                for i in range(self.n_layers):
                    captured |= self._derived(i, calls.get(i, {}), captured)
        finally:
            for h in handles:
                h.remove()
        self._check_taps(captured, *t_ids.shape)
        return {n: to_numpy(captured[n]) for n in self.tap_names}

    @staticmethod
    def _mixer_entry(captured, layer, i):
        def hook(mod, args):  # returns None: a pre-hook's return value would replace the input
            layer[0] = i
            captured[f"layers.{i}.norm"] = args[0]
        return hook

    @staticmethod
    def _keep(captured, name):
        def hook(mod, args, out):
            captured[name] = out
        return hook

    @staticmethod
    def _input0(captured, name):
        def hook(mod, args):
            captured[name] = args[0]
        return hook

    def _block_sum(self, captured, name):
        residual_fp32 = self.cfg.residual_in_fp32

        def hook(mod, args, out):  # (mixer output, residual) -> the residual stream after the block
            hidden, residual = out
            total = hidden.float() + residual.float()
            captured[name] = total if residual_fp32 else total.to(hidden.dtype)
        return hook

    def _derived(self, i: int, calls: dict, captured: dict) -> dict[str, torch.Tensor]:
        """The DERIVED taps of layer i from its kernel call's arguments and the hooked tensors."""
        kernel = "mamba3_mimo_combined" if self.cfg.is_mimo else "mamba3_siso_combined"
        if kernel not in calls or "angle_dt_fwd" not in calls:
            raise prov.reference_changed(f"layer {i}'s Mamba3 did not call {kernel} and angle_dt_fwd in a "
                                         "forward without cache; the SSM taps cannot be captured")
        fn, args, kwargs, out = calls[kernel]
        a = _bind(fn, args, kwargs)
        cfg, t = self.cfg, f"layers.{i}.mixer."
        h, g = cfg.nheads, cfg.ngroups
        dd_A = torch.split(captured[t + "in_proj"], list(cfg.in_proj_splits), dim=-1)[5]
        mixer = self.model.backbone.layers[i].mixer
        taps = {t + "dt": a["DT"].transpose(1, 2),
                t + "A": torch.clamp(-F.softplus(dd_A.to(torch.float32)), max=-mixer.A_floor),
                t + "trap": torch.sigmoid(a["Trap"]).transpose(1, 2),
                t + "angles": _unwrapped_angles(calls["angle_dt_fwd"], a)}
        for name, bias in (("B", mixer.B_bias), ("C", mixer.C_bias)):
            normed = captured[f"{name}_norm.{i}"]  # b l R g n
            taps[t + name] = normed.repeat_interleave(h // g, dim=3) + bias.transpose(0, 1)
        if a.get("Z") is None and (not cfg.is_mimo or a.get("MIMO_Out") is None):
            y = out[0] if isinstance(out, tuple) else out
        else:
            ungated = dict(a, Z=None) | ({"MIMO_Out": None, "return_state": False} if cfg.is_mimo
                                          else {"return_final_states": False})
            y = fn(**ungated)
        b, l = y.shape[:2]
        taps[t + "ssm"] = y.reshape(b, l, cfg.rank, cfg.d_inner)  # SISO (b l h p), MIMO (b l R h p)
        return taps

    def _check_taps(self, captured: dict, b: int, l: int) -> None:
        """Every tap captured, with its documented shape (equiv/mamba3/taps.py)."""
        cfg = self.cfg
        d, e, h, n, r, a = cfg.d_model, cfg.d_inner, cfg.nheads, cfg.d_state, cfg.rank, cfg.num_rope_angles
        shapes = {"embed": (d,), "norm": (d,), "mixer.in_proj": (cfg.in_proj_dim,), "mixer.dt": (h,),
                  "mixer.A": (h,), "mixer.trap": (h,), "mixer.angles": (h, a), "mixer.B": (r, h, n),
                  "mixer.C": (r, h, n), "mixer.ssm": (r, e), "mixer.gate": (e,), "mixer.out_proj": (d,),
                  "block": (d,), "norm_f": (d,), "logits": (cfg.vocab_size,)}
        for tap in self.tap_names:
            parts = tap.split(".", 2)
            key = parts[2] if len(parts) == 3 else "block" if len(parts) == 2 else tap
            want = (b, l, *shapes[key])
            got = captured.get(tap)
            if got is None or tuple(got.shape) != want:
                raise prov.reference_changed(
                    f"tap {tap}: expected a {want} tensor from mamba_ssm's Mamba3, got "
                    f"{'nothing (its hook never fired)' if got is None else tuple(got.shape)}")

    # ----------------------------------------------------------------------------------------
    def _step(self, token: torch.Tensor, params) -> torch.Tensor:
        """One cached decode step, as mamba_ssm.utils.generation.decode's get_logits does it."""
        b = token.shape[0]
        pos = torch.full((b, 1), params.seqlen_offset, dtype=torch.long, device=token.device)
        logits = self.model(token, position_ids=pos, inference_params=params, num_last_tokens=1).logits[:, -1]
        params.seqlen_offset += 1
        return logits

    def step_logits(self, ids, mask, prompt_len: int) -> np.ndarray:
        """Teacher forcing through mamba_ssm's inference cache, as its `decode` drives it: prefill
        ids[:, :prompt_len] with a fresh InferenceParams, then Mamba3.step one token at a time.
        Returns (b, l - prompt_len + 1, v)."""
        t_ids = self._inputs(ids, mask)
        b, l = t_ids.shape
        if isinstance(prompt_len, bool) or not isinstance(prompt_len, int | np.integer) \
                or not 1 <= prompt_len <= l:
            raise ReferenceError(f"prompt_len: expected an int in [1, l={l}], got {prompt_len!r}")
        prompt_len = int(prompt_len)
        params = self.code.generation.InferenceParams(max_seqlen=l + 1, max_batch_size=b)
        with self._running():
            prefill = self.model(t_ids[:, :prompt_len], inference_params=params, num_last_tokens=1)
            steps = [prefill.logits[:, -1]]
            params.seqlen_offset += prompt_len
            for t in range(prompt_len, l):
                steps.append(self._step(t_ids[:, t:t + 1], params))
        return to_numpy(torch.stack(steps, dim=1))

    def generate(self, prompt, mask=None, max_new_tokens: int = 32,
                 eos_id: int | None = None) -> GenerateResult:
        """mamba_ssm's own greedy `decode` (utils.generation, top_k=1, output_scores for the top-1/top-2
        margins). A row's tokens after its eos are pad with NaN margins, and columns after every row's
        eos are dropped (mamba_ssm itself stops only when all rows emit eos at the same step)."""
        t_ids = self._inputs(prompt, mask)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ReferenceError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
        if eos_id is not None and not 0 <= eos_id < self.cfg.vocab_size:
            raise ReferenceError(f"eos_id: expected None or an id in [0, {self.cfg.vocab_size}), "
                                 f"got {eos_id}")
        P = t_ids.shape[1]
        with self._running():
            out = self.model.generate(input_ids=t_ids, max_length=P + max_new_tokens, top_k=1,
                                      output_scores=True, return_dict_in_generate=True, eos_token_id=eos_id,
                                      cg=False)
        tokens = out.sequences[:, P:].cpu().numpy().astype(np.int32)
        scores = torch.stack(out.scores, dim=1).double()  # b T v: the raw logits of each step
        top2 = torch.topk(scores, 2, dim=-1).values
        margins = (top2[..., 0] - top2[..., 1]).cpu().numpy().astype(np.float32)
        if eos_id is not None:
            after_eos = np.cumsum(tokens == eos_id, axis=1) - (tokens == eos_id) > 0
            tokens[after_eos], margins[after_eos] = self.pad_id, np.nan
            if (tokens == eos_id).any(axis=1).all():
                width = int(max(np.argmax(tokens == eos_id, axis=1))) + 1
                tokens, margins = tokens[:, :width], margins[:, :width]
        return GenerateResult(tokens, margins, int(tokens.shape[1]))

    # ----------------------------------------------------------------------------------------
    def code_paths(self) -> dict:
        """Which kernels ran (counted calls so far) and what each was: shipped, stubbed, adapted."""
        m3, missing = self.code.mamba3, self.code.missing
        out = {}
        for name, key in COUNTED.items():
            bound = getattr(m3, name)
            if name in missing:
                ran = ("mamba_ssm's pure-torch selective_state_update_fused_ref_v2 (float32) in its place"
                       if name == "mamba3_step_fn" and self.torch_step else "unavailable")
                entry = {"kernel": kernels.KERNEL_GLOBALS[name], "ran": ran, "why": missing[name]}
            else:
                where = f"{getattr(bound, '__module__', '?')}.{getattr(bound, '__qualname__', '?')}"
                entry = {"kernel": kernels.KERNEL_GLOBALS[name], "ran": "shipped kernel", "bound": where}
            if name == "mamba3_siso_combined" and self.adapt:
                entry["ran"] = "Triton interpreter, adapted (float32 inputs, exact cos/sin/tanh)"
            out[key] = entry | {"calls": self.calls.get(key, 0)}
        return out

    def provenance(self) -> dict:
        import triton

        versions = {**prov.versions(), "mamba_ssm": self.code.version, "triton": triton.__version__}
        return {
            "reference": "mamba_ssm Mamba3 (modules/mamba3.py) in equiv_reference/mamba3/lm.py's "
                         "MambaLMHeadModel layout",
            "checkpoint": Path(self.checkpoint).name,
            "dtype": self.dtype,
            "device": self.device,
            "parameter_dtypes": sorted({str(p.dtype).removeprefix("torch.")
                                        for p in self.model.parameters()}),
            "versions": versions,
            "untested_versions": prov.untested_versions(),
            "code_paths": self.code_paths(),
            "interpreter_adaptations": list(self.adaptations) if self.adapt or self.torch_step else [],
            "path": ("Triton interpreter on CPU with the adaptations listed: the kernels' algorithms in "
                     "float32 numpy arithmetic, not the GPU's numerics" if self.adapt else "GPU kernels"),
            "kernel_precision": "mamba3_siso_combined casts Q, K, V, Trap, Angles and Z to bfloat16 for "
                                "the kernel whatever the model dtype, and the kernel uses PTX "
                                "cos/sin/tanh.approx; its output (the SSM tap) is bfloat16 on a GPU",
            "mixer_kwargs": mixer_kwargs(self.cfg),
            "decode": "lm.Mamba3Mixer calls Mamba3.step on u[:, 0] (Mamba3.forward passes (b, 1, d) to step, "
                      "which expects (b, d))",
            "import": {"how": "mamba_ssm registered as a bare package (its __init__ needs the CUDA "
                              "extension); sys.modules restored after the import",
                       "stubbed_kernels": dict(self.code.missing)},
            "attention_mask": "none: Mamba3 has no padding mask; masked batches are refused",
            "environment": prov.environment(self.device),
            "derived_taps": dict(DERIVED),
            "tap_map": {tap: f"{path} ({kind})" for tap, path, kind in TAP_MAP},
        }


def _bind(fn, args, kwargs) -> dict:
    import inspect

    target = getattr(fn, "__wrapped__", fn)
    try:
        bound = inspect.signature(target).bind(*args, **kwargs)
    except TypeError as e:
        raise prov.reference_changed(f"{getattr(fn, '__name__', fn)} no longer takes the arguments Mamba3 "
                                     f"passes ({e})") from None
    bound.apply_defaults()
    return dict(bound.arguments)


def _unwrapped_angles(call, kernel_args: dict) -> torch.Tensor:
    """The kernel's cumulative angle (mod 2 pi) with its whole turns restored (DERIVED)."""
    fn, args, kwargs, out = call
    a = _bind(fn, args, kwargs)
    reduced = out[0] if isinstance(out, tuple) else out  # b l h a
    angle, dt = a["angle"].double(), a["dt"].double()  # (b l h a), (b h l)
    theta64 = torch.cumsum(math.pi * torch.tanh(angle) * dt.transpose(1, 2)[..., None], dim=1)
    turns = torch.round((theta64 - reduced.double()) / (2 * math.pi))
    return (reduced.double() + 2 * math.pi * turns).to(torch.float32)
