"""The built-in Mamba-2 port over a device mesh: heads tensor-parallel, the batch data-parallel.

Mesh axes ("data", "model"). Over "model" every device holds whole heads: its columns of in_proj
(z, x, B, C, dt of its heads and of the groups they read, laid out device-major so that one
NamedSharding block is exactly one device's [z | x | B | C | dt]), its conv channels, its heads'
dt_bias, A_log, D, its gated-norm weights and its rows of out_proj. The SSD needs no communication
(it is independent per head); out_proj's partial products are summed by one all-reduce per layer.
When a group's heads span several devices (n_groups < the model axis), B and C of that group are
replicated on those devices and the gated norm's sum of squares is all-reduced too, g values per
position: the one other collective. Embeddings, norms and the head are replicated.
Over "data" the batch is split, padded with copies of its last row when it does not divide.
docs/sharding.md gives the reasons and the measured figures.

The model code stays one source: each device runs equiv.mamba2.model's own blocks on its slice,
described by a `SliceConfig` (its heads and groups), inside `jax.shard_map`; what is added here is
placement (the device-major columns), the out_proj all-reduce and the gated norm of a group that
spans devices. `ShardedMamba2Model` is the port protocol's LoadedModel: its taps come back in the
natural column order, so the harness compares it like any port.
Verifying it against the unsharded port (`equiv diff --mesh`): equiv/mamba2/sharded_vs_unsharded.py.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from equiv.errors import EquivError, quote
from equiv.greedy import greedy_loop
from equiv.kblock import host_dense
from equiv.mamba2 import model as m
from equiv.mamba2.config import Mamba2Config
from equiv.mamba2.port import Mamba2Model
from equiv.mamba2.ssd import ssd_step

DATA, MODEL = "data", "model"
f32 = jnp.float32
SHARDED_TAPS = ("mixer.in_proj", "mixer.conv", "mixer.ssm", "mixer.gated_norm")  # split over heads
DEVICE_MAJOR_TAPS = ("mixer.in_proj", "mixer.conv")  # columns reordered device-major on the mesh


class MeshError(EquivError):
    """A mesh the checkpoint or the machine cannot run; one line."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SliceConfig(Mamba2Config):
    """One device's slice of a mixer: n_heads and n_groups are its own (the groups its heads read),
    d_inner its heads' channels. Only the mixer's blocks see it; the residual stream keeps d_model."""

    @property
    def d_inner(self) -> int:
        return self.n_heads * self.head_dim


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a checkpoint lies on a (data, model) mesh."""

    data: int
    model: int
    local: SliceConfig
    share: int  # devices holding parts of one group's heads (1: every device holds whole groups)
    in_cols: np.ndarray  # device-major in_proj columns: the natural column each one is
    conv_cols: np.ndarray  # the same for the conv channels (x | B | C)
    in_natural: np.ndarray  # for each natural in_proj column, a device-major position holding it
    conv_natural: np.ndarray


def layout(cfg: Mamba2Config, data: int, model: int, devices: int | None = None) -> Layout:
    """Check that the mesh fits the checkpoint and the machine (one MeshError line otherwise) and
    lay the columns out device-major."""
    shape = f"--mesh {data}x{model}"
    h, g, n, e = cfg.n_heads, cfg.n_groups, cfg.d_state, cfg.d_inner
    if h % model:
        raise MeshError(f"{shape}: expected a model axis that divides num_heads = {h} (each device holds "
                        f"whole heads), got {model}")
    if g % model and model % g:
        raise MeshError(f"{shape}: expected a model axis that divides n_groups = {g} or is a multiple of "
                        f"it (each device's heads read whole groups), got {model}")
    devices = jax.device_count() if devices is None else devices
    if data * model > devices:
        kind = jax.devices()[0].platform
        raise MeshError(f"{shape}: expected data x model <= the {devices} {kind} device(s) this process "
                        f"sees, got {data * model}; on CPU, simulate {data * model} with XLA_FLAGS="
                        f"--xla_force_host_platform_device_count={data * model} set before it starts")
    h_loc, share = h // model, max(1, model // g)
    g_loc = max(1, g // model)
    local = SliceConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
                        | {"n_heads": h_loc, "n_groups": g_loc})
    e_loc = local.d_inner
    in_cols, conv_cols = [], []
    for k in range(model):
        groups = range(k // share * g_loc, k // share * g_loc + g_loc)
        x = [e + c for c in range(k * e_loc, (k + 1) * e_loc)]
        B = [2 * e + gi * n + j for gi in groups for j in range(n)]
        C = [c + g * n for c in B]
        in_cols += list(range(k * e_loc, (k + 1) * e_loc)) + x + B + C
        in_cols += [2 * e + 2 * g * n + j for j in range(k * h_loc, (k + 1) * h_loc)]
        conv_cols += [c - e for c in x + B + C]

    def first_positions(cols, size):
        out = np.full(size, -1, np.int64)
        for pos in range(len(cols) - 1, -1, -1):
            out[cols[pos]] = pos
        return out

    in_cols, conv_cols = np.asarray(in_cols), np.asarray(conv_cols)
    return Layout(data, model, local, share, in_cols, conv_cols, first_positions(in_cols, cfg.in_proj_dim),
                  first_positions(conv_cols, cfg.conv_dim))


# ---------------------------------------------------------------------------------------------
# placement


_LAYER_SPECS = {"norm": P(), "in_proj": P(None, MODEL), "in_proj_bias": P(MODEL), "conv_w": P(None, MODEL),
                "conv_b": P(MODEL), "dt_bias": P(MODEL), "A_log": P(MODEL), "D": P(MODEL),
                "gnorm": P(MODEL), "out_proj": P(MODEL, None), "out_proj_bias": P()}


def param_specs(params: dict) -> dict:
    """The PartitionSpec of every parameter (a K-block tuple: one spec per block)."""
    def spec(name, v):
        return tuple(_LAYER_SPECS[name] for _ in v) if isinstance(v, tuple) else _LAYER_SPECS[name]
    return {k: [{n: spec(n, v) for n, v in lp.items()} for lp in params["layers"]] if k == "layers" else P()
            for k, v in params.items()}


def _device_major(lp: dict, lay: Layout) -> dict:
    """One layer's weights (host arrays, projections whole) with the model axis's columns
    device-major, and out_proj in K-blocks of each device's own rows (the unsharded port's block
    size, model.split_k)."""
    out = dict(lp)
    out["in_proj"] = m.split_k(lp["in_proj"][:, lay.in_cols])
    if "in_proj_bias" in lp:
        out["in_proj_bias"] = lp["in_proj_bias"][lay.in_cols]
    out["conv_w"] = lp["conv_w"][:, lay.conv_cols]
    if "conv_b" in lp:
        out["conv_b"] = lp["conv_b"][lay.conv_cols]
    e_loc = lay.local.d_inner
    rows = lp["out_proj"].reshape(lay.model, e_loc, -1)
    out["out_proj"] = tuple(rows[:, a:b].reshape(-1, rows.shape[-1])
                            for a, b in m.k_spans(m.split_k(rows[0])))
    return out


def place_params(params: dict, lay: Layout, mesh: Mesh) -> dict:
    """The unsharded port's params (projections in any of equiv/kblock.py's forms) -> the same weights
    on the mesh. The mesh keeps its own layout on every backend: K-blocks as above (the device-major
    columns and the per-device out_proj rows are cut from the (K, N) weight), the head whole."""
    layers = [_device_major({k: host_dense(v) for k, v in lp.items()}, lay) for lp in params["layers"]]
    arranged = {k: layers if k == "layers" else host_dense(v) for k, v in params.items()}
    return jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), arranged,
                        param_specs(arranged))


def make_mesh(data: int, model: int) -> Mesh:
    devices = np.asarray(jax.devices()[:data * model]).reshape(data, model)
    return Mesh(devices, (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto))


# ---------------------------------------------------------------------------------------------
# what each device runs (inside shard_map): the model's blocks on its slice


def _gated_norm(lc: SliceConfig, share: int, lp, z, y, spans=None):
    """The gated RMSNorm per group. A device holding whole groups runs the model's own; one holding
    1/share of a group's channels sums its squares locally and all-reduces them with the group's
    other devices (a one-hot slot per group, so one psum of g values per position serves all)."""
    if share == 1:
        return m.gated_rms_norm(y, z, lp["gnorm"], lc.norm_eps, lc.n_groups, spans=spans)
    yf = y.astype(f32) * m.silu(z.astype(f32))
    groups = jax.lax.axis_size(MODEL) // share
    slot = jnp.arange(groups) == jax.lax.axis_index(MODEL) // share
    slot = jnp.broadcast_to(slot, (*yf.shape[:-1], groups)).astype(f32)
    part = jnp.broadcast_to(jnp.sum(yf * yf, axis=-1, keepdims=True), slot.shape)
    total = jnp.sum(jax.lax.psum(part * slot, MODEL) * slot, axis=-1, keepdims=True)
    scale = jax.lax.rsqrt(total / (lc.d_inner * share) + lc.norm_eps)
    return jnp.broadcast_to(lp["gnorm"], y.shape) * (yf * jnp.broadcast_to(scale, yf.shape)).astype(y.dtype)


def _out_proj(lp, gated):
    """out_proj over this device's rows, summed over the model axis (the layer's all-reduce), then
    the bias once."""
    out = jax.lax.psum(m.linear(gated, lp["out_proj"]), MODEL)
    bias = lp.get("out_proj_bias")
    return out if bias is None else out + jnp.broadcast_to(bias, out.shape)


def _local_forward(cfg, lc, share, params, ids, mask, *, taps: bool, last_only: bool):
    """m.forward on this device's slice: (logits, cache, taps)."""
    hidden = m.embed(params, ids)
    zero = m.empty_cache(lc, ids.shape[0], params["embed"].dtype)
    convs, ssms, tap_dict = [], [], {"embed": hidden} if taps else {}
    for i, lp in enumerate(params["layers"]):
        normed = m.block_norm(cfg, lp, hidden, spans=m.k_spans(lp["in_proj"]))
        zxbcdt = m.mixer_in_proj(lc, lp, normed, mask)
        conv_out, conv_state = m.mixer_conv(lc, lp, zxbcdt, mask, zero.conv[i])
        y, ssm_state = m.mixer_ssm(lc, lp, zxbcdt, conv_out, zero.ssm[i], lc.chunk_size)
        gated = _gated_norm(lc, share, lp, zxbcdt[..., :lc.d_inner], y, spans=m.k_spans(lp["out_proj"]))
        out = _out_proj(lp, gated)
        hidden = m.block_residual(cfg, hidden, out)
        convs.append(conv_state)
        ssms.append(ssm_state)
        if taps:
            t = f"layers.{i}"
            tap_dict |= {f"{t}.norm": m.whole(normed), f"{t}.mixer.in_proj": zxbcdt,
                         f"{t}.mixer.conv": conv_out, f"{t}.mixer.ssm": y,
                         f"{t}.mixer.gated_norm": m.whole(gated), f"{t}.mixer.out_proj": out, t: hidden}
    normed = m.rms_norm(hidden, params["norm_f"], cfg.norm_eps)
    logits = m.lm_logits(cfg, params, normed[:, -1] if last_only else normed)
    if taps:
        tap_dict |= {"norm_f": normed, "logits": logits}
    return logits, m.Cache(jnp.stack(convs), jnp.stack(ssms)), tap_dict


