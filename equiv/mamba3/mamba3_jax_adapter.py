"""The `mamba3-jax` package (1.0.1, Flax NNX) behind the port protocol (equiv/ports.py), so the
harness verifies it exactly like a built-in port. Name: "mamba3-jax".

What its source (mamba3_jax/modeling.py, params.py) allows:

* loading: its own `load_pytorch_weights(strict=True)` reads mamba_ssm's key names, which are this
  family's checkpoint layout, after the family's strict check (equiv.mamba3.convert.check_tensors);
  its `Mamba3Config` takes every field of ours (`config_for_package`).
* taps: `nnx.capture(..., method_outputs=nnx.Intermediate)` records every submodule's `__call__`
  output: `embed`, `layers.{i}.norm`, `mixer.in_proj`, `mixer.out_proj`, `layers.{i}`, `norm_f`,
  `logits`, B_norm / C_norm, and the out-proj norm when there is one. The rest is computed inside
  `Mamba3Mixer` by plain functions and a private method, which capture cannot see; while the
  adapter traces its own forward, it wraps them (modeling's `ssd_forward`, `_ssd_mimo`,
  `cumulative_angles`, and `Mamba3Mixer._preprocess`) to record what they return, then puts them
  back. What is still missing is recomputed from recorded values with the package's own
  expressions (DERIVED). Nothing is edited on disk; the recording changes no value.
* `mixer.angles`: the package reduces the cumulative angle mod 2 pi (jnp.mod); the tap is its value
  with the whole turns put back (+ 2 pi round((theta64 - value) / 2 pi), theta64 the float64 cumsum
  of its own recorded inputs), as the mamba_ssm runner does with its kernel's reduced angle.
* no padding mask (its forward takes none), no isolated mode; decode is its own cached forward
  (`forward(model, ids, None, cache)`, one token per call: its single-chunk SSD path).
* its code broadcasts implicitly, so every call into it runs under jax.numpy_rank_promotion("allow").
* matmul precision: none is set; `info()` records jax_default_matmul_precision as the caller left it.

mamba3_jax is imported lazily, so `equiv` imports without it.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from equiv.errors import CheckpointError, EquivError
from equiv.inputs import check_tokens
from equiv.io.checkpoint_files import read_tensors
from equiv.mamba3.config import Mamba3Config
from equiv.mamba3.config_file import load_config
from equiv.mamba3.convert import check_tensors
from equiv.mamba3.taps import tap_names
from equiv.ports import GenerateResult, PortError, PortInfo, TapUnavailable

PACKAGE = "mamba3-jax"
TESTED_VERSION = "1.0.1"
INSTALL_HINT = f"pip install '{PACKAGE}=={TESTED_VERSION}'"
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DERIVED = {
    "layers.{i}.mixer.gate": "SISO without out-proj norm: (y * silu(z_h)).reshape, Mamba3Mixer.__call__'s "
                             "own expression on the recorded ssd_forward output and _preprocess's z_h; with "
                             "the norm: the norm module's captured output; MIMO: _mimo_forward's "
                             "einsum(y_o * gate, mimo_o) on the recorded _ssd_mimo output",
    "layers.{i}.mixer.ssm": "SISO: ssd_forward's recorded output (it includes D x and the diagonal skip); "
                            "MIMO: _ssd_mimo's recorded output + D * v, v = x_h * mimo_x (as "
                            "_mimo_forward adds it next)",
    "layers.{i}.mixer.A/dt/trap/B/C": "SISO: recorded from Mamba3Mixer._preprocess; MIMO (inline in "
                                      "_mimo_forward): its expressions on the captured in_proj and B_norm / "
                                      "C_norm outputs",
}


def import_mamba3_jax():
    """The package, or a PortError that says how to install it."""
    try:
        import mamba3_jax
        from flax import nnx  # noqa: F401 - its one hard dependency we use directly
    except ImportError as e:
        raise PortError(f"port 'mamba3-jax': expected the {PACKAGE} package to be importable, got "
                        f"ImportError ({e}); install it with: {INSTALL_HINT}") from None
    return mamba3_jax


def config_for_package(mj, cfg: Mamba3Config):
    """Our config -> mamba3_jax.Mamba3Config (its derived sizes equal ours: d_in_proj is checked)."""
    pkg = mj.Mamba3Config(
        vocab_size=cfg.vocab_size, pad_token_id=cfg.pad_token_id or 0, eos_token_id=cfg.eos_token_id or 0,
        hidden_size=cfg.d_model, state_size=cfg.d_state, head_dim=cfg.headdim, expand=cfg.expand,
        ngroups=cfg.ngroups, chunk_size=cfg.chunk_size, num_hidden_layers=cfg.n_layers,
        layer_norm_epsilon=cfg.norm_eps, rope_fraction=cfg.rope_fraction, A_floor=cfg.A_floor,
        is_mimo=cfg.is_mimo, mimo_rank=cfg.mimo_rank if cfg.is_mimo else 1,
        is_outproj_norm=cfg.is_outproj_norm, bcnorm_eps=1e-5, residual_in_fp32=cfg.residual_in_fp32,
        tie_word_embeddings=cfg.tie_embeddings)
    if pkg.d_in_proj != cfg.in_proj_dim or pkg.num_rope_angles != cfg.num_rope_angles:
        raise EquivError(f"mamba3-jax {TESTED_VERSION}: its sizes differ from the checkpoint's (in_proj "
                         f"{pkg.d_in_proj} vs {cfg.in_proj_dim}, rope angles {pkg.num_rope_angles} vs "
                         f"{cfg.num_rope_angles})")
    return pkg


# ---------------------------------------------------------------------------------------------
# recording what Mamba3Mixer computes inside (module docstring)


@contextlib.contextmanager
def _recording(store: dict):
    """Wrap modeling's ssd_forward, _ssd_mimo, cumulative_angles and Mamba3Mixer._preprocess so each
    call's result is appended to store[name] (layers run in order, so the index is the layer)."""
    from mamba3_jax import modeling

    saved = {name: getattr(modeling, name) for name in ("ssd_forward", "_ssd_mimo", "cumulative_angles")}
    preprocess = modeling.Mamba3Mixer._preprocess

    def recorder(name, fn, keep_args=False):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            store.setdefault(name, []).append((args, out) if keep_args else out)
            return out
        return wrapped

    for name, fn in saved.items():
        setattr(modeling, name, recorder(name, fn, keep_args=name == "cumulative_angles"))
    modeling.Mamba3Mixer._preprocess = recorder("_preprocess", preprocess)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(modeling, name, fn)
        modeling.Mamba3Mixer._preprocess = preprocess


