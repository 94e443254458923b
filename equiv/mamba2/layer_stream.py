"""The built-in Mamba-2 port, stage by stage (Family.streaming["port"]; equiv/stream/protocol.py):
the embedding, each block, the head, each reading only its own tensors when loaded.

Each stage runs the very functions of equiv/mamba2/model.py that the whole-model port runs, in the
same order and with the same casts, jitted per block (one compile serves every block) instead of
over the whole model; on every bundled fixture the taps, isolated taps and step logits are
bit-identical to the in-memory port's (tests/test_layer_streaming.py). The checkpoint's keys,
shapes and dtypes are checked from the headers before anything runs, by the whole-model port's own
check (convert.check_tensors); a stage's values (finite, tied head equal to the embedding) when it
loads.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from equiv.errors import CheckpointError
from equiv.inputs import check_tokens, require_checkpoint_dir
from equiv.io.layer_reader import TensorIndex
from equiv.kblock import HEAD, arrange, weight_layout
from equiv.mamba2 import model as m
from equiv.mamba2.config import Mamba2Config
from equiv.mamba2.config_file import load_config
from equiv.mamba2.convert import _check_dtype, check_tensors, to_port_layout
from equiv.mamba2.footprint import F32, ssd_bytes
from equiv.mamba2.port import PROJECTIONS, Mamba2Model, _isolated_layer
from equiv.mamba2.taps import layer_taps, tap_names
from equiv.ports import PortInfo

f32 = jnp.float32


def _out(v) -> np.ndarray:
    """A tap as the in-memory port returns it: numpy, bf16 widened to float32."""
    return np.asarray(v.astype(f32) if v.dtype == jnp.bfloat16 else v)


# ---------------------------------------------------------------------------------------------
# one block, jitted on its own: the loop bodies of model.forward and model.decode_step


@partial(jax.jit, static_argnames=("cfg",))
def _block(cfg: Mamba2Config, lp, hidden, mask):
    """model.forward's block (fresh cache, every tap) -> (hidden, taps by sub-name)."""
    b = hidden.shape[0]
    conv0 = jnp.zeros((b, cfg.conv_kernel - 1, cfg.conv_dim), lp["norm"].dtype)
    ssm0 = jnp.zeros((b, cfg.n_heads, cfg.head_dim, cfg.d_state), f32)
    normed = m.block_norm(cfg, lp, hidden, spans=m.k_spans(lp["in_proj"]))
    zxbcdt = m.mixer_in_proj(cfg, lp, normed, mask)
    conv_out, _ = m.mixer_conv(cfg, lp, zxbcdt, mask, conv0)
    y, _ = m.mixer_ssm(cfg, lp, zxbcdt, conv_out, ssm0, cfg.chunk_size)
    gated = m.mixer_gated_norm(cfg, lp, zxbcdt, y, spans=m.k_spans(lp["out_proj"]))
    out = m.mixer_out_proj(cfg, lp, gated)
    hidden = m.block_residual(cfg, hidden, out)
    return hidden, {"norm": m.whole(normed), "mixer.in_proj": zxbcdt, "mixer.conv": conv_out, "mixer.ssm": y,
                    "mixer.gated_norm": m.whole(gated), "mixer.out_proj": out, "": hidden}


@partial(jax.jit, static_argnames=("cfg", "last"))
def _block_prefill(cfg: Mamba2Config, lp, hidden, mask, last: bool):
    """generate.prefill's block (model.forward with last_logits_only): -> (hidden, conv state, SSM
    state) as the stacked cache stores them. The last block carries the last position only."""
    b = hidden.shape[0]
    conv0 = jnp.zeros((b, cfg.conv_kernel - 1, cfg.conv_dim), lp["norm"].dtype)
    ssm0 = jnp.zeros((b, cfg.n_heads, cfg.head_dim, cfg.d_state), f32)
    normed = m.block_norm(cfg, lp, hidden, spans=m.k_spans(lp["in_proj"]))
    if last:
        y, zxbcdt, conv_state, ssm_state = m.mixer_last_position(cfg, lp, normed, mask, conv0, ssm0,
                                                                  cfg.chunk_size)
        hidden = hidden[:, -1:]
    else:
        zxbcdt = m.mixer_in_proj(cfg, lp, normed, mask)
        conv_out, conv_state = m.mixer_conv(cfg, lp, zxbcdt, mask, conv0)
        y, ssm_state = m.mixer_ssm(cfg, lp, zxbcdt, conv_out, ssm0, cfg.chunk_size)
    gated = m.mixer_gated_norm(cfg, lp, zxbcdt, y, spans=m.k_spans(lp["out_proj"]))
    hidden = m.block_residual(cfg, hidden, m.mixer_out_proj(cfg, lp, gated))
    return hidden, conv_state.astype(conv0.dtype), ssm_state.astype(f32)