def _local_step(cfg, lc, share, params, cache, tokens):
    """m.decode_step on this device's slice: one token per sequence, O(1)."""
    hidden = m.embed(params, tokens)
    convs, ssms = [], []
    for i, lp in enumerate(params["layers"]):
        normed = m.block_norm(cfg, lp, hidden, spans=m.k_spans(lp["in_proj"]))
        zxbcdt = m.linear(normed, lp["in_proj"], lp.get("in_proj_bias"))
        z, xBC, dt = m._split(zxbcdt, (lc.d_inner, lc.conv_dim, lc.n_heads))
        conv_out, conv_state = m.causal_conv(xBC[:, None], lp["conv_w"], lp.get("conv_b"), cache.conv[i])
        x, B, C = m._x_b_c(lc, conv_out[:, 0])
        A = -jnp.exp(lp["A_log"].astype(f32))
        y, ssm_state = ssd_step(cache.ssm[i], x, dt, A, B, C, **m._ssd_args(lc, lp))
        gated = _gated_norm(lc, share, lp, z, y.reshape(z.shape), spans=m.k_spans(lp["out_proj"]))
        hidden = m.block_residual(cfg, hidden, _out_proj(lp, gated))
        convs.append(conv_state)
        ssms.append(ssm_state)
    logits = m.lm_logits(cfg, params, m.rms_norm(hidden, params["norm_f"], cfg.norm_eps))
    return logits, m.Cache(jnp.stack(convs), jnp.stack(ssms))


