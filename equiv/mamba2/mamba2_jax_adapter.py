"""The `mamba2-jax` package (1.1.2, Flax NNX) behind the port protocol (equiv/ports.py), registry
name "mamba2-jax", so the harness verifies it exactly like the built-in port.

What it can and cannot provide, learned from its source (mamba2_jax/modeling.py, params.py):

* taps: `nnx.capture(..., method_outputs=nnx.Intermediate)` records the output of every submodule
  call without touching the package, which gives `embed`, `layers.{i}.norm`, `mixer.in_proj`,
  `mixer.conv` (its `DepthwiseConv1d` returns the pre-activation; we apply the mixer's own `act`,
  exactly what `Mamba2Mixer.__call__` does next), `mixer.gated_norm`, `mixer.out_proj`,
  `layers.{i}`, `norm_f`, `logits`. `layers.{i}.mixer.ssm` is missing: `ssd_forward` is a plain
  function, not a module method, so nothing can observe its output.
* no isolated mode, no padding mask (its forward takes no mask), no single-token decode step: a
  cached forward of one token pads it to `chunk_size` and runs the chunked SSD.
* features it lacks (rejected at load, all named at once): n_groups > 1 (B and C are one group of
  `state_size`), a per-head-dim D, a gated-norm epsilon other than 1e-5 (hard-coded in
  `Mamba2Mixer.__init__`), conv_kernel < 2 (its conv cache slice `[-0:]` keeps everything).
* its code broadcasts (d,) against (b, l, d) implicitly, so every call into it runs under
  `jax.numpy_rank_promotion("allow")`; the suite's own code stays under "raise".
* matmul precision: the adapter sets none; `info()` records `jax_default_matmul_precision` as the
  caller left it (None = JAX's default, which on GPU runs float32 matmuls as TF32, docs/porting-bugs.md #11).

mamba2_jax is imported lazily so `equiv` imports without it.
"""

from __future__ import annotations

import importlib.metadata
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from equiv.errors import CheckpointError, ConfigError, EquivError
from equiv.greedy import top2_margin
from equiv.inputs import check_tokens
from equiv.io.checkpoint_files import read_tensors
from equiv.mamba2.config import Mamba2Config
from equiv.mamba2.config_file import load_config
from equiv.mamba2.convert import map_tensors
from equiv.ports import GenerateResult, PortError, PortInfo, TapUnavailable

PACKAGE = "mamba2-jax"
TESTED_VERSION = "1.1.2"
INSTALL_HINT = f"pip install '{PACKAGE}=={TESTED_VERSION}' (or pip install 'ssm-equiv[mamba2-jax]')"
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_GATED_NORM_EPS = 1e-5  # Mamba2Mixer.__init__: RMSNorm(intermediate_size, eps=1e-5, gate_residual=True)
MISSING_TAPS = {"layers.{i}.mixer.ssm": "ssd_forward is a plain function inside Mamba2Mixer.__call__, "
                                        "not a submodule, so nnx.capture cannot record its output"}


class UnsupportedByMamba2Jax(ConfigError):
    """The checkpoint needs a feature that mamba2-jax 1.1.2 does not implement."""


def import_mamba2_jax():
    """The package, or a PortError that says how to install it."""
    try:
        import mamba2_jax
        from flax import nnx  # noqa: F401 - its one hard dependency we use directly
    except ImportError as e:
        raise PortError(f"port 'mamba2-jax': expected the {PACKAGE} package to be importable, got "
                        f"ImportError ({e}); install it with: {INSTALL_HINT}") from None
    return mamba2_jax