@partial(jax.jit, static_argnames=("cfg",))
def _block_step(cfg: Mamba2Config, lp, hidden, conv_state, ssm_state):
    """model.decode_step's block: one token (b, d) -> (hidden, conv state, SSM state)."""
    h, p = cfg.n_heads, cfg.head_dim
    b = hidden.shape[0]
    normed = m.block_norm(cfg, lp, hidden, spans=m.k_spans(lp["in_proj"]))
    zxbcdt = m.linear(normed, lp["in_proj"], lp.get("in_proj_bias"))
    z, xBC, dt = m._split(zxbcdt, (cfg.d_inner, cfg.conv_dim, h))
    conv_out, conv_state = m.causal_conv(xBC[:, None], lp["conv_w"], lp.get("conv_b"), conv_state)
    x, B, C = m._x_b_c(cfg, conv_out[:, 0])
    A = -jnp.exp(lp["A_log"].astype(f32))
    y, ssm_state = m.ssd_step(ssm_state, x, dt, A, B, C, **m._ssd_args(cfg, lp))
    gated = m.gated_rms_norm(y.reshape(b, h * p), z, lp["gnorm"], cfg.norm_eps, cfg.n_groups,
                             spans=m.k_spans(lp["out_proj"]))
    out = m.linear(gated, lp["out_proj"], lp.get("out_proj_bias"))
    return m.block_residual(cfg, hidden, out), conv_state, ssm_state


@partial(jax.jit, static_argnames=("cfg",))
def _head(cfg: Mamba2Config, params, hidden):
    normed = m.rms_norm(hidden, params["norm_f"], cfg.norm_eps)
    return normed, m.lm_logits(cfg, params, normed)


@partial(jax.jit, static_argnames=("cfg", "last_position"))
def _head_logits(cfg: Mamba2Config, params, hidden, last_position: bool):
    """generate.prefill's head (last_position: of a (b, 1, d) prompt) or decode_step's (b, d)."""
    normed = m.rms_norm(hidden, params["norm_f"], cfg.norm_eps)
    return m.lm_logits(cfg, params, normed[:, -1] if last_position else normed)


# ---------------------------------------------------------------------------------------------
# the stages


class _Loaded:
    def __init__(self, side: StreamedPort, params: dict):
        self.side, self.params = side, params

    def close(self) -> None:
        self.params = None

    def _precision(self):
        return jax.default_matmul_precision(self.side.precision)

    def _mask(self, mask):
        return None if mask is None else jnp.asarray(mask)


class _EmbedStage:
    label, tap_names = "embedding", ("embed",)

    def __init__(self, side: StreamedPort):
        self.side = side

    def load(self):
        return _LoadedEmbed(self.side, self.side.params_of({self.side.embed_key: "embed"}))


class _LoadedEmbed(_Loaded):
    def forward(self, ids, mask):
        ids, _ = check_tokens(ids, self.side.cfg.vocab_size, mask)
        with self._precision():
            hidden = m.embed(self.params, jnp.asarray(ids))
        return hidden, {"embed": _out(hidden)}

    def forward_isolated(self, ids, mask, fed):
        ids, _ = check_tokens(ids, self.side.cfg.vocab_size, mask)
        with self._precision():  # as Mamba2Model.forward_isolated: eagerly, widened to float32
            return {"embed": np.asarray(m.embed(self.params, jnp.asarray(ids)).astype(f32))}

    def decode(self, prompt, steps, mask):
        check_tokens(prompt, self.side.cfg.vocab_size, mask)
        with self._precision():
            return (m.embed(self.params, jnp.asarray(prompt)),
                    [m.embed(self.params, jnp.asarray(np.asarray(t, np.int32))) for t in steps])


class _BlockStage:
    def __init__(self, side: StreamedPort, i: int):
        self.side, self.i = side, i
        self.label = f"layer {i + 1}/{side.cfg.n_layers}"
        self.tap_names = tuple(layer_taps(i))

    def load(self):
        return _LoadedBlock(self.side, self.side.params_of(self.side.layer_keys[self.i]), self.i)


