"""How the built-in ports hold their projection weights: K-blocks, whole (K, N) columns, or rows.

The checkpoint's nn.Linear weight becomes one of three forms, chosen once at load per backend
(`weight_layout`) and contracted by each family's `linear`:

- "kblocks" (CPU): the (K, N) = (in, out) weight as K-blocks of 256 rows, contracted one block at
  a time and summed in order. XLA:CPU's float32 dot accumulates long contractions less accurately
  than torch's (RMS error vs float64, XLA / torch: 1.67x at K=512, 2.76x at K=1536, 3.2x at
  K=2048), enough to fail the error budget on deeper models although every op is right; blocks of
  256 measure 0.8-1.15x torch's error. The blocks are separate arrays made once at load: slicing
  one weight inside the jitted graph makes XLA copy it (5x slower per decode step).
- "columns": the (K, N) weight whole, `x @ w`. cuBLAS's float32 accumulation at precision
  "highest" stays within budget whole (docs/gpu.md, section 2), so GPU needs no blocks.
- "rows" (GPU and any other non-CPU backend): the weight stored (N, K) = (out, in), as nn.Linear
  holds it, and contracted on its last (contiguous) axis. A decode step is a chain of
  matrix-vector products, and on an H100 (bf16, equiv_reference/mamba2/gpu_gemv_probe.py,
  docs/gpu.md section 5) the 2.7b in_proj took 19.8 us stored (N, K) against 32.9 us stored
  (K, N) (2,740 against 1,643 GB/s; the copy ceiling is 2,791), out_proj 10.4 against 20.1 us.
  Prefill contracts the same stored weight (a GEMM with a transposed operand): one copy. Loading
  transposes each device weight once; the (K, N) originals are freed when the loader drops them.

`SSM_EQUIV_WEIGHT_LAYOUT` = auto (the per-backend choice above) | rows | columns | kblocks
overrides the choice, for tests and measurements.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from equiv.errors import EquivError, quote

MATMUL_K_BLOCK = 256
SPLIT_BACKENDS = ("cpu",)
LAYOUT_ENV = "SSM_EQUIV_WEIGHT_LAYOUT"
LAYOUTS = ("rows", "columns", "kblocks")
HEAD = ("lm_head",)  # an untied head (d, v): a matvec per decode step too, never K-blocked


@jax.tree_util.register_pytree_node_class
class Rows:
    """A projection weight stored (N, K) = (out, in): `w` is the transpose of the (K, N) weight
    `x @ w` would take. A pytree node (jit sees the array), so `linear` tells the form by type."""

    __slots__ = ("w",)

    def __init__(self, w):
        self.w = w

    @property
    def dtype(self):
        return self.w.dtype

    def tree_flatten(self):
        return (self.w,), None

    @classmethod
    def tree_unflatten(cls, _aux, children):
        return cls(*children)

    def __repr__(self) -> str:
        return f"Rows({getattr(self.w, 'shape', '?')}, {getattr(self.w, 'dtype', '?')})"


def rows_dot(x, w, preferred_element_type=None):
    """x (..., K) against w (N, K), contracted on x's last axis and w's axis 1: the dot_general
    `jnp.einsum("...i,io->...o", x, w.T)` makes, with the same arguments (operands as given; the
    output in their result dtype unless `preferred_element_type` says otherwise; precision None =
    the caller's jax.default_matmul_precision scope), without a transposed copy of w."""
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), precision=None,
                               preferred_element_type=preferred_element_type or jnp.result_type(x, w))


def kblocks_dot(x, w, preferred_element_type=None):
    """x @ w for `w` an array or a tuple of K-blocks (`split_k`): one dot per block over x's matching
    columns, summed in block order, the order the K-blocks exist for (module docstring)."""
    blocks = tuple(w) if isinstance(w, (tuple, list)) else (w,)
    y, start = None, 0
    for block in blocks:
        k = block.shape[0]
        xb = x if len(blocks) == 1 else x[..., start:start + k]
        part = jnp.einsum("...i,io->...o", xb, block, preferred_element_type=preferred_element_type)
        y, start = (part if y is None else y + part), start + k
    return y