def unsupported_features(cfg: Mamba2Config) -> list[str]:
    """Every config feature mamba2-jax 1.1.2 cannot represent, by name (empty when it can)."""
    problems = []
    if cfg.n_groups != 1:
        problems.append(f"n_groups={cfg.n_groups} (mamba2-jax implements only n_groups=1: Mamba2Mixer "
                        "splits B and C as one group of state_size channels)")
    if cfg.d_has_hdim:
        problems.append("D_has_hdim (mamba2-jax's D is one value per head, shape (h,))")
    if cfg.norm_eps != _GATED_NORM_EPS:
        problems.append(f"layer_norm_epsilon={cfg.norm_eps} (mamba2-jax's gated RMSNorm epsilon is fixed at "
                        f"{_GATED_NORM_EPS}; only its block and final norms take layer_norm_epsilon)")
    if cfg.conv_kernel < 2:
        problems.append(f"conv_kernel={cfg.conv_kernel} (mamba2-jax's conv cache needs conv_kernel >= 2)")
    return problems


def package_config(mj, cfg: Mamba2Config):
    """Our config -> mamba2_jax.Mamba2Config (num_heads is derived there: intermediate // head_dim)."""
    return mj.Mamba2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, state_size=cfg.d_state, head_dim=cfg.head_dim,
        chunk_size=cfg.chunk_size, expand=cfg.expand, conv_kernel=cfg.conv_kernel,
        num_hidden_layers=cfg.n_layers, layer_norm_epsilon=cfg.norm_eps, use_bias=cfg.use_bias,
        use_conv_bias=cfg.use_conv_bias, hidden_act="silu", time_step_limit=tuple(cfg.time_step_limit),
        residual_in_fp32=cfg.residual_in_fp32, tie_word_embeddings=cfg.tie_embeddings,
        pad_token_id=cfg.pad_token_id or 0, eos_token_id=cfg.eos_token_id or 0)


def load_weights(mj, model, cfg: Mamba2Config, fmt: str, tensors: dict, dtype: str) -> None:
    """Fill the nnx model through the package's own key table (`load_pytorch_weights`, which reads
    mamba_ssm names), renaming transformers' embedding key first. Its table has no entry for
    `in_proj.bias`, so that one is set here. Shapes were already checked strictly by map_tensors."""
    state = {("backbone.embedding.weight" if k == "backbone.embeddings.weight" else k): v
             for k, v in tensors.items() if not k.endswith("mixer.in_proj.bias")}
    try:
        _, _, skipped = mj.load_pytorch_weights(model, state, dtype=_DTYPES[dtype], strict=True)
    except ValueError as e:
        raise CheckpointError(f"{fmt} checkpoint: mamba2-jax's loader refused it: {e}") from None
    if skipped:  # strict=True raises on these; kept in case a later version only reports them
        raise CheckpointError(f"{fmt} checkpoint: mamba2-jax's loader skipped keys: {skipped[:8]}")
    if cfg.use_bias:
        for i, layer in enumerate(model.backbone.layers):
            bias = tensors[f"backbone.layers.{i}.mixer.in_proj.bias"]
            layer.mixer.in_proj.bias[...] = jnp.asarray(bias, _DTYPES[dtype])


# ---------------------------------------------------------------------------------------------
# jitted calls into the package (traced under rank promotion "allow", see the module docstring)


def _logits_and_cache(model, ids, cache):
    import mamba2_jax

    out = mamba2_jax.forward(model, ids, None, cache)
    return out["logits"], out["cache"]


@jax.jit
def _forward_taps(model, ids):
    """Every tap nnx.capture can see, plus logits (see the module docstring for what is missing)."""
    from flax import nnx

    run = nnx.capture(lambda m, x: m(x), nnx.Intermediate, method_outputs=nnx.Intermediate)
    out, captured = run(model, ids)
    seen = nnx.to_pure_dict(captured)["backbone"]
    call = lambda node: node["__call__"][0]  # noqa: E731 - one recorded call per module
    taps = {"embed": call(seen["embedder"])}
    for i, layer in enumerate(model.backbone.layers):
        got, t = seen["layers"][i], f"layers.{i}"
        conv_pre_act, _ = call(got["mixer"]["conv1d"])
        taps |= {f"{t}.norm": call(got["norm"]), f"{t}.mixer.in_proj": call(got["mixer"]["in_proj"]),
                 f"{t}.mixer.conv": layer.mixer.act(conv_pre_act),
                 f"{t}.mixer.gated_norm": call(got["mixer"]["norm"]),
                 f"{t}.mixer.out_proj": call(got["mixer"]["out_proj"]), t: call(got)[0]}
    taps |= {"norm_f": call(seen["final_norm"]), "logits": out["logits"]}
    return taps