def _local_isolated(cfg, lc, share, lp, layer_in, normed_in, in_proj_in, conv_in, ssm_in, gated_in,
                    out_proj_in, mask):
    """port._isolated_layer on this device's slice: each sub-op from the reference's inputs to it."""
    b = layer_in.shape[0]
    zero_conv = jnp.zeros((b, lc.conv_kernel - 1, lc.conv_dim), in_proj_in.dtype)
    zero_ssm = jnp.zeros((b, lc.n_heads, lc.head_dim, lc.d_state), f32)
    return {
        "norm": m.block_norm(cfg, lp, layer_in),
        "mixer.in_proj": m.mixer_in_proj(lc, lp, normed_in, mask),
        "mixer.conv": m.mixer_conv(lc, lp, in_proj_in, mask, zero_conv)[0],
        "mixer.ssm": m.mixer_ssm(lc, lp, in_proj_in, conv_in, zero_ssm, lc.chunk_size)[0],
        "mixer.gated_norm": _gated_norm(lc, share, lp, in_proj_in[..., :lc.d_inner], ssm_in),
        "mixer.out_proj": _out_proj(lp, gated_in),
        "": m.block_residual(cfg, layer_in, out_proj_in),
    }


def _decode_loop(step, params, cache, logits, max_new_tokens: int, eos_id, pad_id):
    """equiv.greedy.greedy_loop with the sharded step: greedy tokens on device."""
    return greedy_loop(lambda c, t: step(params, c, t), cache, logits, max_new_tokens, eos_id, pad_id)


