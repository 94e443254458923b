"""Why the port's GPU decode step is slower than its weight reads: the decode projections measured
alone, one token (a matrix-vector product), in the layouts and precisions the port could use.

    python -m equiv_reference.mamba2.gpu_gemv_probe [--json PATH]

For the 2.7b and 130m in_proj / out_proj shapes, bf16 weights: x (1, K) against W stored (K, N) (the
port's layout, contraction over the major axis) and stored (N, K) (contraction over the contiguous
axis), each at matmul precision "highest" and "default", the product in bf16 (as the port's einsum
gives it) or accumulated into float32 (preferred_element_type), and x padded to 8 rows (a GEMM
rather than XLA's matrix-vector reduction); 64 chained products per jit call (one
decode step's worth of one projection across the 2.7b's layers), median of 20 calls. Prints
microseconds per product and the bandwidth it reached (weight bytes / time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

SHAPES = {"2.7b in_proj": (2560, 10576), "2.7b out_proj": (5120, 2560),
          "130m in_proj": (768, 3352), "130m out_proj": (1536, 768)}
CHAIN = 64


VARIANTS = [(layout, precision, out, 1) for layout in ("KN", "NK") for precision in ("highest", "default")
            for out in ("bf16", "f32")] + [("KN", "highest", "bf16", 8), ("NK", "highest", "bf16", 8)]


def measure(k: int, n: int, layout: str, precision: str, out: str = "f32", rows: int = 1) -> float:
    import jax
    import jax.numpy as jnp

    key = jax.random.PRNGKey(0)
    shape = (CHAIN, k, n) if layout == "KN" else (CHAIN, n, k)
    w = (jax.random.normal(key, shape, jnp.float32) * 0.02).astype(jnp.bfloat16)
    x = jax.random.normal(key, (rows, k), jnp.float32).astype(jnp.bfloat16)
    spec = "bi,io->bo" if layout == "KN" else "bi,oi->bo"
    kw = {"preferred_element_type": jnp.float32} if out == "f32" else {}

    @jax.jit
    def run(w, x):
        acc = jnp.zeros((rows, n), jnp.float32)
        for i in range(CHAIN):  # independent products (as the layers' are), summed so none is dead
            acc = acc + jnp.einsum(spec, x, w[i], **kw).astype(jnp.float32)
        return acc

    with jax.default_matmul_precision(precision):
        jax.block_until_ready(run(w, x))
        times = []
        for _ in range(20):
            t = time.perf_counter()
            jax.block_until_ready(run(w, x))
            times.append(time.perf_counter() - t)
    return statistics.median(times) / CHAIN


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = []
    for name, (k, n) in SHAPES.items():
        for layout, precision, out, m in VARIANTS:
            sec = measure(k, n, layout, precision, out, m)
            gbs = k * n * 2 / sec / 1e9
            rows.append({"shape": name, "k": k, "n": n, "layout": layout, "precision": precision,
                         "out": out, "x_rows": m, "us": sec * 1e6, "gb_s": gbs})
            print(f"{name:14s} W {layout} {precision:8s} out {out:4s} x rows {m} {sec * 1e6:8.1f} us "
                  f"{gbs:7.0f} GB/s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