@partial(jax.jit, donate_argnames=("cache",))
def _greedy_step(model, tokens, cache):
    """One cached forward of one token per sequence -> (logits (b, v), cache)."""
    logits, cache = _logits_and_cache(model, tokens[:, None], cache)
    return logits[:, -1], cache


@jax.jit
def _prefill(model, ids):
    logits, cache = _logits_and_cache(model, ids, None)
    return logits[:, -1], cache


class Mamba2JaxModel:
    """A checkpoint loaded into mamba2_jax.Mamba2ForCausalLM (the `LoadedModel` protocol)."""

    def __init__(self, cfg: Mamba2Config, model, dtype: str, source: str, fmt: str, version: str):
        self.cfg, self.model, self.dtype, self.source, self.format = cfg, model, dtype, source, fmt
        self.version = version
        self.vocab_size, self.decode_lengths = cfg.vocab_size, cfg.decode_lengths
        self.tap_names = ["embed"]
        for i in range(cfg.n_layers):
            self.tap_names += [f"layers.{i}.{s}" for s in ("norm", "mixer.in_proj", "mixer.conv",
                                                          "mixer.gated_norm", "mixer.out_proj")]
            self.tap_names.append(f"layers.{i}")
        self.tap_names += ["norm_f", "logits"]

    def info(self) -> PortInfo:
        import flax

        return PortInfo(name="mamba2-jax", version=self.version, details={
            "implementation": f"mamba2_jax {self.version} (Flax NNX {flax.__version__}), through "
                              "equiv.mamba2.mamba2_jax_adapter",
            "jax": jax.__version__, "backend": jax.default_backend(), "dtype": self.dtype,
            # as the caller set it: the adapter forces nothing (None = JAX's default)
            "jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
            "chunk_size": self.cfg.chunk_size, "checkpoint_format": self.format, "checkpoint": self.source,
            "taps_missing": MISSING_TAPS,
            "notes": ["layers.{i}.mixer.conv is DepthwiseConv1d's output passed through the mixer's own act",
                      "no padding mask; no isolated mode",
                      "decode: no single-step path; each cached token is padded to chunk_size and run "
                      "through the chunked SSD",
                      "bfloat16: weights are rounded to bfloat16; activations follow the package's own "
                      "promotion (its norms return float32, so most matmuls run in float32)"]})

    def _check(self, ids, mask):
        ids, mask = check_tokens(ids, self.cfg.vocab_size, mask)
        if mask is not None and not mask.all():
            padded = int((mask == 0).sum())
            raise TapUnavailable("mamba2-jax 1.1.2 takes no padding mask (Mamba2ForCausalLM.__call__ has "
                                 f"no attention_mask); got a mask with {padded} padded positions")
        return jnp.asarray(ids)

    def forward(self, ids, mask=None, taps=True) -> dict[str, np.ndarray]:
        ids = self._check(ids, mask)
        with jax.numpy_rank_promotion("allow"):
            out = _forward_taps(self.model, ids) if taps else {"logits": _prefill_all(self.model, ids)}
        order = self.tap_names if taps else ["logits"]  # jit returns dicts key-sorted: restore the order
        return {k: np.asarray(out[k].astype(jnp.float32)) for k in order}

    def forward_isolated(self, ids, mask, inputs) -> dict[str, np.ndarray]:
        raise TapUnavailable("mamba2-jax exposes no entry point that computes one op from given inputs "
                             "(its SSD runs inside Mamba2Mixer.__call__)")

    def step_logits(self, ids, mask, prompt_len: int) -> np.ndarray:
        ids = self._check(ids, mask)
        if not 1 <= prompt_len <= ids.shape[1]:
            raise EquivError(f"prompt_len: expected 1 <= prompt_len <= l={ids.shape[1]}, got {prompt_len}")
        with jax.numpy_rank_promotion("allow"):
            logits, cache = _prefill(self.model, ids[:, :prompt_len])
            steps = [logits]
            for t in range(prompt_len, ids.shape[1]):
                logits, cache = _greedy_step(self.model, ids[:, t], cache)
                steps.append(logits)
        return np.stack([np.asarray(s, np.float32) for s in steps], axis=1)

    def generate(self, prompt, mask=None, max_new_tokens=32, eos_id=None) -> GenerateResult:
        """Greedy, argmax ties to the first index (as torch). A host loop over the package's cached
        forward (it has no generation loop of its own); after eos a sequence emits pad, and the loop
        stops when every sequence has emitted eos."""
        prompt = self._check(prompt, mask)
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise EquivError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
        pad = jnp.int32(self.cfg.pad_token_id if self.cfg.pad_token_id is not None else 0)
        b = prompt.shape[0]
        tokens, margins, done = [], [], jnp.zeros((b,), bool)
        with jax.numpy_rank_promotion("allow"):
            logits, cache = _prefill(self.model, prompt)
            for step in range(max_new_tokens):
                nxt = jnp.where(done, pad, jnp.argmax(logits, axis=-1).astype(jnp.int32))
                tokens.append(nxt)
                margins.append(jnp.where(done, jnp.nan, top2_margin(logits)))
                if eos_id is not None:
                    done = done | (nxt == eos_id)
                    if bool(done.all()):
                        break
                if step + 1 < max_new_tokens:
                    logits, cache = _greedy_step(self.model, nxt, cache)
        return GenerateResult(np.stack([np.asarray(t) for t in tokens], axis=1).astype(np.int32),
                              np.stack([np.asarray(m) for m in margins], axis=1).astype(np.float32),
                              len(tokens))