# ---------------------------------------------------------------------------------------------
# the loaded model


BATCH = P(DATA)
CACHE = m.Cache(P(None, DATA, None, MODEL), P(None, DATA, MODEL))


class ShardedMamba2Model(Mamba2Model):
    """The built-in port's loaded model, placed on a (data, model) mesh. Same protocol, same
    checks and precision scope (the base class); only the device entry points differ."""

    def __init__(self, unsharded: Mamba2Model, data: int, model: int):
        lay = layout(unsharded.cfg, data, model)
        mesh = make_mesh(data, model)
        super().__init__(unsharded.cfg, place_params(unsharded.params, lay, mesh), unsharded.dtype,
                         unsharded.source, unsharded.format, unsharded.precision)
        self.layout, self.mesh = lay, mesh
        cfg, lc, share, specs = self.cfg, lay.local, lay.share, param_specs(self.params)
        tap_specs = {t: P(DATA, None, MODEL) if t.split(".", 2)[-1] in SHARDED_TAPS else BATCH
                     for t in self.tap_names}
        smap = partial(jax.shard_map, mesh=mesh)

        def forward(p, ids, mask, taps):
            logits, _, tap_dict = _local_forward(cfg, lc, share, p, ids, mask, taps=taps, last_only=False)
            return tap_dict if taps else {"logits": logits}

        self._forward_fns = {taps: jax.jit(smap(partial(forward, taps=taps), in_specs=(specs, BATCH, BATCH),
                                                out_specs=tap_specs if taps else {"logits": BATCH}))
                             for taps in (True, False)}
        self._prefill_fn = jax.jit(smap(
            lambda p, i, k: _local_forward(cfg, lc, share, p, i, k, taps=False, last_only=True)[:2],
            in_specs=(specs, BATCH, BATCH), out_specs=(BATCH, CACHE)))
        step = smap(partial(_local_step, cfg, lc, share), in_specs=(specs, CACHE, BATCH),
                    out_specs=(BATCH, CACHE))
        self._step_fn = jax.jit(step, donate_argnums=(1,))
        self._loop_fn = jax.jit(partial(_decode_loop, step), static_argnames=("max_new_tokens",),
                                donate_argnames=("cache",))
        acts = (BATCH, BATCH, P(DATA, None, MODEL), P(DATA, None, MODEL), P(DATA, None, MODEL),
                P(DATA, None, MODEL), BATCH, BATCH)
        iso_out = {k: P(DATA, None, MODEL) if k in SHARDED_TAPS else BATCH
                   for k in ("norm", *SHARDED_TAPS, "mixer.out_proj", "")}
        self._isolated_fn = jax.jit(smap(partial(_local_isolated, cfg, lc, share),  # every layer: one compile
                                         in_specs=(specs["layers"][0], *acts), out_specs=iso_out))

    def info(self):
        info = super().info()
        lay = self.layout
        info.details |= {
            "implementation": "equiv.mamba2 (pure JAX) over a device mesh (equiv/mamba2/sharding.py)",
            "mesh": {"data": lay.data, "model": lay.model, "heads_per_device": lay.local.n_heads,
                     "groups_per_device": lay.local.n_groups, "devices_per_group": lay.share,
                     "devices": [str(d) for d in self.mesh.devices.flat]}}
        return info

    # -- batch over the data axis, columns back in natural order ---------------------------------
    def _padded(self, *arrays):
        """Rows padded (copies of the last) to a multiple of the data axis, placed batch-sharded."""
        b = arrays[0].shape[0]
        extra = -b % self.layout.data
        out = []
        for a in arrays:
            if a is not None:
                a = np.asarray(a)
                a = np.concatenate([a, np.repeat(a[-1:], extra, axis=0)]) if extra else a
                a = jax.device_put(a, NamedSharding(self.mesh, P(DATA, *[None] * (a.ndim - 1))))
            out.append(a)
        return out

    def _natural(self, name: str, a: np.ndarray) -> np.ndarray:
        """A tap from the mesh's device-major columns back to the checkpoint's."""
        if name.endswith("mixer.in_proj"):
            return a[..., self.layout.in_natural]
        if name.endswith("mixer.conv"):
            return a[..., self.layout.conv_natural]
        return a

    def forward_arrays(self, ids, mask=None, taps=True) -> dict:
        """The forward's device arrays as the mesh holds them (batch padded, in_proj and conv
        columns device-major): to inspect their shardings."""
        ids, mask = self._check(ids, mask)
        with jax.default_matmul_precision(self.precision):
            return self._forward_fns[bool(taps)](self.params, *self._padded(ids, mask))

    def _forward_device(self, ids, mask, taps):
        out = self._forward_fns[bool(taps)](self.params, *self._padded(ids, mask))
        return {k: self._natural(k, np.asarray(v)[:ids.shape[0]]) for k, v in out.items()}

    def _isolated_device(self, i, layer_in, normed_in, in_proj_in, conv_in, ssm_in, gated_in,
                         out_proj_in, mask):
        b = layer_in.shape[0]
        in_proj_in = np.asarray(in_proj_in)[..., self.layout.in_cols]
        conv_in = np.asarray(conv_in)[..., self.layout.conv_cols]
        args = self._padded(layer_in, normed_in, in_proj_in, conv_in, ssm_in, gated_in, out_proj_in, mask)
        out = self._isolated_fn(self.params["layers"][i], *args)
        return {k: self._natural(k, np.asarray(v)[:b]) for k, v in out.items()}

    def _prefill(self, ids, mask):
        logits, cache = self._prefill_fn(self.params, *self._padded(ids, mask))
        return np.asarray(logits)[:ids.shape[0]], cache

    def _decode_step(self, cache, tokens):
        logits, cache = self._step_fn(self.params, cache, *self._padded(tokens))
        return np.asarray(logits)[:len(tokens)], cache

    def _generate(self, prompt, mask, max_new_tokens, eos_id):
        b = prompt.shape[0]
        logits, cache = self._prefill_fn(self.params, *self._padded(prompt, mask))
        eos = -1 if eos_id is None else eos_id
        pad = self.cfg.pad_token_id if self.cfg.pad_token_id is not None else 0
        tokens, margins, steps, cache = self._loop_fn(self.params, cache, logits, eos_id=jnp.int32(eos),
                                                      pad_id=jnp.int32(pad), max_new_tokens=max_new_tokens)
        return np.asarray(tokens)[:b], np.asarray(margins)[:b], steps, cache


def shard(model, data: int, model_axis: int, port: str = "builtin") -> ShardedMamba2Model:
    """A loaded built-in Mamba-2 model placed on a data x model mesh (MeshError: one line)."""
    if type(model) is not Mamba2Model:
        raise MeshError(f"--mesh: expected the built-in Mamba-2 port (--port builtin on a Mamba-2 "
                        f"checkpoint), got port {quote(port)} ({type(model).__name__})")
    return ShardedMamba2Model(model, data, model_axis)


# ---------------------------------------------------------------------------------------------
# equiv diff --mesh: the sharded port against the unsharded port, layer-wise and in greedy decode