@jax.jit
def _forward_taps(model, ids):
    """Every tap (angles still reduced, with the inputs that unwrap them), plus logits."""
    from flax import nnx

    store: dict = {}
    run = nnx.capture(lambda m, x: m(x), nnx.Intermediate, method_outputs=nnx.Intermediate)
    with _recording(store):
        out, captured = run(model, ids)
    seen = nnx.to_pure_dict(captured)["backbone"]
    call = lambda node: node["__call__"][0]  # noqa: E731 - one recorded call per module
    cfg = model.cfg
    taps = {"embed": call(seen["embedder"])}
    for i, layer in enumerate(model.backbone.layers):
        got, t, mixer = seen["layers"][i], f"layers.{i}", layer.mixer
        in_proj = call(got["mixer"]["in_proj"])
        args, ang = store["cumulative_angles"][i]
        angle_proj, dt_for_angle = args[0], args[1]
        taps |= {f"{t}.norm": call(got["norm"]), f"{t}.mixer.in_proj": in_proj,
                 f"{t}.mixer.angles": ang, f"{t}.angle_inputs": (angle_proj, dt_for_angle)}
        if cfg.is_mimo:
            taps |= _mimo_taps(mixer, t, in_proj, call(got["mixer"]["B_norm"]), call(got["mixer"]["C_norm"]),
                               store["_ssd_mimo"][i][0])
        else:
            z_h, x_h, B_b, C_b, A, dt, trap, _ = store["_preprocess"][i]
            y = store["ssd_forward"][i][0]
            b, l = y.shape[:2]
            gate = call(got["mixer"]["norm"]) if cfg.is_outproj_norm \
                else (y * nnx.silu(z_h)).reshape(b, l, -1)
            taps |= {f"{t}.mixer.dt": dt, f"{t}.mixer.A": A, f"{t}.mixer.trap": trap,
                     f"{t}.mixer.B": B_b[:, :, None], f"{t}.mixer.C": C_b[:, :, None],
                     f"{t}.mixer.ssm": y.reshape(b, l, 1, -1), f"{t}.mixer.gate": gate}
        taps |= {f"{t}.mixer.out_proj": call(got["mixer"]["out_proj"]), t: call(got)[0]}
    taps |= {"norm_f": call(seen["final_norm"]), "logits": out["logits"]}
    return taps