@jax.jit
def _prefill_all(model, ids):
    return _logits_and_cache(model, ids, None)[0]


class Mamba2JaxPort:
    """Registry name "mamba2-jax"."""

    name = "mamba2-jax"

    def load(self, checkpoint_dir: str | Path, dtype: str = "float32") -> Mamba2JaxModel:
        mj = import_mamba2_jax()
        checkpoint_dir = Path(checkpoint_dir)
        if not checkpoint_dir.is_dir():
            raise CheckpointError(f"checkpoint: expected a directory, got {checkpoint_dir} "
                                  f"({'a file' if checkpoint_dir.exists() else 'does not exist'})")
        if dtype not in _DTYPES:
            raise EquivError(f"dtype: expected one of {sorted(_DTYPES)}, got {dtype!r}")
        cfg, fmt = load_config(checkpoint_dir)
        problems = unsupported_features(cfg)
        if problems:
            raise UnsupportedByMamba2Jax(f"{checkpoint_dir}: mamba2-jax {TESTED_VERSION} cannot run this "
                                         "checkpoint: " + "; ".join(problems))
        tensors = read_tensors(checkpoint_dir)
        map_tensors(cfg, fmt, tensors, dtype)  # strict key/shape/dtype check; the package's loader has none
        with jax.numpy_rank_promotion("allow"):
            model = mj.create_random_model(package_config(mj, cfg), seed=0)  # every weight is overwritten
        load_weights(mj, model, cfg, fmt, tensors, dtype)
        try:
            version = importlib.metadata.version(PACKAGE)
        except importlib.metadata.PackageNotFoundError:
            version = getattr(mj, "__version__", "unknown")
        return Mamba2JaxModel(cfg, model, dtype, str(checkpoint_dir), fmt, version)