class _LoadedBlock(_Loaded):
    def __init__(self, side, params, i):
        super().__init__(side, params)
        self.i = i

    def forward(self, hidden, mask):
        with self._precision():
            hidden, taps = _block(self.side.cfg, self.params, hidden, self._mask(mask))
        t = f"layers.{self.i}"
        return hidden, {f"{t}.{k}" if k else t: _out(v) for k, v in taps.items()}

    def forward_isolated(self, ids, mask, fed):
        """Mamba2Model.forward_isolated's block i, on the oracle's taps."""
        cfg, i, dt = self.side.cfg, self.i, self.side.jnp_dtype
        t, prev = f"layers.{i}", ("embed" if i == 0 else f"layers.{i - 1}")
        need = [prev, *(f"{t}.{s}" for s in ("norm", "mixer.in_proj", "mixer.conv", "mixer.ssm",
                                              "mixer.gated_norm", "mixer.out_proj"))]
        missing = [n for n in need if n not in fed]
        if missing:
            from equiv.ports import TapUnavailable
            raise TapUnavailable(f"isolated mode needs the reference's taps {missing[:5]}")
        get = lambda name, dtype=dt: jnp.asarray(np.asarray(fed[name]), dtype)  # noqa: E731
        resid = f32 if cfg.residual_in_fp32 else dt
        with self._precision():
            res = _isolated_layer(cfg, self.params, get(prev, resid if i else dt),
                                  *(get(n) for n in need[1:]), self._mask(mask))
        return {f"{t}.{k}" if k else t: np.asarray(v.astype(f32)) for k, v in res.items()}

    def decode(self, prompt, steps, mask):
        cfg = self.side.cfg
        with self._precision():
            hidden, conv, ssm = _block_prefill(cfg, self.params, prompt, self._mask(mask),
                                               self.i == cfg.n_layers - 1)
            out = []
            for h in steps:
                h, conv, ssm = _block_step(cfg, self.params, h, conv, ssm)
                out.append(h)
        return hidden, out


class _HeadStage:
    label, tap_names = "head", ("norm_f", "logits")

    def __init__(self, side: StreamedPort):
        self.side = side

    def load(self):
        side = self.side
        keys = {"backbone.norm_f.weight": "norm_f", side.embed_key: "embed"}
        if not side.cfg.tie_embeddings:
            keys["lm_head.weight"] = "lm_head"
        elif "lm_head.weight" in side.reader:  # saved tied head: accepted only if it is the embedding
            raw = side.reader.read([*keys, "lm_head.weight"])
            if not np.array_equal(raw["lm_head.weight"], raw[side.embed_key]):
                raise CheckpointError(f"{side.fmt} checkpoint: expected the tensors its config.json implies, "
                                      "got: unexpected keys (1): lm_head.weight (present and different from "
                                      "the embedding although tie_word_embeddings is true)")
        return _LoadedHead(side, side.params_of(keys))


class _LoadedHead(_Loaded):
    def forward(self, hidden, mask):
        with self._precision():
            normed, logits = _head(self.side.cfg, self.params, hidden)
        return None, {"norm_f": _out(normed), "logits": _out(logits)}

    def forward_isolated(self, ids, mask, fed):
        """As Mamba2Model.forward_isolated's head: eagerly, on the oracle's last block and norm_f."""
        cfg, dt = self.side.cfg, self.side.jnp_dtype
        resid = f32 if cfg.residual_in_fp32 else dt
        with self._precision():
            last = jnp.asarray(np.asarray(fed[f"layers.{cfg.n_layers - 1}"]), resid)
            norm_f = m.rms_norm(last, self.params["norm_f"], cfg.norm_eps)
            logits = m.lm_logits(cfg, self.params, jnp.asarray(np.asarray(fed["norm_f"]), last.dtype))
        return {"norm_f": np.asarray(norm_f.astype(f32)), "logits": np.asarray(logits.astype(f32))}

    def decode(self, prompt, steps, mask):
        cfg = self.side.cfg
        with self._precision():
            first = np.asarray(_head_logits(cfg, self.params, prompt, True), np.float32)
            return first, [np.asarray(_head_logits(cfg, self.params, h, False), np.float32) for h in steps]


# ---------------------------------------------------------------------------------------------
# the side