def _mimo_taps(mixer, t, in_proj, B_normed, C_normed, y_o):
    """The MIMO taps from _mimo_forward's own expressions (it computes them inline)."""
    from flax import nnx
    from mamba3_jax import modeling

    b, l = in_proj.shape[:2]
    h, p, g = mixer.num_heads, mixer.head_dim, mixer.ngroups
    e = mixer.intermediate_size
    z, x, _, _, dd_dt, dd_A, trap_proj, _ = _split(mixer, in_proj)
    x_h, z_h = x.reshape(b, l, h, p), z.reshape(b, l, h, p)
    A = jnp.clip(-modeling.heavy_tail_activation(dd_A.astype(jnp.float32)), max=-mixer.A_floor)
    dt = jax.nn.softplus(dd_dt + mixer.dt_bias[:])
    trap = jax.nn.sigmoid(trap_proj)
    B_r = jnp.repeat(B_normed, h // g, axis=3) + jnp.transpose(mixer.B_bias[:], (1, 0, 2))
    C_r = jnp.repeat(C_normed, h // g, axis=3) + jnp.transpose(mixer.C_bias[:], (1, 0, 2))
    v = jnp.einsum("blhp,hrp->blrhp", x_h, mixer.mimo_x[:])
    ssm = y_o + mixer.D[:][None, None, None, :, None] * v
    gate = nnx.silu(z_h[:, :, None] * jnp.transpose(mixer.mimo_z[:], (1, 0, 2))[None, None])
    normed = ssm
    if mixer.is_outproj_norm:
        rms = jax.lax.rsqrt(jnp.mean(ssm.astype(jnp.float32) ** 2, axis=-1, keepdims=True) + 1e-5)
        normed = ssm * rms * mixer.norm.weight[:].reshape(h, p)[None, None, None]
    folded = jnp.einsum("blrhp,hrp->blhp", normed * gate, mixer.mimo_o[:]).reshape(b, l, -1)
    return {f"{t}.mixer.dt": dt, f"{t}.mixer.A": A, f"{t}.mixer.trap": trap, f"{t}.mixer.B": B_r,
            f"{t}.mixer.C": C_r, f"{t}.mixer.ssm": ssm.reshape(b, l, ssm.shape[2], e),
            f"{t}.mixer.gate": folded}


def _split(mixer, proj):
    """Mamba3Mixer._project's split of in_proj's output (without calling in_proj again)."""
    d_inner, h = mixer.intermediate_size, mixer.num_heads
    bc = mixer.state_size * mixer.cfg.ngroups * mixer.mimo_rank
    sizes = [d_inner, d_inner, bc, bc, h, h, h]
    bounds = [sum(sizes[: i + 1]) for i in range(len(sizes))]
    return jnp.split(proj, bounds, axis=-1)


def _unwrap(reduced: np.ndarray, angle_proj: np.ndarray, dt: np.ndarray) -> np.ndarray:
    """The package's angle mod 2 pi with its whole turns restored (module docstring)."""
    theta64 = np.cumsum(np.tanh(angle_proj.astype(np.float64)) * math.pi * dt.astype(np.float64)[..., None],
                        axis=1)
    turns = np.round((theta64 - reduced.astype(np.float64)) / (2 * math.pi))
    return (reduced.astype(np.float64) + 2 * math.pi * turns).astype(np.float32)


@partial(jax.jit, donate_argnames=("cache",))
def _step(model, tokens, cache):
    """One cached forward of one token per sequence -> (logits (b, v), cache)."""
    from mamba3_jax import modeling

    out = modeling.forward(model, tokens[:, None], None, cache)
    return out["logits"][:, -1], out["cache"]


@jax.jit
def _prefill(model, ids):
    from mamba3_jax import modeling

    out = modeling.forward(model, ids, None, None)
    return out["logits"], out["cache"]


def _top2_margin(logits):
    lf = logits.astype(jnp.float32)
    first = jnp.argmax(lf, axis=-1)
    index = jax.lax.broadcasted_iota(jnp.int32, lf.shape, lf.ndim - 1)
    masked = jnp.where(index == first[..., None], -jnp.inf, lf)
    return jnp.max(lf, axis=-1) - jnp.max(masked, axis=-1)


class Mamba3JaxModel:
    """A checkpoint loaded into mamba3_jax.Mamba3ForCausalLM (the `LoadedModel` protocol)."""

    def __init__(self, cfg: Mamba3Config, model, dtype: str, source: str, fmt: str, version: str):
        self.cfg, self.model, self.dtype, self.source, self.format = cfg, model, dtype, source, fmt
        self.version = version
        self.vocab_size, self.decode_lengths = cfg.vocab_size, cfg.decode_lengths
        self.tap_names = tap_names(cfg.n_layers)

    def info(self) -> PortInfo:
        import flax

        return PortInfo(name="mamba3-jax", version=self.version, details={
            "implementation": f"mamba3_jax {self.version} (Flax NNX {flax.__version__}), through "
                              "equiv.mamba3.mamba3_jax_adapter",
            "jax": jax.__version__, "backend": jax.default_backend(), "dtype": self.dtype,
            "jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
            "chunk_size": self.cfg.chunk_size, "checkpoint_format": self.format, "checkpoint": self.source,
            "derived_taps": DERIVED,
            "notes": ["taps recorded while tracing: ssd_forward / _ssd_mimo / cumulative_angles / "
                      "Mamba3Mixer._preprocess wrapped, then restored",
                      "mixer.angles: its mod-2-pi value with the whole turns restored",
                      "no padding mask; no isolated mode; decode is its cached forward of one token"]})

    def _check(self, ids, mask):
        ids, mask = check_tokens(ids, self.cfg.vocab_size, mask)
        if mask is not None and not mask.all():
            raise TapUnavailable(f"mamba3-jax {TESTED_VERSION} takes no padding mask (Mamba3ForCausalLM."
                                 f"__call__ has none); got a mask with {int((mask == 0).sum())} padded "
                                 "positions")
        return jnp.asarray(ids)

    def forward(self, ids, mask=None, taps=True) -> dict[str, np.ndarray]:
        ids = self._check(ids, mask)
        with jax.numpy_rank_promotion("allow"):
            if not taps:
                return {"logits": np.asarray(_prefill(self.model, ids)[0].astype(jnp.float32))}
            out = _forward_taps(self.model, ids)
        host = {k: v for k, v in out.items() if not k.endswith("angle_inputs")}
        for i in range(self.cfg.n_layers):
            angle_proj, dt = out[f"layers.{i}.angle_inputs"]
            t = f"layers.{i}.mixer.angles"
            host[t] = _unwrap(np.asarray(out[t], np.float32), np.asarray(angle_proj, np.float32),
                              np.asarray(dt, np.float32))
        return {k: np.asarray(jnp.asarray(host[k]).astype(jnp.float32)) for k in self.tap_names}

    def forward_isolated(self, ids, mask, inputs) -> dict[str, np.ndarray]:
        raise TapUnavailable("mamba3-jax exposes no entry point that computes one op from given inputs "
                             "(its SSM runs inside Mamba3Mixer.__call__)")

    def step_logits(self, ids, mask, prompt_len: int) -> np.ndarray:
        ids = self._check(ids, mask)
        if not 1 <= prompt_len <= ids.shape[1]:
            raise EquivError(f"prompt_len: expected 1 <= prompt_len <= l={ids.shape[1]}, got {prompt_len}")
        with jax.numpy_rank_promotion("allow"):
            logits, cache = _prefill(self.model, ids[:, :prompt_len])
            steps = [logits[:, -1]]
            for t in range(prompt_len, ids.shape[1]):
                last, cache = _step(self.model, ids[:, t], cache)
                steps.append(last)
        return np.stack([np.asarray(s, np.float32) for s in steps], axis=1)

    def generate(self, prompt, mask=None, max_new_tokens=32, eos_id=None) -> GenerateResult:
        """Greedy (argmax ties to the first index, as torch), a host loop over the package's cached
        forward; after eos a sequence emits pad; stops when every sequence has emitted eos."""
        prompt = self._check(prompt, mask)
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise EquivError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
        pad = jnp.int32(self.cfg.pad_token_id if self.cfg.pad_token_id is not None else 0)
        tokens, margins, done = [], [], jnp.zeros((prompt.shape[0],), bool)
        with jax.numpy_rank_promotion("allow"):
            logits, cache = _prefill(self.model, prompt)
            logits = logits[:, -1]
            for step in range(max_new_tokens):
                nxt = jnp.where(done, pad, jnp.argmax(logits, axis=-1).astype(jnp.int32))
                tokens.append(nxt)
                margins.append(jnp.where(done, jnp.nan, _top2_margin(logits)))
                if eos_id is not None:
                    done = done | (nxt == eos_id)
                    if bool(done.all()):
                        break
                if step + 1 < max_new_tokens:
                    logits, cache = _step(self.model, nxt, cache)
        return GenerateResult(np.stack([np.asarray(t) for t in tokens], axis=1).astype(np.int32),
                              np.stack([np.asarray(m) for m in margins], axis=1).astype(np.float32),
                              len(tokens))


class Mamba3JaxPort:
    """Registry name "mamba3-jax"."""

    name = "mamba3-jax"

    def load(self, checkpoint_dir: str | Path, dtype: str = "float32") -> Mamba3JaxModel:
        mj = import_mamba3_jax()
        checkpoint_dir = Path(checkpoint_dir)
        if not checkpoint_dir.is_dir():
            raise CheckpointError(f"checkpoint: expected a directory, got {checkpoint_dir} "
                                  f"({'a file' if checkpoint_dir.exists() else 'does not exist'})")
        if dtype not in _DTYPES:
            raise EquivError(f"dtype: expected one of {sorted(_DTYPES)}, got {dtype!r}")
        cfg, fmt = load_config(checkpoint_dir)
        tensors = read_tensors(checkpoint_dir)
        check_tensors(cfg, tensors)  # strict names and shapes; the package's loader only matches patterns
        with jax.numpy_rank_promotion("allow"):
            model = mj.create_random_model(config_for_package(mj, cfg), seed=0)  # every weight overwritten
        try:
            _, _, skipped = mj.load_pytorch_weights(model, tensors, dtype=_DTYPES[dtype], strict=True)
        except ValueError as e:
            raise CheckpointError(f"{fmt} checkpoint: mamba3-jax's loader refused it: {e}") from None
        if skipped:
            raise CheckpointError(f"{fmt} checkpoint: mamba3-jax's loader skipped keys: {skipped[:8]}")
        try:
            version = importlib.metadata.version(PACKAGE)
        except importlib.metadata.PackageNotFoundError:
            version = getattr(mj, "__version__", "unknown")
        return Mamba3JaxModel(cfg, model, dtype, str(checkpoint_dir), fmt, version)