def requested_layout() -> str:
    """SSM_EQUIV_WEIGHT_LAYOUT: "auto" (unset or empty: the per-backend choice) or one of LAYOUTS;
    anything else is one EquivError line naming the expected values and what came."""
    raw = os.environ.get(LAYOUT_ENV)
    value = (raw or "").strip().lower() or "auto"
    if value != "auto" and value not in LAYOUTS:
        raise EquivError(f"{LAYOUT_ENV}: expected one of auto, {', '.join(LAYOUTS)}, got {quote(raw)}")
    return value


def weight_layout(backend: str | None = None) -> str:
    """The layout the ports store projections in on `backend` (default: JAX's default backend):
    SSM_EQUIV_WEIGHT_LAYOUT if set to one of LAYOUTS, else kblocks on CPU and rows elsewhere."""
    value = requested_layout()
    if value == "auto":
        return "kblocks" if (backend or jax.default_backend()) in SPLIT_BACKENDS else "rows"
    return value


def split_k(w, block: int = MATMUL_K_BLOCK) -> tuple:
    """A (k, o) weight as a tuple of (<=block, o) row blocks."""
    return tuple(w[start:start + block] for start in range(0, w.shape[0], block))


def arrange(w, layout: str):
    """One (K, N) weight in `layout` (kblocks, columns or rows). A host (numpy) weight is transposed
    on the host, so the device receives the stored form only."""
    if layout == "kblocks":
        return split_k(w)
    if layout == "rows":
        return Rows(np.ascontiguousarray(w.T) if isinstance(w, np.ndarray) else jnp.transpose(w))
    return w


def host_dense(w) -> np.ndarray:
    """Any form back to the (K, N) weight, as a host array."""
    if isinstance(w, Rows):
        return np.asarray(w.w).T
    if isinstance(w, (tuple, list)):
        return np.concatenate([np.asarray(b) for b in w])
    return np.asarray(w)


def cut_columns(w, start, stop):
    """The weight restricted to output columns start:stop, in the same form."""
    if isinstance(w, Rows):
        return Rows(w.w[start:stop])
    if isinstance(w, (tuple, list)):
        return tuple(b[..., start:stop] for b in w)
    return w[..., start:stop]


def layout_of(w) -> str:
    """The form a stored weight is in."""
    return "rows" if isinstance(w, Rows) else "kblocks" if isinstance(w, (tuple, list)) else "columns"


def params_layout(params: dict, keys) -> str:
    """The form the first layer's first projection in `keys` is held in (what a loaded model reports)."""
    lp = params["layers"][0] if params.get("layers") else {}
    return next((layout_of(lp[k]) for k in keys if k in lp), "columns")


def layout_details(params: dict, keys) -> dict:
    """What a loaded model's info() reports of its weight handling: the form its projections are
    held in (read from the params, so a model placed otherwise reports its own; without params, as
    a stage-by-stage runner that loads them later, the layout the port would choose now)."""
    layout = weight_layout() if params is None else params_layout(params, keys)
    return {"weight_layout": layout} | ({"matmul_k_block": MATMUL_K_BLOCK} if layout == "kblocks" else {})


def with_split_projections(params: dict, keys) -> dict:
    """The per-layer weights named in `keys` as K-block tuples."""
    return with_layout(params, keys, "kblocks")


def with_layout(params: dict, keys, layout: str, rows_also=HEAD) -> dict:
    """The per-layer weights named in `keys` in `layout`. The weights named in `rows_also` (per layer
    or top level: short-K matvecs, the untied head) are stored as rows too when the layout is rows;
    K-blocks and columns leave them whole, as they have always been held."""
    def pick(k):
        return k in keys or (layout == "rows" and k in rows_also)

    layers = [{k: arrange(v, layout) if pick(k) else v for k, v in lp.items()} for lp in params["layers"]]
    top = {k: arrange(v, layout) for k, v in params.items() if k != "layers" and pick(k)}
    return params | top | {"layers": layers}


def for_backend(params: dict, keys, backend: str | None = None, layout: str | None = None,
                rows_also=HEAD) -> dict:
    """`params` laid out for `backend` (default: JAX's default backend): `weight_layout`'s choice
    (K-blocks on CPU, rows elsewhere, or SSM_EQUIV_WEIGHT_LAYOUT), or `layout` when given."""
    return with_layout(params, keys, layout or weight_layout(backend), rows_also)