class StreamedPort:
    """The built-in port as stages over one checkpoint (nothing read but config.json and the
    safetensors headers until a stage loads)."""

    def __init__(self, checkpoint_dir: str | Path, dtype: str = "float32", *,
                 reader: TensorIndex | None = None, precision: str = "highest"):
        self.np_dtype = _check_dtype(dtype)
        self.jnp_dtype = jnp.dtype(self.np_dtype)
        checkpoint_dir = require_checkpoint_dir(checkpoint_dir)
        self.cfg, self.fmt = load_config(checkpoint_dir)
        self.reader = reader if reader is not None else TensorIndex(checkpoint_dir)
        self.precision = precision
        wanted = check_tensors(self.cfg, self.fmt, self.reader.placeholders())  # names, shapes, dtypes
        self.embed_key = next(k for k, (ours, _) in wanted.items() if ours == "embed")
        self.layer_keys: list[dict[str, str]] = [{} for _ in range(self.cfg.n_layers)]
        for key, (ours, _) in wanted.items():
            if isinstance(ours, tuple):
                self.layer_keys[ours[1]][key] = ours[0]
        # info() and memory_estimate() are the whole-model port's own, so reports say the same
        self._described = Mamba2Model(self.cfg, None, dtype, str(checkpoint_dir), self.fmt, precision)
        self.tap_names = tap_names(self.cfg.n_layers)
        self.vocab_size, self.decode_lengths = self.cfg.vocab_size, self.cfg.decode_lengths
        self.stages = [_EmbedStage(self), *(_BlockStage(self, i) for i in range(self.cfg.n_layers)),
                       _HeadStage(self)]

    def info(self) -> PortInfo:
        return self._described.info()

    def memory_estimate(self, batch: int, seq_len: int) -> int:
        """The in-memory port's largest forward (equiv/mamba2/footprint.py)."""
        return self._described.memory_estimate(batch, seq_len)

    def memory_detail(self, batch: int, seq_len: int) -> str:
        return self._described.memory_detail(batch, seq_len)

    def stage_activation_bytes(self, batch: int, seq_len: int) -> int:
        """One block's taps and its SSD's transient peak, float32 (footprint.py's terms for one layer)."""
        cfg = self.cfg
        widths = 4 * cfg.d_model + cfg.in_proj_dim + cfg.conv_dim + 2 * cfg.d_inner
        return 2 * F32 * batch * seq_len * widths + ssd_bytes(cfg, batch, seq_len)

    def largest_stage_f32_bytes(self) -> int:
        """The weights of the largest stage (a block, or the embedding / head), as float32."""
        head = [self.embed_key] + ([] if self.cfg.tie_embeddings else ["lm_head.weight"])
        return max(self.reader.nbytes(names, itemsize=4) for names in (head, *self.layer_keys))

    def params_of(self, keys: dict[str, str]) -> dict:
        """These checkpoint tensors ({key: our name}) as the port holds them, refused if non-finite
        (convert._to_params's rule, per stage)."""
        raw = self.reader.read(keys)
        params, nonfinite = {}, []
        for key, name in keys.items():
            with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is reported just below
                a = to_port_layout(self.cfg, name, raw[key], self.np_dtype)
            if not np.isfinite(a).all():
                nonfinite.append(f"{key} ({int(a.size - np.isfinite(a).sum())} of {a.size})")
            params[name] = a
        if nonfinite:
            raise CheckpointError(f"{self.fmt} checkpoint: expected finite weights in "
                                  f"{np.dtype(self.np_dtype).name}, got NaN/inf in {len(nonfinite)} tensors: "
                                  f"{', '.join(nonfinite[:8])}")
        # the projections (and an untied head) in the form Mamba2Port.load holds them on this backend
        # (equiv/kblock.py: K-blocks on CPU, rows elsewhere), cut or transposed on the host so each
        # weight is copied to the device once, in its stored form
        layout = weight_layout()
        arranged = {k: arrange(v, layout) if k in PROJECTIONS or (k in HEAD and layout == "rows") else v
                    for k, v in params.items()}
        return jax.tree.map(jnp.asarray, arranged)


def stream_port(checkpoint_dir: str | Path, dtype: str = "float32", *, reader: TensorIndex | None = None):
    """Family.streaming["port"]: the built-in port ("builtin") as stages."""
    return StreamedPort(checkpoint_dir, dtype, reader=reader)
